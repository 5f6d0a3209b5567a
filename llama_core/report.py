"""The run report: what a fine-tune hands back to the ML engineer, in one folder per run.

A run's results are spread over many stages (cache hits, the data report, train_summary.json, the
before/after evaluation, the adapter and checkpoints). `write_report` gathers them into
`report.json` (everything, machine-readable), `report.md` (the same for a person, in a terminal or
on GitHub) and `loss_curve.png`; `summary_text` is the short block for a task log or a terminal.
Each file is written atomically, report.json last: it is the one that says the report is complete.

CLI: python -m llama_core.report REPORT_JSON_OR_RUN_DIR prints the summary of an existing report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_core.atomic import remove_path, write_bytes_atomic
from llama_core.cli import exit_code
from llama_core.errors import InputError
from llama_core.progress import human_seconds
from llama_core.results import to_jsonable

REPORT_VERSION = 1
JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
PLOT_NAME = "loss_curve.png"
PLOT_SIZE_INCHES = (8.0, 4.5)
PLOT_DPI = 120
SMOOTH_FROM_POINTS = 20  # train series this long also get a smoothed line

# The config values a reader needs to tell two runs apart (the whole config is in report.json).
KEY_CONFIG_VALUES = (
    "run_mode",
    "seed",
    "load_checkpoint",
    "runner_config.epochs",
    "runner_config.batch_size",
    "runner_config.gradient_accumulation_steps",
    "runner_config.length_buckets",
    "lr_schedule.type",
    "lr_schedule.learning_rate",
    "lr_schedule.warmup_ratio",
    "lr_schedule.lr_end",
    "lr_schedule.total_steps",
    "optimizer.type",
    "optimizer.weight_decay",
    "runner_wrapper.max_grad_norm",
    "parallel_config.data_parallel",
    "model.model_config.seq_length",
    "do_eval",
    "eval_step_interval",
)


@dataclass
class Stage:
    """One pipeline stage (task) of the run."""

    name: str  # e.g. "fetch_alpaca", "tokenize_to_mindrecord", "finetune"
    seconds: float | None
    cached: bool | None  # True: cache hit (the work was already done); None: not a cached stage
    outputs: dict[str, str] = field(default_factory=dict)  # label -> path


@dataclass
class ReportResult:
    """The report's files (`plot_path` None when there was no train loss to plot) and its summary."""

    markdown_path: str
    json_path: str
    plot_path: str | None
    summary: str


# -- JSON


def _json_safe(value: Any) -> Any:
    """`value` as strict JSON values: NaN and infinities become None, paths and dates strings."""
    value = to_jsonable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    return str(value)


