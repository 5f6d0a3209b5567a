"""`make demo` end to end: pipeline llama2_tiny_lora_demo through Airflow (`airflow dags test`), its
inputs fetched over HTTP, ending with the run's report; the outputs are what they claim to be."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from airflow_live import free_port

from bench.demo import run_demo

BEFORE_FINETUNE = [
    "fetch_alpaca",
    "fetch_tokenizer",
    "fetch_weights",
    "alpaca_to_conversations",
    "tokenize_to_mindrecord",
    "import_checkpoint",
    "shard_checkpoint",
]


def _stages(report: dict) -> dict[str, dict]:
    return {stage["name"]: stage for stage in report["stages"]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, copy_demo_inputs: Callable[[Path], Path]) -> dict:
    out = tmp_path_factory.mktemp("demo")
    copy_demo_inputs(out / "inputs")  # the session's build: the demo keeps the inputs it finds there
    port = free_port()
    first = run_demo(out, port)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "work" / "data").rglob("*") if p.is_file()}
    second = run_demo(out, port)
    return {"out": out, "first": first["report"], "stdout": first["stdout"], "second": second["report"],
            "stamps": stamps}  # fmt: skip


@pytest.mark.slow
def test_the_demo_fetches_over_http_trains_and_reports(demo: dict) -> None:
    report, stdout = demo["first"], demo["stdout"]
    stages = _stages(report)
    assert set(stages) >= {*BEFORE_FINETUNE, "finetune", "evaluate", "export_adapter", "export_merged"}
    assert report["run"]["params"]["alpaca_url"].startswith("http://127.0.0.1:")
    assert not any(stages[name]["cached"] for name in ("fetch_alpaca", "fetch_tokenizer", "fetch_weights"))
    summary = json.loads(Path(report["outputs"]["run folder"], "train_summary.json").read_text())
    losses = [point["loss"] for point in summary["loss_series"]]
    assert summary["world_size"] == 2 and len(losses) == summary["steps"] > 0
    assert summary["eval_series"], "the held-out split was not evaluated during training"
    evaluation = report["evaluation"]
    assert evaluation["finetuned"]["eval_loss"] < evaluation["base"]["eval_loss"] - 0.1  # it learned
    prompts = report["run"]["params"]["prompts"]
    assert [g["prompt"] for g in evaluation["finetuned"]["generations"]] == [p["prompt"] for p in prompts]
    # and a reader sees it: the fine-tuned model answers the demo's task where the base model cannot
    base, tuned = (evaluation[side]["generations"] for side in ("base", "finetuned"))
    assert len(prompts) == 3 and all(g["expect"] == p["expect"] for g, p in zip(tuned, prompts, strict=True))
    learnt = [not b["right"] and t["right"] for b, t in zip(base, tuned, strict=True)]
    assert sum(learnt) >= 2, f"the fine-tune did not learn the demo's task: {base} -> {tuned}"
    right_before, right_after = (sum(g["right"] for g in side) for side in (base, tuned))
    assert f"Answers: {right_before}/3 right before, {right_after}/3 after" in stdout
    # the summary the demo ends with: stage times and cache hits, losses, the adapter and the curve
    for text in ("finetune", "cache hit", "Eval loss: base", "Adapter: ", "Loss curve: ", "make airflow"):
        assert text in stdout, f"{text!r} missing from the demo's output:\n{stdout[-3000:]}"
    assert report["outputs"]["PEFT adapter"] in stdout


@pytest.mark.slow
def test_the_loss_curve_is_a_real_plot(demo: dict) -> None:
    from matplotlib.image import imread

    png = imread(demo["first"]["report"]["plot"])
    assert png.shape[0] > 300 and png.shape[1] > 600
    assert png[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.slow
def test_a_second_demo_hits_the_cache_for_every_stage_before_the_finetune(demo: dict) -> None:
    stages = _stages(demo["second"])
    assert {name: stages[name]["cached"] for name in BEFORE_FINETUNE} == dict.fromkeys(BEFORE_FINETUNE, True)
    out = demo["out"]
    assert {p: p.stat().st_mtime_ns for p in demo["stamps"]} == demo["stamps"]  # no data file rewritten
    assert len(list(out.glob("work/runs/*/train_summary.json"))) == 2  # a new run trains anew


@pytest.mark.slow
def test_the_adapter_loads_with_peft_and_equals_the_merged_model(demo: dict) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    outputs = demo["first"]["outputs"]
    base_dir = demo["out"] / "inputs" / "hf_model"
    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3]])
    with torch.no_grad():
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
        base_logits = base(ids).logits
        tuned = peft.PeftModel.from_pretrained(base, outputs["PEFT adapter"]).eval()
        adapter_logits = tuned(ids).logits
        merged = transformers.LlamaForCausalLM.from_pretrained(
            outputs["merged model (HF safetensors)"]
        ).eval()
        merged_logits = merged(ids).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4), (
        (adapter_logits - merged_logits).abs().max()
    )
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter changes the model
