"""The report's one data model: every figure a reader sees, derived once from report.json.

`report_view` turns a report (report.json's content) into plain JSON data: the summary numbers, the
stage table with its cache hits, the outputs, the before/after evaluation, the data and training
figures. report.md and the summary text are templates over it (markdown.py) and the Airflow
"Fine-tune" tab shows the same data from the report task's `report` XCom, so the three cannot
disagree. Numbers stay numbers (None when unknown): formatting is the renderers' business.
Every reader here tolerates missing keys: a failed run's report has only some of its parts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from llama_core.report.sections import config_view, data_view, training_view
from llama_core.report.values import get, num, series

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
PLOT_NAME = "loss_curve.png"
NONFINITE_SHOWN = 10  # steps named in the summary's non-finite loss line; the count says the rest
# The view the report task pushes as an XCom stays well under the 64 KB an XCom row is comfortable
# with: model text (prompts, answers) is what can grow, so it is clipped first, then dropped.
VIEW_MAX_BYTES = 32_000
TEXT_LIMITS = (2000, 400, 80)  # characters kept of each text, tried in turn until the view fits


def change(before: float | None, after: float | None) -> dict[str, float | None] | None:
    """after - before, and as a percentage of before (None for a zero before); None when either is
    unknown."""
    if before is None or after is None:
        return None
    delta = after - before
    return {"delta": delta, "percent": 100 * delta / before if before != 0 else None}


def _eval_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """Base and fine-tuned eval loss/perplexity and their changes; the fine-tuned ones fall back to the
    training's final eval when there was no separate evaluation."""
    ev, train = report.get("evaluation") or {}, report.get("train") or {}
    out = {
        "base_loss": num(get(ev, "base.eval_loss")),
        "base_ppl": num(get(ev, "base.eval_perplexity")),
        "ft_loss": num(get(ev, "finetuned.eval_loss")),
        "ft_ppl": num(get(ev, "finetuned.eval_perplexity")),
        "ft_source": "evaluation",
    }
    if out["ft_loss"] is None and num(train.get("eval_loss")) is not None:
        out.update(
            ft_loss=num(train.get("eval_loss")),
            ft_ppl=num(train.get("eval_perplexity")),
            ft_source="training's final eval",
        )
    out["loss_change"] = change(out["base_loss"], out["ft_loss"])
    out["ppl_change"] = change(out["base_ppl"], out["ft_ppl"])
    return out


def _generation(gens: Any, prompt: Any, index: int) -> Mapping[str, Any]:
    """The entry for `prompt` in a list of {"prompt", "output"[, "expect", "right"]}: by prompt, else by
    position; {} when there is none."""
    gens = [g for g in gens or [] if isinstance(g, Mapping)]
    for g in gens:
        if g.get("prompt") == prompt:
            return g
    return gens[index] if index < len(gens) else {}


def _answer_counts(report: Mapping[str, Any]) -> dict[str, int] | None:
    """Answers holding their expected text, before and after, of the prompts that named one (None when
    no prompt did)."""
    ev = report.get("evaluation") or {}
    base, tuned = get(ev, "base.generations") or [], get(ev, "finetuned.generations") or []
    checks = [
        (b.get("right"), t.get("right"))
        for b, t in zip(base, tuned, strict=False)
        if "right" in b and "right" in t
    ]
    if not checks:
        return None
    right = sum(bool(b) for b, _ in checks), sum(bool(t) for _, t in checks)
    return {"right_before": right[0], "right_after": right[1], "checked": len(checks)}


