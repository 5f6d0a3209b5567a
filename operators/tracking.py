"""MLflow tracking in the tasks (`llama_core.tracking`): the Airflow connection that names the server,
the DAG run's tags, and the two calls the finetune and report tasks make. Nothing here may fail a
task: a missing connection or a server that is down warns once and the task goes on untracked."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from operators.progress import XComPublisher

if TYPE_CHECKING:
    from llama_core.tracking import Tracker

logger = logging.getLogger(__name__)  # stdlib logging: it ends in the task log, as llama_core's does


def tracking_uri(conn: Any) -> str:
    """The tracking URI of an Airflow connection: its host when that is a URI (`http://mlflow:5000`),
    else `<http|https>://host[:port][/schema]` (the scheme from the connection type, http by default)."""
    host = conn.host or ""
    if "://" in host:
        return host
    scheme = conn.conn_type if conn.conn_type in ("http", "https") else "http"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{host}{port}" + (f"/{conn.schema}" if conn.schema else "")


def open_tracker(tracking: Mapping[str, Any] | None, context: Mapping[str, Any]) -> Tracker | None:
    """The tracker of this DAG run (None: the pipeline has no `tracking` section, or its connection
    cannot be read, which warns). `tracking` is the section: conn_id, experiment, register_model."""
    if not tracking:
        return None
    from airflow.sdk import BaseHook

    from llama_core.tracking import RUN_KEY_TAG, Tracker, TrackingTarget

    dag_run = context.get("dag_run")
    if dag_run is None:  # outside a DAG run there is no run to track
        return None
    try:
        uri = tracking_uri(BaseHook.get_connection(tracking["conn_id"]))
    except Exception as exc:  # AirflowNotFoundException, or the api-server unreachable
        logger.warning("MLflow tracking is off: connection %r not read (%s)", tracking["conn_id"], exc)
        return None
    logical_date = getattr(dag_run, "logical_date", None)
    tags = {
        RUN_KEY_TAG: f"{dag_run.dag_id}/{dag_run.run_id}",
        "airflow.dag_id": dag_run.dag_id,
        "airflow.run_id": dag_run.run_id,
        "airflow.logical_date": logical_date.isoformat() if logical_date else "",
    }
    target = TrackingTarget(uri, tracking.get("experiment") or dag_run.dag_id, tracking.get("register_model"))
    return Tracker(target, tags)


def run_params(cfg: Mapping[str, Any], data: Mapping[str, Any] | None) -> dict[str, str]:
    """The MLflow params of the run from its config as the ranks trained with it (`stages.run_config`,
    which the report writes too, so both tasks log equal values: MLflow refuses a param that changes)."""
    from llama_core.report import config_digest
    from llama_core.tracking import run_params as params_of

    return params_of(cfg, config_digest(cfg), data)


def start_finetune_tracking(
    tracking: Mapping[str, Any] | None,
    context: Mapping[str, Any],
    log: logging.Logger | Any,
    params: dict[str, str],
) -> XComPublisher | None:
    """A thread that sends what it is `offer`ed ("params", "progress", "summary") to the run's
    MLflow run, off the job's watch loop: a slow server delays only this thread."""
    tracker = open_tracker(tracking, context)
    if tracker is None:
        return None
    publisher = XComPublisher(tracker.publish, log, name="mlflow-tracking")
    publisher.start()
    publisher.offer("params", params)
    return publisher


def track_report(
    tracking: Mapping[str, Any] | None,
    context: Mapping[str, Any],
    *,
    cfg: Mapping[str, Any],
    data: Mapping[str, Any] | None,
    run_dir: Path,
    adapter: Path | None,
    failed: bool,
) -> None:
    """The report task's part: params, the series the fine-tune task may have missed (its server was
    down), report.md/report.json/loss_curve.png and the adapter as artifacts, the adapter registered
    (with `register_model`), and the run's end state."""
    import json

    tracker = open_tracker(tracking, context)
    if tracker is None:
        return
    tracker.log_params(run_params(cfg, data))
    summary = run_dir / "train_summary.json"
    if summary.is_file():
        tracker.log_summary(json.loads(summary.read_text()))
    files = [run_dir / name for name in ("report.md", "report.json", "loss_curve.png")]
    tracker.log_artifacts(files, {"adapter": adapter} if adapter else {})
    if adapter and adapter.is_dir():
        version = tracker.register("adapter")
        if version is not None:
            logger.info(
                "adapter registered in MLflow as %s version %s", tracker.target.register_model, version
            )
    tracker.finish(failed)
