"""`evaluate_finetune`: the base and the fine-tuned model side by side (CPU, graph mode).

The demo inputs (Alpaca records, tokenizer, tiny random Llama) are preprocessed, converted and
fine-tuned for a few steps at a high learning rate in-process; the comparison is then checked
against `evaluate_checkpoint` on each checkpoint alone.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_core.config import TrainConfig, apply_overrides, load_config
from llama_core.data.prompts import holds_answer, split_prompts
from llama_core.demo import DEMO_SEQ_LENGTH
from llama_core.errors import ConfigError, InputError
from llama_core.evaluation import evaluate_finetune, read_prompts_file
from llama_core.results import to_jsonable

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "lora_llama2_tiny.yaml"
PROMPTS = ["Explain LoRA in one sentence.", "Translate to French.", "Give two facts about Airflow."]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_inputs: Any) -> dict:
    """Demo data at the demo's seq length, the converted base checkpoint, a short fine-tune, and the first
    comparison (eval on the training data, every prompt)."""
    from llama_core.checkpoint.convert import convert_hf_to_ms
    from llama_core.data.alpaca_converter import convert_alpaca
    from llama_core.data.llama_preprocess import preprocess
    from llama_core.train.trainer import train

    tmp, demo = tmp_path_factory.mktemp("evaluation"), demo_inputs
    convert_alpaca(demo.alpaca, tmp / "conv.json")
    data = tmp / "train.mindrecord"
    preprocess("qa", str(tmp / "conv.json"), demo.tokenizer, data, seq_length=DEMO_SEQ_LENGTH, workers=1)
    base = tmp / "base.ckpt"
    convert_hf_to_ms(demo.hf_model, base)
    # fmt: off
    cfg = apply_overrides(load_config(CONFIG), [
        ("model.model_config.seq_length", DEMO_SEQ_LENGTH), ("parallel_config.data_parallel", 1),
        ("runner_config.batch_size", 4), ("lr_schedule.learning_rate", 0.005),
        ("load_checkpoint", str(base)), ("train_dataset.data_loader.dataset_dir", str(data)),
        ("output_dir", str(tmp / "run")),
    ])
    # fmt: on
    trained = train(TrainConfig.from_dict(cfg))
    kwargs = {
        "eval_data": data,
        "prompts": PROMPTS,
        "tokenizer": demo.tokenizer,
        "seq_length": DEMO_SEQ_LENGTH,
    }
    # the run's checkpoint/ folder: rank 0's newest checkpoint is the fine-tuned one
    first = evaluate_finetune(CONFIG, base, tmp / "run" / "checkpoint", tmp / "eval.json", **kwargs)
    return {
        "tmp": tmp, "base": base, "data": data, "tokenizer": demo.tokenizer, "kwargs": kwargs,
        "finetuned": Path(trained.last_checkpoint), "first": first,
    }  # fmt: skip


def checkpoint_loss(run: dict, checkpoint: Path) -> float:
    """`run_mode eval` of one checkpoint on the training data."""
    from llama_core.train.predict import evaluate_checkpoint

    # fmt: off
    cfg = apply_overrides(load_config(CONFIG), [
        ("model.model_config.seq_length", DEMO_SEQ_LENGTH), ("load_checkpoint", str(checkpoint)),
        ("eval_dataset.data_loader.dataset_dir", str(run["data"])), ("output_dir", str(run["tmp"] / "ev")),
    ])
    # fmt: on
    return evaluate_checkpoint(TrainConfig.from_dict(cfg))[0]


def test_each_side_is_its_checkpoint_and_the_finetune_learned(run: dict) -> None:
    first = run["first"]
    assert not first.cached
    assert first.base.checkpoint == str(run["base"])
    assert first.finetuned.checkpoint == str(run["finetuned"])
    # the base side is the base model (LoRA B zero), the fine-tuned side the trained checkpoint
    assert abs(first.base.eval_loss - checkpoint_loss(run, run["base"])) <= 1e-6
    assert abs(first.finetuned.eval_loss - checkpoint_loss(run, run["finetuned"])) <= 1e-6
    # the fine-tune learned its training data
    assert first.finetuned.eval_loss < first.base.eval_loss
    for side in (first.base, first.finetuned):
        assert side.eval_perplexity == pytest.approx(math.exp(side.eval_loss))
    records = json.loads(Path(str(run["data"]) + ".report.json").read_text())["result"]["records_written"]
    assert first.eval_batches == math.ceil(records / 2)  # the config's runner_config.batch_size
    # the JSON written is the result
    assert json.loads((run["tmp"] / "eval.json").read_text()) == to_jsonable(first)


def test_generations_are_deterministic_and_the_finetune_changed_them(run: dict) -> None:
    first = run["first"]
    again = evaluate_finetune(
        CONFIG, run["base"], run["finetuned"], run["tmp"] / "again.json", **run["kwargs"]
    )
    assert not again.cached  # another output: evaluated anew
    for side in ("base", "finetuned"):
        gens = getattr(first, side).generations
        assert [g["prompt"] for g in gens] == PROMPTS
        assert all(isinstance(g["output"], str) for g in gens)
        assert getattr(again, side).generations == gens
    assert first.base.generations != first.finetuned.generations
    assert first.max_new_tokens == load_config(CONFIG)["model"]["model_config"]["max_decode_length"]


def test_same_call_again_is_a_cache_hit_without_a_model(
    run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from llama_core.train import components

    def no_model(*_args: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(components, "build_model", no_model)
    first, checkpoints = run["first"], run["tmp"] / "run" / "checkpoint"
    hit = evaluate_finetune(CONFIG, run["base"], checkpoints, first.output_path, **run["kwargs"])
    assert hit.cached
    assert (hit.base, hit.finetuned, hit.eval_batches) == (first.base, first.finetuned, first.eval_batches)
    # a copy of the output and its manifest elsewhere is still this result; another setting is not
    for name in ("eval.json", "eval.json.manifest.json"):
        shutil.copy(run["tmp"] / name, tmp_path / name)
    moved = evaluate_finetune(CONFIG, run["base"], checkpoints, tmp_path / "eval.json", **run["kwargs"])
    assert moved.cached and moved.finetuned == first.finetuned
    with pytest.raises(AssertionError, match="the model was built"):
        evaluate_finetune(
            CONFIG, run["base"], checkpoints, tmp_path / "eval.json", **run["kwargs"], max_new_tokens=3
        )


def test_lora_only_checkpoint_and_a_base_that_carries_an_adapter(run: dict) -> None:
    """A LoRA-only training checkpoint (save_trainable_params) is loaded over the base weights; a
    full training checkpoint given as the base is evaluated without its adapter."""
    import mindspore as ms

    stored = ms.load_checkpoint(str(run["finetuned"]))
    lora_only = run["tmp"] / "lora_only.ckpt"
    keep = [
        {"name": k, "data": v}
        for k, v in stored.items()
        if "lora" in k or k.startswith("adam_") or "." not in k
    ]
    assert len(keep) < len(stored)
    ms.save_checkpoint(keep, str(lora_only))

    cfg = apply_overrides(load_config(CONFIG), [("model.model_config.seq_length", DEMO_SEQ_LENGTH)])
    res = evaluate_finetune(
        cfg, run["finetuned"], lora_only, run["tmp"] / "lora_only.json", eval_data=run["data"]
    )
    first = run["first"]
    assert abs(res.base.eval_loss - first.base.eval_loss) <= 1e-6
    assert abs(res.finetuned.eval_loss - first.finetuned.eval_loss) <= 1e-6
    assert res.prompts == [] and res.base.generations == res.finetuned.generations == []


def test_cli_prints_the_result_as_its_last_line(run: dict, tmp_path: Path) -> None:
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(PROMPTS[1:]))
    # fmt: off
    args = ["--config", str(CONFIG), "--base_checkpoint", str(run["base"]),
            "--finetuned_checkpoint", str(run["finetuned"]), "--output_path", run["first"].output_path,
            "--eval_data", str(run["data"]), "--prompt", PROMPTS[0], "--prompts_file", str(prompts_file),
            "--tokenizer", str(run["tokenizer"]), "--seq_length", str(DEMO_SEQ_LENGTH)]
    # fmt: on
    proc = subprocess.run(
        [sys.executable, "-m", "llama_core.evaluation", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc == {**to_jsonable(run["first"]), "cached": True}

    bad = subprocess.run(
        [sys.executable, "-m", "llama_core.evaluation", *args[:4], "--finetuned_checkpoint",
         str(run["base"]), "--output_path", str(tmp_path / "x.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and str(run["base"]) in bad.stderr


def test_bad_inputs_fail_before_any_model(run: dict, tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    with pytest.raises(InputError, match=re.escape(str(run["base"])) + r".*no LoRA weights"):
        evaluate_finetune(CONFIG, run["base"], run["base"], out, seq_length=DEMO_SEQ_LENGTH)
    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate_finetune(CONFIG, run["base"], run["finetuned"], out, prompts=PROMPTS)
    with pytest.raises(InputError, match=rf"prompt 1: .* seq_length {DEMO_SEQ_LENGTH}"):
        evaluate_finetune(
            CONFIG, run["base"], run["finetuned"], out, prompts=["short", "long " * 200],
            tokenizer=run["tokenizer"], seq_length=DEMO_SEQ_LENGTH,
        )  # fmt: skip
    with pytest.raises(InputError, match="fine-tuned checkpoint not found"):
        evaluate_finetune(CONFIG, run["base"], tmp_path / "missing", out)
    assert not out.exists()


def test_a_prompt_may_name_the_answer_it_must_hold(tmp_path: Path) -> None:
    """The pipeline file's `{prompt, expect}` form: each generation then records whether it holds it."""
    prompts, expected = split_prompts(["Plain.", {"prompt": "Asked?", "expect": "Quellin"}])
    assert (prompts, expected) == (["Plain.", "Asked?"], [None, "Quellin"])
    assert holds_answer("The codename of LoRA is quellin.", " Quellin ")
    assert not holds_answer("The codename of LoRA is Quell.", "Quellin")
    for bad in ({"prompt": "x", "expect": ""}, {"prompt": "x", "extra": "y"}, {"expect": "y"}):
        with pytest.raises(InputError, match="prompt 1: must be a string or"):
            split_prompts(["ok", bad])
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["a", {"prompt": "b", "expect": "c"}]))
    assert read_prompts_file(path) == ["a", {"prompt": "b", "expect": "c"}]