def _train_summary(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """The training's headline figures; None when there was no train summary."""
    train = report.get("train") or {}
    if not train:
        return None
    points = series(train.get("loss_series"))
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    bad = [s for s, v in points if not math.isfinite(v)]
    final = num(train.get("final_loss"))
    steps, this_run = train.get("steps"), train.get("steps_this_run")
    return {
        "first": {"step": finite[0][0], "loss": finite[0][1]} if finite else None,
        "final_loss": finite[-1][1] if final is None and finite else final,
        "steps": steps,
        "steps_this_run": this_run if this_run is not None and this_run != steps else None,
        "total_steps": train.get("total_steps"),
        "tokens_per_second_per_device": train.get("tokens_per_second_per_device"),
        "tokens_per_second_total": train.get("tokens_per_second_total"),
        "world_size": train.get("world_size"),
        "nonfinite": {"count": len(bad), "first": bad[:NONFINITE_SHOWN]} if bad else None,
    }


def _stages(stages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stage table: each stage's time and cache hit (None: not a cached stage), and the totals."""
    seconds = [num(s.get("seconds")) for s in stages]
    known = [s for s in seconds if s is not None]
    finetune = [
        t
        for s, t in zip(stages, seconds, strict=True)
        if t is not None and str(s.get("name", "")).startswith("finetune")
    ]
    return {
        "rows": [
            {
                "name": str(s.get("name", "?")),
                "seconds": t,
                "cached": s.get("cached") if isinstance(s.get("cached"), bool) else None,
            }
            for s, t in zip(stages, seconds, strict=True)
        ],
        "total_seconds": sum(known) if known else None,
        "cache_hits": sum(1 for s in stages if s.get("cached") is True),
        "cached_stages": sum(1 for s in stages if s.get("cached") is not None),
        # the fine-tune's wall time: its stage's (the longest node's of a multi-node one)
        "finetune_seconds": max(finetune) if finetune else None,
    }


def _run_outputs(report: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The run's own outputs (label, path), the adapter(s) first, the rest in the given order."""
    items = list((report.get("outputs") or {}).items())
    return [kv for kv in items if "adapter" in kv[0].lower()] + [
        kv for kv in items if "adapter" not in kv[0].lower()
    ]


def _outputs(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """The run's outputs, then the stages' own outputs not listed already."""
    rows = [{"label": label, "path": str(path)} for label, path in _run_outputs(report)]
    seen = {row["path"] for row in rows}
    for stage in report.get("stages") or []:
        for label, path in (stage.get("outputs") or {}).items():
            if str(path) not in seen:
                seen.add(str(path))
                rows.append({"label": f"{stage.get('name', '?')}: {label}", "path": str(path)})
    return rows


def _answer(gen: Mapping[str, Any]) -> dict[str, Any]:
    """One model's answer to a prompt: its text (None: not run) and whether it held the expected text
    (None: nothing was expected)."""
    return {"output": gen.get("output"), "right": bool(gen["right"]) if "right" in gen else None}


def _evaluation(
    report: Mapping[str, Any], figures: Mapping[str, Any], counts: dict[str, int] | None
) -> dict[str, Any] | None:
    """The before/after evaluation: each model's loss and perplexity, and every prompt's answers."""
    ev = report.get("evaluation")
    if not isinstance(ev, Mapping) or not ev:
        return None
    models = []
    for label, key in (("base", "base"), ("fine-tuned", "finetuned")):
        part = ev.get(key) if isinstance(ev.get(key), Mapping) else None
        models.append(
            {
                "label": label,
                "run": part is not None,
                "checkpoint": (part or {}).get("checkpoint") or None,
                "eval_loss": num((part or {}).get("eval_loss")),
                "eval_perplexity": num((part or {}).get("eval_perplexity")),
            }
        )
    base_gens, ft_gens = get(ev, "base.generations"), get(ev, "finetuned.generations")
    prompts = list(ev.get("prompts") or [])
    if not prompts:
        prompts = [g.get("prompt") for g in (ft_gens or base_gens or []) if isinstance(g, Mapping)]
    answers = []
    for i, prompt in enumerate(prompts):
        base, tuned = _generation(base_gens, prompt, i), _generation(ft_gens, prompt, i)
        expect = tuned.get("expect") or base.get("expect") or None
        answers.append(
            {"prompt": prompt, "expect": expect, "base": _answer(base), "finetuned": _answer(tuned)}
        )
    return {
        "eval_data": ev.get("eval_data") or None,
        "models": models,
        # the table's change is the evaluation's own: no fallback to the training's eval here
        "loss_change": change(figures["base_loss"], models[1]["eval_loss"]),
        "ppl_change": change(figures["base_ppl"], models[1]["eval_perplexity"]),
        "max_new_tokens": ev.get("max_new_tokens"),
        "answer_counts": counts,
        "prompts": answers,
    }


def report_view(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a report (report.json's content), derived once, as plain JSON data."""
    run, paths = report.get("run") or {}, report.get("report") or {}
    figures, counts = _eval_figures(report), _answer_counts(report)
    stages = _stages(report.get("stages") or [])
    # the adapter handed back: a run output's, never a stage's (export_adapter's are listed too)
    adapter = next((path for label, path in _run_outputs(report) if "adapter" in label.lower()), None)
    return {
        "run": {"run_id": run.get("run_id") or None, "fields": [[k, v] for k, v in run.items()]},
        "generated_at": report.get("generated_at") or None,
        "summary": {
            "train": _train_summary(report),
            "eval": figures,
            "answer_counts": counts,
            "finetune_seconds": stages["finetune_seconds"],
        },
        "stages": stages,
        "outputs": _outputs(report),
        "adapter": adapter,
        "evaluation": _evaluation(report, figures, counts),
        "data": data_view(report.get("data")),
        "training": training_view(report.get("train")),
        "config": config_view(report.get("config") or {}),
        "files": {
            "json": paths.get("json"),
            "markdown": paths.get("markdown"),
            "plot": paths.get("plot") or None,
            "plot_note": paths.get("plot_note"),
        },
    }


def view_size(view: Mapping[str, Any]) -> int:
    """The view's size as the JSON an XCom stores."""
    return len(json.dumps(view, ensure_ascii=False).encode("utf-8"))


def _clip(value: Any, limit: int) -> Any:
    """`value` with every string longer than `limit` cut to it (and an ellipsis)."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    if isinstance(value, dict):
        return {k: _clip(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip(v, limit) for v in value]
    return value


def bounded_view(view: Mapping[str, Any], max_bytes: int = VIEW_MAX_BYTES) -> dict[str, Any]:
    """The view within `max_bytes` of JSON, for an XCom: whole when it fits; else the prompts and
    answers clipped, then the last prompts left off (`prompts_left_off`), then the run's fields (its
    params). `clipped` says so: report.md still has everything. `view` itself is left as it is."""
    out = {**view, "clipped": False}
    ev = view["evaluation"]
    for limit in TEXT_LIMITS if ev else ():
        if view_size(out) <= max_bytes:
            return out
        out = {**view, "clipped": True, "evaluation": {**ev, "prompts": _clip(ev["prompts"], limit)}}
    prompts = out["evaluation"]["prompts"] if ev else []  # a copy by now: _clip made it
    while prompts and view_size(out) > max_bytes:
        prompts.pop()
        out["evaluation"]["prompts_left_off"] = len(ev["prompts"]) - len(prompts)
    if view_size(out) > max_bytes:
        out = {**out, "clipped": True, "run": {"run_id": view["run"]["run_id"], "fields": []}}
    return out
