"""MLflow tracking of a pipeline run (optional: a pipeline file's `tracking` section).

One MLflow run per Airflow DAG run, found again by its tags, so the fine-tune task (live metrics from
rank 0's progress, then the trainer's whole series) and the report task (params, artifacts, the
registered adapter) fill the same run, and a retried fine-tune continues it. It holds the resolved
config flattened into params with its digest and the data statistics, per-step metrics (`loss`,
`eval_loss`, `learning_rate`, `tokens_per_s`), and the report, loss curve and adapter as artifacts.

Tracking is for watching: it must never fail nor slow the fine-tune. Every call has a short HTTP
time-out and no retries, the callers make them from the task processes only (never the ranks), and
the first call that fails logs ONE warning naming the server and turns tracking off for the rest of
the task; everything else goes on. `mlflow` (mlflow-skinny) is imported only when a run is tracked.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
HTTP_TIMEOUT_S = 5  # one call that hangs delays the task by this much, once
# the client's env settings (read by mlflow at each request), set only around tracking calls
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
RUN_KEY_TAG = "airflow.run_key"  # `<dag_id>/<run_id>`: how both tasks find the DAG run's MLflow run
# metric name -> the field of a train_summary.json point (loss_series / eval_series) it comes from
SERIES = {
    "loss": ("loss_series", "loss"),
    "learning_rate": ("loss_series", "lr"),
    "eval_loss": ("eval_series", "loss"),
}
MAX_KEY_LENGTH, MAX_PARAM_LENGTH = 250, 6000  # MLflow's (mlflow.utils.validation), without importing it
KEY_REFUSED = re.compile(r"[^\w./\- :]")  # characters MLflow refuses in a key
_env_lock = threading.Lock()  # the env settings are process-wide: one tracking call at a time

logger = logging.getLogger("llama_core.tracking")  # in the task log of the task that tracks


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run is tracked: the server's URI, the experiment, and the registered model's name
    (None: the adapter is not registered)."""

    uri: str
    experiment: str
    register_model: str | None = None


@contextmanager
def _quick_http() -> Iterator[None]:
    with _env_lock:
        saved = {key: os.environ.get(key) for key in QUICK_HTTP}
        os.environ.update(QUICK_HTTP)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": [1, {"c": 2}]}}` -> `{"a.b.0": 1, "a.b.1.c": 2}` (MLflow params are flat)."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    if not items:
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return out


def run_params(config: Mapping[str, Any], digest: str, data: Mapping[str, Any] | None) -> dict[str, str]:
    """The params of a run: the resolved config (flattened), its digest, and the data statistics (the
    tokenize stage's result under `data.`), as strings within MLflow's key and value limits (a key
    MLflow refuses would refuse the whole batch, and turn tracking off)."""
    params = {**flatten(dict(config)), "config_digest": digest, **flatten(dict(data or {}), "data")}
    return {
        KEY_REFUSED.sub("_", key)[:MAX_KEY_LENGTH]: str(value)[:MAX_PARAM_LENGTH]
        for key, value in params.items()
        if value is not None
    }


