"""The report's files in a run folder: report.json (everything, machine-readable), report.md and
loss_curve.png, and reading a report.json back.

Everything is rendered before anything is written, then each file is written atomically, report.json
last: it is the one that says the report is complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_core.atomic import disk_full_stage, remove_path, write_bytes_atomic
from llama_core.errors import InputError
from llama_core.report.markdown import markdown_of, summary_of
from llama_core.report.model import JSON_NAME, MARKDOWN_NAME, PLOT_NAME, report_view
from llama_core.report.plot import loss_png
from llama_core.report.values import series
from llama_core.results import to_jsonable

REPORT_VERSION = 1


@dataclass
class Stage:
    """One pipeline stage (task) of the run."""

    name: str  # e.g. "fetch_alpaca", "tokenize_to_mindrecord", "finetune"
    seconds: float | None
    cached: bool | None  # True: cache hit (the work was already done); None: not a cached stage
    outputs: dict[str, str] = field(default_factory=dict)  # label -> path


@dataclass
class ReportResult:
    """The report's files (`plot_path` None when there was no train loss to plot), its summary and its
    data model (`report_view`: what the Airflow view shows)."""

    markdown_path: str
    json_path: str
    plot_path: str | None
    summary: str
    view: dict[str, Any]


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


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of the resolved config as canonical JSON: sorted keys, no spaces, UTF-8."""
    canonical = json.dumps(
        _json_safe(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _plot_note(train: Mapping[str, Any] | None) -> str | None:
    """Why there is no plot, or None when there is one to draw."""
    if not train:
        return "no train summary was given"
    points = series(train.get("loss_series"))
    if not points:
        return "the train summary has no loss series"
    if not any(math.isfinite(v) for _, v in points):
        return "the train loss was not finite at any step"
    return None


@disk_full_stage("report", "output_dir")
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

    A failure leaves the previous report's files as they were.
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
    view = report_view(report)
    png = None
    if note is None:
        run_id = view["run"]["run_id"]
        png = loss_png(
            train_safe.get("loss_series"),
            train_safe.get("eval_series"),
            base_eval_loss=view["summary"]["eval"]["base_loss"],
            title=f"Fine-tune loss: {run_id}" if run_id else "",
        )
    markdown = markdown_of(view).encode("utf-8")
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
        summary=summary_of(view),
        view=view,
    )


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
