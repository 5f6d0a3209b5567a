"""llama_core.report: report.json keeps the inputs, report.md stays well-formed whatever the model
wrote, the PNG is a real plot of the data, and a failed report leaves the previous one intact."""

from __future__ import annotations

import copy
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from llama_core import report as report_mod
from llama_core.report import (
    PLOT_DPI,
    PLOT_SIZE_INCHES,
    VIEW_MAX_BYTES,
    Stage,
    bounded_view,
    config_digest,
    load_report,
    plot_losses,
    report_view,
    summary_text,
    view_size,
    write_report,
)
from llama_core.report import files as report_files

TRICKY_OUTPUT = "| col | x |\n```\nrm `a|b` ``c``\n| done |"
PROMPTS = ["Give three tips for staying healthy.", "Show the | pipe and a `tick`"]


def loss_series(
    steps: int = 60, seed: int = 0, start: float = 2.4, end: float = 1.45
) -> list[dict[str, Any]]:
    """A noisy decreasing loss, as TrainResult.loss_series has it."""
    rng = random.Random(seed)
    out = []
    for step in range(1, steps + 1):
        loss = end + (start - end) * math.exp(-step / (steps / 4)) + rng.gauss(0, 0.05)
        out.append({"step": step, "epoch": 1 + (step - 1) // 30, "loss": loss, "lr": 1e-4, "grad_norm": 0.9})
    return out


def eval_series(every: int = 10, steps: int = 60) -> list[dict[str, Any]]:
    out = []
    for step in range(every, steps + 1, every):
        loss = 1.55 + 0.6 * math.exp(-step / 16)
        out.append({"step": step, "loss": loss, "perplexity": math.exp(loss)})
    return out


def make_inputs(tmp_path: Path) -> dict[str, Any]:
    series, evals = loss_series(), eval_series()
    train = {
        "steps": 60,
        "steps_this_run": 60,
        "total_steps": 60,
        "final_loss": series[-1]["loss"],
        "eval_loss": evals[-1]["loss"],
        "eval_perplexity": evals[-1]["perplexity"],
        "tokens_per_second_per_device": 1843.2,
        "tokens_per_second_total": 1843.2 * 8,
        "world_size": 8,
        "global_batch_size": 16,
        "seq_length": 512,
        "loss_series": series,
        "eval_series": evals,
        "length_buckets": {"enabled": True, "sizes": [128, 256, 512], "compiles": 3, "compile_seconds": 40.0},
    }
    gens = {
        "base": [
            {"prompt": PROMPTS[0], "output": "Give three tips. Give three"},
            {"prompt": PROMPTS[1], "output": "|"},
        ],
        "finetuned": [
            {"prompt": PROMPTS[0], "output": "1. Eat well.\n2. Move.\n3. Sleep."},
            {"prompt": PROMPTS[1], "output": TRICKY_OUTPUT},
        ],
    }
    evaluation = {
        "eval_data": str(tmp_path / "data" / "holdout.mindrecord"),
        "prompts": PROMPTS,
        "max_new_tokens": 64,
        "base": {"checkpoint": "/ckpt/base.ckpt", "eval_loss": 2.104, "eval_perplexity": math.exp(2.104)},
        "finetuned": {
            "checkpoint": "/runs/r1/merged.ckpt",
            "eval_loss": evals[-1]["loss"],
            "eval_perplexity": evals[-1]["perplexity"],
        },
    }
    evaluation["base"]["generations"] = gens["base"]
    evaluation["finetuned"]["generations"] = gens["finetuned"]
    data = {
        "output_file": "/data/alpaca_512.mindrecord",
        "records_written": 949,
        "supervised_tokens": 80123,
        "seq_length": 512,
        "chat_template": "llama3",
        "records_fully_masked": {"count": 2, "first_ids": ["identity_12", "identity_40"]},
        "records_truncated": {"count": 7},
        "packing": {"mode": "pack", "documents": 949, "rows": 310, "fill_ratio": 0.93},
        "holdout": {
            "fraction": 0.05,
            "records": 50,
            "supervised_tokens": 4100,
            "output_file": "/data/h.mindrecord",
        },
    }
    config = {
        "seed": 0,
        "runner_config": {"epochs": 2, "batch_size": 2},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 1e-5, "warmup_ratio": 0.03},
        "model": {
            "model_config": {
                "seq_length": 512,
                "pet_config": {"pet_type": "lora", "lora_rank": 16, "target_modules": ".*wq|.*wv"},
            }
        },
    }
    stages = [
        Stage("validate", 0.8, None),
        Stage("fetch_alpaca", 0.12, True, {"alpaca": "/dl/alpaca.json"}),
        Stage("tokenize_to_mindrecord", 45.2, False, {"mindrecord": "/data/alpaca_512.mindrecord"}),
        Stage("import_checkpoint", 0.2, True),
        Stage("finetune", 754.3, None, {"checkpoints": "/runs/r1/checkpoint"}),
    ]
    return {
        "run": {"dag_id": "llama2_lora_finetune", "run_id": "manual__2026-01-05T10:00:00+00:00"},
        "stages": stages,
        "config": config,
        "config_path": "/configs/lora.yaml",
        "data": data,
        "train": train,
        "evaluation": evaluation,
        "outputs": {
            "run folder": "/runs/r1",
            "merged checkpoint": "/runs/r1/merged.ckpt",
            "adapter": "/runs/r1/adapter",
        },
    }


def fenced_blocks(md: str) -> tuple[list[str], list[str]]:
    """(the contents of the fenced code blocks, the lines outside them), as CommonMark reads fences:
    a block opened by N backticks closes only at a line of at least N backticks."""
    blocks, outside, current, fence = [], [], [], 0
    for line in md.split("\n"):
        if fence:
            if re.fullmatch(f"`{{{fence},}}\\s*", line):
                blocks.append("\n".join(current))
                current, fence = [], 0
            else:
                current.append(line)
        elif m := re.match(r"(`{3,})", line):
            fence = len(m.group(1))
        else:
            outside.append(line)
    assert not fence, "a fenced block is never closed"
    return blocks, outside


def tables(lines: list[str]) -> list[list[list[str]]]:
    """Markdown tables (consecutive `|` lines) as rows of cells, split on unescaped pipes."""
    found, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif current:
            found.append(current)
            current = []
    return found


def section(md: str, title: str) -> str:
    return md.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture
def written(tmp_path: Path) -> tuple[dict[str, Any], report_mod.ReportResult]:
    inputs = make_inputs(tmp_path)
    return inputs, write_report(tmp_path / "report", **inputs)


def test_report_json_round_trips_the_inputs(written: tuple[dict[str, Any], report_mod.ReportResult]) -> None:
    inputs, result = written
    report = json.loads(Path(result.json_path).read_text())
    assert report["train"]["loss_series"] == inputs["train"]["loss_series"]
    assert report["train"]["eval_series"] == inputs["train"]["eval_series"]
    assert [(s["name"], s["seconds"], s["cached"], s["outputs"]) for s in report["stages"]] == [
        (s.name, s.seconds, s.cached, s.outputs) for s in inputs["stages"]
    ]
    for key in ("run", "data", "evaluation", "outputs"):
        assert report[key] == inputs[key]
    assert report["config"]["resolved"] == inputs["config"]
    assert report["config"]["path"] == inputs["config_path"]
    assert report["config"]["digest"] == config_digest(inputs["config"])
    assert report["report"] == {
        "json": result.json_path,
        "markdown": result.markdown_path,
        "plot": result.plot_path,
        "plot_note": None,
    }
    assert report["generated_at"]
    assert load_report(Path(result.json_path).parent) == report


def test_config_digest_follows_the_values_not_the_key_order(tmp_path: Path) -> None:
    config = make_inputs(tmp_path)["config"]
    digest = config_digest(config)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    reordered = dict(reversed(list(copy.deepcopy(config).items())))
    assert config_digest(reordered) == digest
    changed = copy.deepcopy(config)
    changed["model"]["model_config"]["pet_config"]["lora_rank"] = 8
    assert config_digest(changed) != digest
    changed = copy.deepcopy(config)
    changed["lr_schedule"]["learning_rate"] = 2e-5
    assert config_digest(changed) != digest


def test_markdown_has_every_section_stage_output_and_loss(
    written: tuple[dict[str, Any], report_mod.ReportResult],
) -> None:
    inputs, result = written
    md = Path(result.markdown_path).read_text()
    assert md.startswith(f"# Fine-tune report: `{inputs['run']['run_id']}`")
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    assert titles == [
        "Summary", "Stages", "Outputs", "Evaluation", "Data", "Training", "Config", "Loss curve"
    ]  # fmt: skip
    assert "### Generations" in section(md, "Evaluation")
    for stage in inputs["stages"]:
        assert f"`{stage.name}`" in section(md, "Stages")
        for path in stage.outputs.values():
            assert path in section(md, "Outputs")
    outputs = section(md, "Outputs")
    for path in inputs["outputs"].values():
        assert f"`{path}`" in outputs
    labels = [line.split("|")[1].strip() for line in outputs.strip().splitlines()[2:]]
    assert labels[:3] == ["adapter", "run folder", "merged checkpoint"]  # the adapter first

    ev, train = inputs["evaluation"], inputs["train"]
    summary = section(md, "Summary")
    base, tuned = ev["base"]["eval_loss"], ev["finetuned"]["eval_loss"]
    assert f"{base:.4f} → {tuned:.4f}" in summary
    assert f"{tuned - base:+.4f}" in summary
    assert f"{train['loss_series'][0]['loss']:.4f}" in summary
    assert f"{train['final_loss']:.4f}" in summary
    assert f"{ev['base']['eval_perplexity']:.2f} → {ev['finetuned']['eval_perplexity']:.2f}" in summary
    assert "12m34s" in summary  # the finetune stage's 754.3 s
    assert config_digest(inputs["config"]) in section(md, "Config")
    data = section(md, "Data")
    for value in ("949", "50", "80,123", "512", "pack"):
        assert value in data
    assert "| chat template | llama3 |" in data
    assert "![loss curve](loss_curve.png)" in section(md, "Loss curve")


def test_model_text_cannot_break_the_markdown(
    written: tuple[dict[str, Any], report_mod.ReportResult],
) -> None:
    inputs, result = written
    md = Path(result.markdown_path).read_text()
    blocks, outside = fenced_blocks(md)
    # every prompt and every output is one whole fenced block, verbatim
    for model in ("base", "finetuned"):
        for gen in inputs["evaluation"][model]["generations"]:
            assert gen["output"] in blocks
    for prompt in PROMPTS:
        assert prompt in blocks
    assert not any("rm `a" in line for line in outside)

    found = tables(outside)
    assert found
    for table in found:
        assert {len(row) for row in table} == {len(table[0])}, table
    stages = next(t for t in found if t[0] == ["stage", "time", "cache hit"])
    body = stages[2:]
    assert [row[0] for row in body[:-1]] == [f"`{s.name}`" for s in inputs["stages"]]
    expected = {True: "yes", False: "no", None: "—"}
    assert [row[2] for row in body[:-1]] == [expected[s.cached] for s in inputs["stages"]]
    hits = sum(s.cached is True for s in inputs["stages"])
    cacheable = sum(s.cached is not None for s in inputs["stages"])
    assert body[-1][0] == "**total**" and body[-1][2] == f"{hits} of {cacheable}"
    # a pipe in a config value is escaped, not a new column
    config = next(t for t in found if t[0] == ["key", "value"])
    assert ["pet_config.target_modules", r"`.*wq\|.*wv`"] in config


def test_png_is_a_real_plot_of_the_data(
    written: tuple[dict[str, Any], report_mod.ReportResult], tmp_path: Path
) -> None:
    _, result = written
    assert result.plot_path == str(Path(result.json_path).with_name("loss_curve.png"))
    data = Path(result.plot_path).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = imread(result.plot_path)
    width, height = PLOT_SIZE_INCHES
    assert pixels.shape[:2] == (round(height * PLOT_DPI), round(width * PLOT_DPI))
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10

    def render(name: str, series: list[dict[str, Any]], **kw: Any) -> np.ndarray:
        return imread(plot_losses(series, eval_series(), tmp_path / name, **kw))

    a = render("a.png", loss_series(seed=1))
    assert np.array_equal(a, render("a_again.png", loss_series(seed=1)))
    assert not np.array_equal(a, render("b.png", loss_series(seed=2)))
    assert not np.array_equal(a, render("rising.png", loss_series(seed=1, start=1.0, end=3.0)))
    assert not np.array_equal(a, render("base.png", loss_series(seed=1), base_eval_loss=2.1))


@pytest.mark.parametrize("breaks", ["loss_png", "markdown_of"])
def test_failed_report_leaves_the_previous_one_untouched(
    written: tuple[dict[str, Any], report_mod.ReportResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    breaks: str,
) -> None:
    """The plot or the markdown failing: nothing of the new report is written (nor a temp file)."""
    inputs, result = written
    folder = Path(result.json_path).parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) == {"report.json", "report.md", "loss_curve.png"}

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{breaks} failed")

    monkeypatch.setattr(report_files, breaks, broken)  # what write_report calls
    changed = dict(inputs, run={**inputs["run"], "run_id": "second"})
    with pytest.raises(RuntimeError, match=f"{breaks} failed"):
        write_report(folder, **changed)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp file either

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        write_report(fresh, **changed)
    assert not fresh.exists() or list(fresh.iterdir()) == []


def test_nan_loss_is_null_in_json_and_a_gap_in_the_plot(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    series = inputs["train"]["loss_series"]
    series[4]["loss"] = math.nan
    series[6]["loss"] = math.inf
    inputs["train"]["eval_series"][1]["perplexity"] = math.inf
    inputs["train"]["final_loss"] = math.nan
    result = write_report(tmp_path / "out", **inputs)

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in report.json")

    report = json.loads(Path(result.json_path).read_text(), parse_constant=no_constants)
    losses = [item["loss"] for item in report["train"]["loss_series"]]
    assert losses[4] is None and losses[6] is None
    assert [v for i, v in enumerate(losses) if i not in (4, 6)] == [
        item["loss"] for i, item in enumerate(series) if i not in (4, 6)
    ]
    assert report["train"]["final_loss"] is None
    assert report["train"]["eval_series"][1]["perplexity"] is None
    assert result.plot_path and imread(result.plot_path).shape[0] > 0
    md = Path(result.markdown_path).read_text()
    assert "Non-finite train loss** at 2 step(s): 5, 7" in md
    # the NaN also plots when passed straight to plot_losses
    assert plot_losses(series, [], tmp_path / "nan.png").is_file()


def test_missing_pieces_are_not_run_rather_than_errors(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    folder = tmp_path / "out"
    write_report(folder, **inputs)
    assert (folder / "loss_curve.png").exists()

    train = {
        k: v for k, v in inputs["train"].items() if k not in ("eval_series", "eval_loss", "eval_perplexity")
    }
    partial = dict(inputs, data={"records_written": 3}, evaluation=None, train=train)
    result = write_report(folder, **partial)
    md = Path(result.markdown_path).read_text()
    assert "Not run" in section(md, "Evaluation")
    assert "| truncated to seq_length | — |" in section(md, "Data")
    assert "Eval loss: not run" in result.summary

    result = write_report(folder, **dict(partial, train=None, data=None, stages=[], outputs={}))
    md = Path(result.markdown_path).read_text()
    assert result.plot_path is None
    assert not (folder / "loss_curve.png").exists()  # the earlier run's curve is not left behind
    assert "No plot: no train summary was given." in md
    assert "Not run" in section(md, "Data") and "Not run" in section(md, "Training")
    assert "Loss curve: — (no train summary was given)" in result.summary
    assert json.loads(Path(result.json_path).read_text())["report"]["plot"] is None


def test_summary_text_names_the_adapter_plot_and_losses(
    written: tuple[dict[str, Any], report_mod.ReportResult],
) -> None:
    inputs, result = written
    text = result.summary
    assert text == summary_text(json.loads(Path(result.json_path).read_text()))
    assert 8 <= len(text.splitlines()) <= 16
    assert f"Adapter: {inputs['outputs']['adapter']}" in text
    assert f"Loss curve: {result.plot_path}" in text
    assert f"Report: {result.markdown_path}" in text
    ev = inputs["evaluation"]
    assert f"base {ev['base']['eval_loss']:.4f} -> fine-tuned {ev['finetuned']['eval_loss']:.4f}" in text
    assert f"first {inputs['train']['loss_series'][0]['loss']:.4f}" in text
    for stage in inputs["stages"]:
        line = next(line for line in text.splitlines() if line.split()[:1] == [stage.name])
        assert line.endswith("cache hit") == (stage.cached is True)


def test_expected_answers_are_checked_side_by_side_and_counted(tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path)
    for side, rights in (("base", (False, False)), ("finetuned", (True, False))):
        for gen, right in zip(inputs["evaluation"][side]["generations"], rights, strict=True):
            gen |= {"expect": "Eat | well", "right": right}
    result = write_report(tmp_path / "report", **inputs)
    assert "Answers: 0/2 right before, 1/2 after" in result.summary
    md = Path(result.markdown_path).read_text()
    assert "**Answers right** (holding their expected text): 0/2 → 1/2" in section(md, "Summary")
    _, outside = fenced_blocks(md)
    (table,) = [t for t in tables(outside) if t[0][0] == "prompt"]
    assert table[0] == ["prompt", "expected", "before (base model)", "after (fine-tuned)"]
    assert [row[1] for row in table[2:]] == [r"`Eat \| well`"] * 2
    assert [(row[2][0], row[3][0]) for row in table[2:]] == [("✗", "✓"), ("✗", "✗")]
    assert {len(row) for row in table} == {4}  # the tricky output's pipes stay inside its cell


def test_cli_prints_the_summary(
    written: tuple[dict[str, Any], report_mod.ReportResult],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, result = written
    from llama_core.cli import exit_code

    for arg in (result.json_path, str(Path(result.json_path).parent), str(tmp_path)):  # run dir: report/
        assert exit_code(report_mod.main, [arg]) == 0
        assert capsys.readouterr().out.strip() == result.summary
    assert exit_code(report_mod.main, [str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_view_model_is_the_reports_figures_and_its_xcom_stays_small(
    written: tuple[dict[str, Any], report_mod.ReportResult],
) -> None:
    inputs, result = written
    report = load_report(result.json_path)
    view = result.view
    assert view == report_view(report)
    assert json.loads(json.dumps(view, allow_nan=False)) == view  # plain JSON, as an XCom stores it
    ev = inputs["evaluation"]
    assert view["summary"]["eval"]["ft_loss"] == ev["finetuned"]["eval_loss"]
    assert [r["name"] for r in view["stages"]["rows"]] == [s.name for s in inputs["stages"]]
    assert view["adapter"] == inputs["outputs"]["adapter"]
    assert [p["prompt"] for p in view["evaluation"]["prompts"]] == PROMPTS
    assert bounded_view(view) == {**view, "clipped": False}

    # many long answers: the XCom's copy clips them, then leaves the last ones off, never past the bound
    long = "word " * 2000
    report["evaluation"]["prompts"] = prompts = [f"prompt {i}: {long}" for i in range(200)]
    for side in ("base", "finetuned"):
        report["evaluation"][side]["generations"] = [{"prompt": p, "output": long} for p in prompts]
    big = report_view(report)
    assert view_size(big) > 1_000_000
    small = bounded_view(big)
    assert view_size(small) <= VIEW_MAX_BYTES < 64 * 1024 and small["clipped"]
    assert (small["summary"], small["stages"], small["outputs"]) == (
        big["summary"],
        big["stages"],
        big["outputs"],
    )
    kept = len(small["evaluation"]["prompts"])
    assert kept > 0 and kept + small["evaluation"]["prompts_left_off"] == len(prompts)
    assert big == report_view(report)  # the whole view is left as it was
    # no evaluation but huge params: the run's fields go, its id stays
    report["evaluation"], report["run"]["params"] = None, {f"p{i}": long for i in range(20)}
    small = bounded_view(report_view(report))
    assert view_size(small) <= VIEW_MAX_BYTES and small["run"] == {
        "run_id": inputs["run"]["run_id"],
        "fields": [],
    }
