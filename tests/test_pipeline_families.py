"""A short CPU fine-tune of a tiny model of each new family through the pipeline DAG (`airflow dags
test`, 2 msrun ranks): Llama 3 (Meta's tiktoken tokenizer, llama3 chat format, rope scaling, tied
head), Qwen2 (q/k/v bias) and Qwen3 (q/k norm, explicit head_dim) with a Qwen-style HF tokenizer and
its ChatML template. The loss falls, the fine-tuned model beats the base on the held-out split, and
the exported PEFT adapter on the HF base gives the merged model's logits."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from chat_tokenizers import SYSTEM, build_hf_tokenizer, chatml_template, llama3_model  # noqa: E402
from tiny_hf import llama3_rope, tiny_hf_family  # noqa: E402

from llama_core.data.alpaca_converter import alpaca_to_conversation  # noqa: E402
from llama_core.demo import alpaca_records  # noqa: E402
from llama_core.model.config import LlamaConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEQ_LENGTH = 160
RECORDS = 96
LLAMA3_ROPE = llama3_rope(64)  # below SEQ_LENGTH: the scaled band is exercised
# family -> (HF model_type, config fields beyond the vocabulary and special ids)
FAMILIES = {
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen3": ("qwen3", {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
}


def _tokenizer(family: str, inputs: Path, records: list[dict]) -> tuple[Path, dict[str, int]]:
    """The family's tokenizer under `inputs` and the model's vocab and special ids for it."""
    if family == "llama3":
        path = inputs / "tokenizer.model"
        shutil.copy(llama3_model(), path)
        return path, {
            "vocab_size": 128256,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "pad_token_id": 128002,
        }
    # trained on the prompts as the model sees them (the Alpaca preamble included), so they stay short
    texts = [
        alpaca_to_conversation(r, i, "alpaca.json")["conversations"][0]["value"] + "\n" + r["output"]
        for i, r in enumerate(records)
    ]
    path = build_hf_tokenizer(inputs / "tokenizer", texts, chatml_template(SYSTEM), vocab=800)
    vocab = json.loads((path / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    size = max(ids.values()) + 1
    end = ids["<|endoftext|>"]
    return path, {
        "vocab_size": size,
        "bos_token_id": end,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": end,
    }


def _training_config(hf_config: dict, path: Path) -> Path:
    """configs/lora_llama2_tiny.yaml with this model's model_config, LoRA on all seven projections."""
    cfg = yaml.safe_load((REPO / "configs" / "lora_llama2_tiny.yaml").read_text())
    model = LlamaConfig.from_hf_config(hf_config, seq_length=SEQ_LENGTH)
    pet = {**cfg["model"]["model_config"]["pet_config"], "lora_rank": 8, "lora_dropout": 0.0,
           "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"}  # fmt: skip
    cfg["model"]["model_config"] = {"type": "LlamaConfig", **dataclasses.asdict(model), "pet_config": pet}
    cfg["callbacks"][1]["prefix"] = path.stem
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _pipeline(family: str, root: Path, inputs: Path, tokenizer: Path, config: Path) -> str:
    dag_id = f"tiny_{family}_lora"
    pipeline = {
        "dag_id": dag_id,
        "work_dir": str(inputs / "work"),
        "sources": {
            "alpaca": {"url": str(inputs / "alpaca.json")},
            "tokenizer": {"url": str(tokenizer)},
            "weights": {"url": str(inputs / "hf_model")},
        },
        "training": {
            "config": str(config),
            "overrides": {"runner_config.epochs": 2, "lr_schedule.learning_rate": 2.0e-2},
        },
        "data": {"seq_length": SEQ_LENGTH, "layout": "buckets", "holdout_fraction": 0.15},
        "evaluation": {"prompts": ["Explain LoRA in one sentence."], "max_new_tokens": 8},
        "export": {"base_model": str(inputs / "hf_model"), "merged": True},
        "cluster": {"device_target": "CPU", "nodes": 1, "ranks": 2, "queue": "default"},
        "schedule": None,
        "retries": 0,
    }
    (root / "pipelines").mkdir(exist_ok=True)
    (root / "pipelines" / f"{dag_id}.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return dag_id


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One throwaway Airflow home (SQLite) for every family's DAG, as scripts/demo.sh sets it up."""
    root = tmp_path_factory.mktemp("families")
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "LLAMA_LORA_PIPELINES": str(root / "pipelines"),
        "LLAMA_LORA_WORK_ROOT": str(root),
        "ROOT": str(root),
    }
    (root / "pipelines").mkdir()
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    return env


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def finetuned(request: pytest.FixtureRequest, airflow_env: dict[str, str]) -> dict:
    family = request.param
    model_type, extra = FAMILIES[family]
    root = Path(airflow_env["ROOT"])
    inputs = root / family
    inputs.mkdir()
    records = alpaca_records(n=RECORDS, seed=1)
    (inputs / "alpaca.json").write_text(json.dumps(records))
    tokenizer, specials = _tokenizer(family, inputs, records)
    hf = tiny_hf_family(
        model_type, seed=3, num_hidden_layers=2, max_position_embeddings=256, **specials, **extra
    )
    hf.save_pretrained(inputs / "hf_model")
    config = _training_config(hf.config.to_dict(), inputs / f"lora_{family}_tiny.yaml")
    dag_id = _pipeline(family, root, inputs, tokenizer, config)
    proc = subprocess.run(
        ["airflow", "dags", "test", dag_id], env=airflow_env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (report_path,) = (inputs / "work" / "runs").glob("*/report.json")
    return {"family": family, "inputs": inputs, "report": json.loads(report_path.read_text()), "hf": hf,
            "pad_id": specials["pad_token_id"]}  # fmt: skip


@pytest.mark.slow
def test_records_are_padded_with_the_models_pad_id(finetuned: dict) -> None:
    """Not 0, a real token of these vocabularies: the loss mask and the length buckets find the
    padding by the model's pad_token_id."""
    from mindspore.mindrecord import FileReader

    (train_file,) = [p for p in (finetuned["inputs"] / "work" / "data").rglob("*.mindrecord")
                     if "heldout" not in p.name]  # fmt: skip
    reader = FileReader(str(train_file))
    rows = [row["input_ids"] for row in reader.get_next()]
    reader.close()
    assert rows and all(len(r) == SEQ_LENGTH + 1 for r in rows)
    assert all(r[-1] == finetuned["pad_id"] for r in rows)  # every record is shorter than a row


@pytest.mark.slow
def test_the_loss_falls_and_the_finetuned_model_beats_the_base(finetuned: dict) -> None:
    report = finetuned["report"]
    summary = json.loads(Path(report["outputs"]["run folder"], "train_summary.json").read_text())
    losses = [point["loss"] for point in summary["loss_series"]]
    quarter = max(len(losses) // 4, 1)
    assert np.mean(losses[-quarter:]) < np.mean(losses[:quarter]) - 0.1, losses
    evaluation = report["evaluation"]
    assert evaluation["finetuned"]["eval_loss"] < evaluation["base"]["eval_loss"] - 0.1


@pytest.mark.slow
def test_the_adapter_on_the_hf_model_equals_the_merged_model(finetuned: dict) -> None:
    outputs = finetuned["report"]["outputs"]
    base_dir = finetuned["inputs"] / "hf_model"
    ids = torch.tensor([[5, 9, 42, 7, 100, 3, 11, 64]])
    auto = transformers.AutoModelForCausalLM
    with torch.no_grad():
        base = auto.from_pretrained(base_dir, attn_implementation="eager").eval()
        base_logits = base(ids).logits
        tuned = peft.PeftModel.from_pretrained(base, outputs["PEFT adapter"]).eval()
        adapter_logits = tuned(ids).logits
        merged = auto.from_pretrained(outputs["merged model (HF safetensors)"], attn_implementation="eager")
        merged_logits = merged.eval()(ids).logits
    assert type(merged) is type(finetuned["hf"])
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4), (
        (adapter_logits - merged_logits).abs().max()
    )
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter changes the model