def _canonical_json(value: Any) -> str:
    return json.dumps(
        _json_safe(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of the resolved config as canonical JSON: sorted keys, no spaces, UTF-8."""
    return hashlib.sha256(_canonical_json(config).encode("utf-8")).hexdigest()


# -- reading the report's pieces (all tolerant of missing keys)


def _get(mapping: Any, dotted: str, default: Any = None) -> Any:
    """`mapping["a"]["b"]` for "a.b"; `default` when a level is missing or not a mapping."""
    for key in dotted.split("."):
        if not isinstance(mapping, Mapping) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def _num(value: Any) -> float | None:
    """A finite number, or None (missing, null, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any) -> Any:
    """A count reported either as a number or as {"count": n, ...}."""
    return value.get("count") if isinstance(value, Mapping) else value


def _series(items: Any) -> list[tuple[float, float]]:
    """(step, loss) pairs of a loss or eval series; a missing step is the item's position (1-based),
    a missing or null loss is NaN (drawn as a gap)."""
    pairs = []
    for i, item in enumerate(items or []):
        if not isinstance(item, Mapping):
            continue
        step = _num(item.get("step"))
        loss = _num(item.get("loss"))
        pairs.append((float(i + 1) if step is None else step, math.nan if loss is None else loss))
    return pairs


def _finite_losses(items: Any) -> list[tuple[float, float]]:
    return [(s, v) for s, v in _series(items) if math.isfinite(v)]


def _sorted_outputs(outputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Outputs with the adapter(s) first, the rest in the given order."""
    items = list(outputs.items())
    return [kv for kv in items if "adapter" in kv[0].lower()] + [
        kv for kv in items if "adapter" not in kv[0].lower()
    ]


def _adapter_path(report: Mapping[str, Any]) -> str | None:
    for label, path in _sorted_outputs(report.get("outputs") or {}):
        if "adapter" in label.lower():
            return path
    return None


def _cache_counts(stages: Sequence[Mapping[str, Any]]) -> tuple[float | None, int, int]:
    """(sum of the stages' seconds or None, cache hits, stages that have a cache)."""
    seconds = [_num(s.get("seconds")) for s in stages]
    known = [s for s in seconds if s is not None]
    hits = sum(1 for s in stages if s.get("cached") is True)
    cacheable = sum(1 for s in stages if s.get("cached") is not None)
    return (sum(known) if known else None), hits, cacheable


def _finetune_seconds(report: Mapping[str, Any]) -> float | None:
    """Wall time of the fine-tune: its stage's time (the longest node of a multi-node one)."""
    times = [
        _num(s.get("seconds"))
        for s in report.get("stages") or []
        if str(s.get("name", "")).startswith("finetune")
    ]
    times = [t for t in times if t is not None]
    return max(times) if times else None


def _eval_losses(report: Mapping[str, Any]) -> dict[str, Any]:
    """Base and fine-tuned eval loss/perplexity; the fine-tuned ones fall back to the training's
    final eval when there was no separate evaluation."""
    ev = report.get("evaluation") or {}
    train = report.get("train") or {}
    out = {
        "base_loss": _num(_get(ev, "base.eval_loss")),
        "base_ppl": _num(_get(ev, "base.eval_perplexity")),
        "ft_loss": _num(_get(ev, "finetuned.eval_loss")),
        "ft_ppl": _num(_get(ev, "finetuned.eval_perplexity")),
        "ft_source": "evaluation",
    }
    if out["ft_loss"] is None and _num(train.get("eval_loss")) is not None:
        out.update(
            ft_loss=_num(train.get("eval_loss")),
            ft_ppl=_num(train.get("eval_perplexity")),
            ft_source="training's final eval",
        )
    return out


# -- formatting


def _fmt_loss(value: Any) -> str:
    v = _num(value)
    return "—" if v is None else f"{v:.4f}"


def _fmt_ppl(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 1e4 else f"{v:.3e}"


def _fmt_int(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "—"
    return f"{v:,.0f}" if v == int(v) else f"{v:,}"


def _fmt_seconds(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "—"
    return f"{v:.1f}s" if v < 10 else human_seconds(v)


def _fmt_rate(value: Any) -> str:
    v = _num(value)
    return "—" if v is None else f"{v:,.0f} tokens/s"


def _fmt_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _change(before: float | None, after: float | None, digits: int = 4) -> str:
    """'-0.5719, -27.2%' for before 2.1040, after 1.5321; '' when either is unknown."""
    if before is None or after is None:
        return ""
    delta = after - before
    text = f"{delta:+.{digits}f}"
    if before != 0:
        text += f", {100 * delta / before:+.1f}%"
    return text


# -- markdown


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)


def _code(text: Any) -> str:
    """An inline code span holding `text` whatever backticks it contains (newlines become spaces)."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    if not text:
        return "(empty)"
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fenced(text: Any, info: str = "text") -> str:
    """A fenced block that `text` cannot close: the fence is longer than its longest backtick run."""
    text = str(text)
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _cell(text: Any) -> str:
    """Table cell content: one line, pipes escaped (GitHub reads `\\|` as a pipe, in code spans too)."""
    return str(text).replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_summary(report: Mapping[str, Any]) -> list[str]:
    train = report.get("train") or {}
    ev = _eval_losses(report)
    lines = ["## Summary", ""]
    first = _finite_losses(train.get("loss_series"))
    final = _num(train.get("final_loss"))
    if final is None and first:
        final = first[-1][1]
    if train:
        start = f"{first[0][1]:.4f} at step {first[0][0]:g} → " if first else ""
        lines.append(f"- **Train loss**: {start}{_fmt_loss(final)} (final)")
    else:
        lines.append("- **Train loss**: not run (no train summary)")
    if ev["base_loss"] is None and ev["ft_loss"] is None:
        lines.append("- **Eval loss**: not run")
    else:
        change = _change(ev["base_loss"], ev["ft_loss"])
        source = "" if ev["ft_source"] == "evaluation" else f" ({ev['ft_source']})"
        lines.append(
            f"- **Eval loss** (base → fine-tuned): {_fmt_loss(ev['base_loss'])} → "
            f"{_fmt_loss(ev['ft_loss'])}{source}" + (f" ({change})" if change else "")
        )
        change = _change(ev["base_ppl"], ev["ft_ppl"], digits=2)
        lines.append(
            f"- **Eval perplexity**: {_fmt_ppl(ev['base_ppl'])} → {_fmt_ppl(ev['ft_ppl'])}"
            + (f" ({change})" if change else "")
        )
    if train:
        steps = f"{_fmt_int(train.get('steps'))}"
        extra = []
        if train.get("steps_this_run") is not None and train.get("steps_this_run") != train.get("steps"):
            extra.append(f"{_fmt_int(train.get('steps_this_run'))} this run")
        if train.get("total_steps") is not None:
            extra.append(f"of {_fmt_int(train.get('total_steps'))} planned")
        lines.append(f"- **Steps**: {steps}" + (f" ({', '.join(extra)})" if extra else ""))
    lines.append(f"- **Fine-tune wall time**: {_fmt_seconds(_finetune_seconds(report))}")
    if train:
        lines.append(
            f"- **Throughput**: {_fmt_rate(train.get('tokens_per_second_per_device'))} per device, "
            f"{_fmt_rate(train.get('tokens_per_second_total'))} total "
            f"({_fmt_int(train.get('world_size'))} devices)"
        )
    bad = [s for s, v in _series(train.get("loss_series")) if not math.isfinite(v)]
    if bad:
        shown = ", ".join(f"{s:g}" for s in bad[:10]) + (", …" if len(bad) > 10 else "")
        lines.append(f"- **Non-finite train loss** at {len(bad)} step(s): {shown} (null in report.json)")
    if _get(report, "report.plot"):
        lines.append(f"- **Loss curve**: [{PLOT_NAME}]({PLOT_NAME})")
    return lines


def _md_stages(report: Mapping[str, Any]) -> list[str]:
    stages = report.get("stages") or []
    lines = ["## Stages", ""]
    if not stages:
        return [*lines, "No stage was recorded."]
    hit = {True: "yes", False: "no", None: "—"}
    rows = [
        (_code(s.get("name", "?")), _fmt_seconds(s.get("seconds")), hit.get(s.get("cached"), "—"))
        for s in stages
    ]
    total, hits, cacheable = _cache_counts(stages)
    rows.append(("**total**", _fmt_seconds(total), f"{hits} of {cacheable}"))
    lines.append(_table(("stage", "time", "cache hit"), rows, (":---", "---:", ":---:")))
    lines += [
        "",
        f"{len(stages)} stages, {_fmt_seconds(total)} of task time in all (stages may overlap); "
        f"{hits} of the {cacheable} cached stages were cache hits (their work was already done).",
    ]
    return lines


def _md_outputs(report: Mapping[str, Any]) -> list[str]:
    rows = [(label, _code(path)) for label, path in _sorted_outputs(report.get("outputs") or {})]
    seen = {str(p) for _, p in (report.get("outputs") or {}).items()}
    for stage in report.get("stages") or []:
        for label, path in (stage.get("outputs") or {}).items():
            if str(path) not in seen:
                seen.add(str(path))
                rows.append((f"{stage.get('name', '?')}: {label}", _code(path)))
    lines = ["## Outputs", ""]
    return [*lines, _table(("output", "path"), rows)] if rows else [*lines, "No output was recorded."]


def _generation(gens: Any, prompt: str, index: int) -> str | None:
    """The output for `prompt` in a list of {"prompt", "output"}: by prompt, else by position."""
    gens = [g for g in gens or [] if isinstance(g, Mapping)]
    for g in gens:
        if g.get("prompt") == prompt:
            return g.get("output")
    return gens[index].get("output") if index < len(gens) else None


def _md_evaluation(report: Mapping[str, Any]) -> list[str]:
    ev = report.get("evaluation")
    lines = ["## Evaluation", ""]
    if not isinstance(ev, Mapping) or not ev:
        return [
            *lines,
            "Not run: this run had no before/after evaluation.",
            "",
            "### Generations",
            "",
            "Not run.",
        ]
    if ev.get("eval_data"):
        lines += [f"Eval data: {_code(ev['eval_data'])}", ""]
    losses = _eval_losses(report)
    rows = []
    for label, key in (("base", "base"), ("fine-tuned", "finetuned")):
        part = ev.get(key) if isinstance(ev.get(key), Mapping) else None
        if part is None:
            rows.append((label, "not run", "—", "—"))
            continue
        ckpt = _code(part["checkpoint"]) if part.get("checkpoint") else "—"
        rows.append((label, ckpt, _fmt_loss(part.get("eval_loss")), _fmt_ppl(part.get("eval_perplexity"))))
    rows.append(
        (
            "change",
            "",
            _change(losses["base_loss"], _num(_get(ev, "finetuned.eval_loss"))) or "—",
            _change(losses["base_ppl"], _num(_get(ev, "finetuned.eval_perplexity")), digits=2) or "—",
        )
    )
    lines.append(
        _table(("model", "checkpoint", "eval loss", "perplexity"), rows, (":---", ":---", "---:", "---:"))
    )
    lines += ["", "### Generations", ""]
    base_gens, ft_gens = _get(ev, "base.generations"), _get(ev, "finetuned.generations")
    prompts = list(ev.get("prompts") or [])
    if not prompts:
        prompts = [g.get("prompt") for g in (ft_gens or base_gens or []) if isinstance(g, Mapping)]
    if not prompts:
        return [*lines, "Not run: no prompt was given."]
    if ev.get("max_new_tokens") is not None:
        lines += [f"Up to {ev['max_new_tokens']} new tokens per prompt.", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"#### Prompt {i + 1}", "", _fenced(prompt), ""]
        for label, gens in (("Before (base model)", base_gens), ("After (fine-tuned)", ft_gens)):
            out = _generation(gens, prompt, i)
            lines += [f"{label}:", ""]
            if out is None:
                lines += ["Not run.", ""]
            elif not out.strip():
                lines += ["(no text: the model ended its answer at once)", ""]
            else:
                lines += [_fenced(out), ""]
    return lines[:-1]


def _md_data(report: Mapping[str, Any]) -> list[str]:
    data = report.get("data")
    lines = ["## Data", ""]
    if not isinstance(data, Mapping) or not data:
        return [*lines, "Not run: no data report (tokenize stage) was given."]
    rows: list[tuple[str, str]] = [("records written", _fmt_int(data.get("records_written")))]
    holdout = data.get("holdout")
    if isinstance(holdout, Mapping):
        text = _fmt_int(holdout.get("records"))
        extra = []
        if _num(holdout.get("fraction")) is not None:
            extra.append(f"{100 * holdout['fraction']:g}% of the records")
        if holdout.get("supervised_tokens") is not None:
            extra.append(f"{_fmt_int(holdout['supervised_tokens'])} supervised tokens")
        if extra:
            text += f" ({', '.join(extra)})"
        if holdout.get("output_file"):
            text += f" in {_code(holdout['output_file'])}"
        rows.append(("held-out records", text))
    else:
        rows.append(("held-out records", "none"))
    masked = data.get("records_fully_masked")
    text = _fmt_int(_count(masked))
    ids = masked.get("first_ids") if isinstance(masked, Mapping) else None
    if ids:
        text += " (first: " + ", ".join(_code(i) for i in ids[:5]) + (", …" if len(ids) > 5 else "") + ")"
    rows.append(("fully masked (no supervised token)", text))
    rows.append(("truncated to seq_length", _fmt_int(_count(data.get("records_truncated")))))
    rows.append(("supervised tokens", _fmt_int(data.get("supervised_tokens"))))
    rows.append(("seq_length", _fmt_int(data.get("seq_length"))))
    packing = data.get("packing")
    if isinstance(packing, Mapping) and packing:
        mode = packing.get("mode", "?")
        text = "one record per row (MindFormers' records)" if mode == "none" else f"packing {mode}"
        if mode != "none":
            parts = []
            if packing.get("documents") is not None and packing.get("rows") is not None:
                parts.append(f"{_fmt_int(packing['documents'])} records in {_fmt_int(packing['rows'])} rows")
            if _num(packing.get("fill_ratio")) is not None:
                parts.append(f"fill {packing['fill_ratio']:.1%}")
            if packing.get("documents_per_row_mean") is not None:
                parts.append(f"{packing['documents_per_row_mean']} records per row on average")
            text += (": " + ", ".join(parts)) if parts else ""
        rows.append(("layout", text))
    else:
        rows.append(("layout", "—"))
    for key, label in (
        ("dataset_type", "dataset type"),
        ("chat_template", "chat template"),
        ("masking", "masking"),
    ):
        if data.get(key) is not None:
            rows.append((label, str(data[key])))
    if data.get("output_file"):
        rows.append(("MindRecord", _code(data["output_file"])))
    return [*lines, _table(("", "value"), rows, (":---", ":---"))]


def _md_training(report: Mapping[str, Any]) -> list[str]:
    train = report.get("train")
    lines = ["## Training", ""]
    if not isinstance(train, Mapping) or not train:
        return [*lines, "Not run: no train summary was given."]
    rows: list[tuple[str, str]] = [
        ("world size", _fmt_int(train.get("world_size"))),
        ("global batch", _fmt_int(train.get("global_batch_size"))),
    ]
    if train.get("gradient_accumulation_steps") is not None:
        rows.append(("gradient accumulation", _fmt_int(train["gradient_accumulation_steps"])))
    rows += [
        ("seq_length", _fmt_int(train.get("seq_length"))),
        ("steps", _fmt_int(train.get("steps"))),
        ("tokens/s per device", _fmt_rate(train.get("tokens_per_second_per_device"))),
        ("tokens/s total", _fmt_rate(train.get("tokens_per_second_total"))),
        ("final train loss", _fmt_loss(train.get("final_loss"))),
        ("eval loss (training)", _fmt_loss(train.get("eval_loss"))),
    ]
    evals = _series(train.get("eval_series"))
    rows.append(("evals during training", f"{len(evals)}" if evals else "none"))
    buckets = train.get("length_buckets")
    if isinstance(buckets, Mapping) and buckets:
        if buckets.get("enabled"):
            text = "on: " + ", ".join(str(s) for s in buckets.get("sizes") or [])
            per = buckets.get("micro_batches_per_bucket")
            if isinstance(per, Mapping) and per:
                text += "; micro-batches " + ", ".join(f"{k}: {v}" for k, v in per.items())
        else:
            text = "off (every batch at seq_length)"
        if buckets.get("compiles") is not None:
            text += (
                f"; {buckets['compiles']} graph(s) compiled, first calls "
                f"{_fmt_seconds(buckets.get('compile_seconds'))}"
            )
        rows.append(("length buckets", text))
    if train.get("resumed_from"):
        rows.append(("resumed from", _code(train["resumed_from"])))
    if train.get("last_checkpoint"):
        rows.append(("last checkpoint", _code(train["last_checkpoint"])))
    return [*lines, _table(("", "value"), rows, (":---", ":---"))]


def _md_config(report: Mapping[str, Any]) -> list[str]:
    cfg = report.get("config") or {}
    resolved = cfg.get("resolved") or {}
    lines = [
        "## Config",
        "",
        f"- **File**: {_code(cfg['path']) if cfg.get('path') else '—'}",
        f"- **Digest** (sha256 of the resolved config): {_code(cfg.get('digest', '—'))}",
        "",
    ]
    pet = _get(resolved, "model.model_config.pet_config") or resolved.get("pet_config")
    rows = (
        [(f"pet_config.{k}", _code(_fmt_value(v))) for k, v in pet.items()]
        if isinstance(pet, Mapping)
        else []
    )
    if not rows:
        rows.append(("pet_config", "none (all weights trained)"))
    missing = object()
    for key in KEY_CONFIG_VALUES:
        value = _get(resolved, key, missing)
        if value is not missing:
            rows.append((key, _code(_fmt_value(value))))
    lines.append(_table(("key", "value"), rows, (":---", ":---")))
    lines += ["", "The whole resolved config is in report.json (`config.resolved`)."]
    return lines


def _md_plot(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Loss curve", ""]
    if _get(report, "report.plot"):
        return [*lines, f"![loss curve]({PLOT_NAME})"]
    return [*lines, f"No plot: {_get(report, 'report.plot_note') or 'no train loss series'}."]


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md's text for a report (report.json's content)."""
    run = report.get("run") or {}
    run_id = run.get("run_id") or "(no run id)"
    lines = [f"# Fine-tune report: {_code(run_id)}", ""]
    for key, value in run.items():
        lines.append(f"- **{key}**: {_code(_fmt_value(value))}")
    if report.get("generated_at"):
        lines.append(f"- **report generated**: {_code(report['generated_at'])}")
    for section in (_md_summary, _md_stages, _md_outputs, _md_evaluation, _md_data, _md_training):
        lines += ["", *section(report)]
    lines += ["", *_md_config(report), "", *_md_plot(report)]
    return "\n".join(lines) + "\n"


# -- summary text


def summary_text(report: Mapping[str, Any]) -> str:
    """The short block for a task log or a terminal, from a report (report.json's content)."""
    run = report.get("run") or {}
    stages = report.get("stages") or []
    total, hits, cacheable = _cache_counts(stages)
    lines = [f"Fine-tune report for run {run.get('run_id') or '(no run id)'}"]
    lines.append(
        f"Stages: {len(stages)}, {_fmt_seconds(total)} in all, {hits} of {cacheable} cached stages hit"
    )
    width = max((len(str(s.get("name", ""))) for s in stages), default=0)
    note = {True: "cache hit", False: "computed", None: ""}
    for s in stages:
        lines.append(
            f"  {s.get('name', '?')!s:<{width}}  {_fmt_seconds(s.get('seconds')):>8}  "
            f"{note.get(s.get('cached'), '')}".rstrip()
        )
    ev = _eval_losses(report)
    if ev["base_loss"] is None and ev["ft_loss"] is None:
        lines.append("Eval loss: not run")
    else:
        change = _change(ev["base_loss"], ev["ft_loss"])
        source = "" if ev["ft_source"] == "evaluation" else f" ({ev['ft_source']})"
        lines.append(
            f"Eval loss: base {_fmt_loss(ev['base_loss'])} -> fine-tuned {_fmt_loss(ev['ft_loss'])}{source}"
            + (f" ({change})" if change else "")
        )
        lines.append(
            f"Eval perplexity: base {_fmt_ppl(ev['base_ppl'])} -> fine-tuned {_fmt_ppl(ev['ft_ppl'])}"
        )
    train = report.get("train") or {}
    finite = _finite_losses(train.get("loss_series"))
    final = _num(train.get("final_loss"))
    if final is None and finite:
        final = finite[-1][1]
    if finite:
        lines.append(
            f"Train loss: first {finite[0][1]:.4f} (step {finite[0][0]:g}) -> final {_fmt_loss(final)} "
            f"({_fmt_int(train.get('steps'))} steps)"
        )
    else:
        lines.append(f"Train loss: {'not run' if not train else 'final ' + _fmt_loss(final)}")
    paths = report.get("report") or {}
    lines.append(f"Adapter: {_adapter_path(report) or '— (no adapter among the outputs)'}")
    lines.append(f"Loss curve: {paths.get('plot') or '— (' + (paths.get('plot_note') or 'no plot') + ')'}")
    lines.append(f"Report: {paths.get('markdown') or '—'}")
    return "\n".join(lines)


# -- the plot


def _smoothed(values: list[float]) -> tuple[list[float], int]:
    """A centred moving average (the window shrinks at the ends) and its window."""
    n = len(values)
    half = max(2, n // 40)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out, 2 * half + 1


def _loss_png(
    train_series: Any, eval_series: Any, *, base_eval_loss: float | None = None, title: str = ""
) -> bytes:
    """The loss curve as PNG bytes (Agg canvas of its own: no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = _series(train_series)
    finite = [(s, v) for s, v in train if math.isfinite(v)]
    evals = [(s, v) for s, v in _series(eval_series) if math.isfinite(v)]
    if not finite and not evals:
        raise ValueError("nothing to plot: no finite train or eval loss")
    fig = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        bad = len(train) - len(finite)
        label = "train loss" + (f" ({bad} non-finite step(s) not drawn)" if bad else "")
        smooth = len(finite) >= SMOOTH_FROM_POINTS
        ax.plot(
            [s for s, _ in train],
            [v for _, v in train],
            color="tab:blue",
            linewidth=1.0 if smooth else 1.6,
            alpha=0.35 if smooth else 1.0,
            marker="" if len(train) > 40 else ".",
            markersize=4,
            label=label,
        )
        if smooth:
            values, window = _smoothed([v for _, v in finite])
            ax.plot(
                [s for s, _ in finite],
                values,
                color="tab:blue",
                linewidth=2.0,
                label=f"train loss, smoothed ({window}-step mean)",
            )
    if evals:
        ax.plot(
            [s for s, _ in evals],
            [v for _, v in evals],
            linestyle="none",
            marker="o",
            markersize=6,
            color="tab:orange",
            markeredgecolor="black",
            markeredgewidth=0.6,
            label="eval loss",
            zorder=3,
        )
        last_step, last = evals[-1]
        ax.annotate(
            f"{last:.3f}",
            (last_step, last),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    base = _num(base_eval_loss)
    if base is not None:
        ax.axhline(
            base, color="dimgray", linestyle="--", linewidth=1.2, label=f"base model eval loss ({base:.3f})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per supervised token)")
    ax.set_title(title or "Fine-tune loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9, framealpha=1.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def plot_losses(
    train_series: Any,
    eval_series: Any,
    path: str | os.PathLike[str],
    *,
    base_eval_loss: float | None = None,
    title: str = "",
) -> Path:
    """Write the loss curve PNG to `path` atomically: train loss per step (and a smoothed line when
    long), eval losses as markers, the base model's eval loss as a dashed line. NaN losses are gaps."""
    return write_bytes_atomic(
        path, _loss_png(train_series, eval_series, base_eval_loss=base_eval_loss, title=title)
    )


# -- the report


def _plot_note(train: Mapping[str, Any] | None) -> str | None:
    """Why there is no plot, or None when there is one to draw."""
    if not train:
        return "no train summary was given"
    series = _series(train.get("loss_series"))
    if not series:
        return "the train summary has no loss series"
    if not any(math.isfinite(v) for _, v in series):
        return "the train loss was not finite at any step"
    return None


def write_report(
    output_dir: str | os.PathLike[str],
    *,
    run: Mapping[str, Any],
    stages: Sequence[Stage],
    config: Mapping[str, Any],
    config_path: str | None,
    data: Mapping[str, Any] | None,
    train: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    outputs: Mapping[str, str],
) -> ReportResult:
    """Write report.json, report.md and loss_curve.png (when there is a train loss) into `output_dir`.

    Everything is rendered before anything is written, then each file is written atomically,
    report.json last; a failure leaves the previous report's files as they were.
    """
    out = Path(os.path.abspath(output_dir))
    json_path, md_path, png_path = out / JSON_NAME, out / MARKDOWN_NAME, out / PLOT_NAME
    train_safe = _json_safe(train) if train is not None else None
    note = _plot_note(train_safe)
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run": _json_safe(dict(run)),
        "stages": _json_safe(list(stages)),
        "outputs": _json_safe(dict(outputs)),
        "config": {"path": config_path, "digest": config_digest(config), "resolved": _json_safe(config)},
        "data": _json_safe(data) if data is not None else None,
        "train": train_safe,
        "evaluation": _json_safe(evaluation) if evaluation is not None else None,
        "report": {
            "json": str(json_path),
            "markdown": str(md_path),
            "plot": None if note else str(png_path),
            "plot_note": note,
        },
    }
    png = None
    if note is None:
        run_id = report["run"].get("run_id")
        png = _loss_png(
            train_safe.get("loss_series"),
            train_safe.get("eval_series"),
            base_eval_loss=_eval_losses(report)["base_loss"],
            title=f"Fine-tune loss: {run_id}" if run_id else "",
        )
    markdown = render_markdown(report).encode("utf-8")
    text = (json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    if png is not None:
        write_bytes_atomic(png_path, png)
    write_bytes_atomic(md_path, markdown)
    write_bytes_atomic(json_path, text)
    if png is None:
        remove_path(png_path)  # an earlier report's curve would not be this run's
    return ReportResult(
        markdown_path=str(md_path),
        json_path=str(json_path),
        plot_path=None if png is None else str(png_path),
        summary=summary_text(report),
    )


# -- CLI


def find_report(path: str | os.PathLike[str]) -> Path:
    """report.json itself, or the one in a folder (the folder, or its `report/` sub-folder)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / JSON_NAME, path / "report" / JSON_NAME):
            if candidate.is_file():
                return candidate
        raise InputError(f"{path}: no {JSON_NAME} in it (nor in {path / 'report'})")
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    return path


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of a report.json (or of the one in a run folder)."""
    path = find_report(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read a report: {exc}") from exc
    if not isinstance(report, dict):
        raise InputError(f"{path}: not a report (expected a JSON object)")
    return report


def build_parser(prog: str = "python -m llama_core.report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Print the summary of a fine-tune's report.")
    parser.add_argument("report", help="report.json, or the folder holding it (or a run folder with report/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    print(summary_text(load_report(build_parser().parse_args(argv).report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