class Tracker:
    """The MLflow run of one DAG run, as one task sees it. Every method returns quietly: the first
    failure warns once (naming the server) and turns the tracker off; `disabled` says so."""

    def __init__(self, target: TrackingTarget, tags: Mapping[str, str]) -> None:
        self.target, self.tags = target, dict(tags)
        self.client: Any = None
        self.run_id: str | None = None
        self.disabled = False
        self.logged: dict[str, set[int]] = {}  # metric -> the steps the run already has

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        if self.disabled:
            return None
        try:
            with _quick_http():
                if self.run_id is None:
                    self.run_id = self._open_run()
                return fn()
        except Exception as exc:  # any client or server error: tracking stops, the fine-tune does not
            self.disabled = True
            logger.warning(
                "MLflow tracking at %s is off for the rest of this task: %s failed (%s: %s); the run goes on",
                self.target.uri, what, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
            )  # fmt: skip
            return None

    def _open_run(self) -> str:
        """The DAG run's MLflow run, created by whichever task comes first; the steps it has."""
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.target.uri, registry_uri=self.target.uri)
        experiment = self.client.get_experiment_by_name(self.target.experiment)
        exp_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(self.target.experiment)
        )
        key = self.tags[RUN_KEY_TAG]
        found = self.client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_name = self.tags.get("airflow.run_id")
            run_id = self.client.create_run(exp_id, tags=self.tags, run_name=run_name).info.run_id
        for name in (*SERIES, "tokens_per_s"):
            self.logged[name] = {m.step for m in self.client.get_metric_history(run_id, name)}
        return run_id

    def start(self) -> str | None:
        """Open the run now (else the first call does); its id, None when tracking is off."""
        return self._call("opening the run", lambda: self.run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params (the same value again is a no-op for MLflow; a changed one is refused)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        items = [Param(k, v) for k, v in params.items()]

        def log() -> None:
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

        self._call("logging params", log)

    def log_points(self, points: Mapping[str, list[tuple[int, float]]]) -> None:
        """Log `{metric: [(step, value), ...]}`, each step once per metric (a point seen again, in a
        newer progress or the final summary, is skipped)."""
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        def log() -> None:
            now = int(time.time() * 1000)
            new = [
                (name, step, value)
                for name, series in points.items()
                for step, value in series
                if value is not None and step not in self.logged.setdefault(name, set())
            ]
            metrics = [Metric(name, float(value), now, int(step)) for name, step, value in new]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
            for name, step, _ in new:
                self.logged[name].add(int(step))

        self._call("logging metrics", log)

    def log_progress(self, progress: Mapping[str, Any]) -> None:
        """The new points of rank 0's live progress (`llama_core.train.live.LiveProgress.to_json()`):
        its loss and eval curves, and the learning rate and tokens/s at its step."""
        step = int(progress.get("step") or 0)
        self.log_points(
            {
                "loss": [(int(p[0]), p[1]) for p in progress.get("curve") or []],
                "eval_loss": [(int(p[0]), p[1]) for p in progress.get("eval_curve") or []],
                "learning_rate": [(step, progress.get("learning_rate"))] if step else [],
                "tokens_per_s": [(step, progress.get("tokens_per_s"))] if step else [],
            }
        )

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The trainer's whole series (train_summary.json): the points the live progress skipped."""
        self.log_points(
            {
                name: [(int(p["step"]), p.get(field)) for p in summary.get(series) or []]
                for name, (series, field) in SERIES.items()
            }
        )

    def publish(self, key: str, value: Any) -> None:
        """`push` of an `operators.progress.XComPublisher`: "params", "progress" or "summary"."""
        {"params": self.log_params, "progress": self.log_progress, "summary": self.log_summary}[key](value)

    def log_artifacts(self, files: list[Path], folders: Mapping[str, Path]) -> None:
        """Upload `files` (at the run's artifact root) and each folder under its name."""

        def log() -> None:
            for path in files:
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
            for name, folder in folders.items():
                if folder.is_dir():
                    self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)

        self._call("uploading artifacts", log)

    def register(self, artifact_path: str) -> str | None:
        """Register the run's artifact folder as a version of `register_model` (once per run); its version."""
        name = self.target.register_model
        if not name:
            return None

        def register() -> str:
            from mlflow.exceptions import MlflowException

            # a report cleared and run again registers nothing new: this run's version stands
            mine = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
            if mine:
                return mine[0].version
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
            return self.client.create_model_version(name, source, run_id=self.run_id).version

        return self._call(f"registering model {name}", register)

    def finish(self, failed: bool) -> None:
        """Mark the run FINISHED, or FAILED when the pipeline did not hand back its results."""
        self._call(
            "ending the run",
            lambda: self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED"),
        )
