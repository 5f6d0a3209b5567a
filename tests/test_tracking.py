"""MLflow tracking (a pipeline's `tracking` section) against a real `mlflow server` (SQLite, on
127.0.0.1): one short fine-tune and its report fill one MLflow run that `MlflowClient` reads back
(the loss series equal to train_summary.json's, eval points, params, tags, artifacts, the registered
adapter); a fine-tune whose server is stopped mid-run succeeds with one warning; a server that
refuses or never answers costs the task a warning and at most the HTTP time-out."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow_server import MlflowServer
from task_instance import TaskInstance

from llama_core.launch.preflight import free_port
from llama_core.tracking import HTTP_TIMEOUT_S, QUICK_HTTP, RUN_KEY_TAG, Tracker, TrackingTarget

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "lora_llama2_tiny.yaml")
# one rank, batch 4: 16 records are 4 steps an epoch; 3 epochs, an eval every 5 steps and at the end
OVERRIDES = {"parallel_config.data_parallel": 1, "runner_config.batch_size": 4, "runner_config.epochs": 3}
WARNING = "MLflow tracking at "


def _context(run_id: str, xcoms: dict[str, Any]) -> dict[str, Any]:
    dag_run = SimpleNamespace(
        dag_id="tracked", run_id=run_id, logical_date=datetime(2026, 1, 5, tzinfo=timezone.utc)
    )
    return {
        "ti": TaskInstance(xcoms),
        "dag_run": dag_run,
        "params": {"seq_length": None, "export_merged": False},
    }


def _finetune(
    records: Path, run_dir: Path, context: dict[str, Any], tracking: dict[str, Any]
) -> dict[str, Any]:
    from operators.finetune import MsrunFinetuneOperator

    return MsrunFinetuneOperator(
        task_id="finetune",
        config=TINY,
        overrides=OVERRIDES,
        train_dataset_dir=str(records),
        eval_dataset_dir=str(records),
        output_dir=str(run_dir),
        device_target="CPU",
        tracking=tracking,
    ).execute(context)


def _warnings(caplog: Any) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()
    ]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_train_runs import write_records

    return write_records(tmp_path_factory.mktemp("data") / "train.mindrecord", 16, patterns=4)


# The tracker's 5 s time-out, raised where a test reads back what a real server got: on a loaded CI
# machine one request can take longer (the time-out itself: the server-down test).
PATIENT = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop(signal.SIGKILL)  # its store is thrown away: no need to wait for a graceful stop


@pytest.fixture(scope="module")
def tracked(
    server: MlflowServer, records: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """A fine-tune and its report (with a real PEFT adapter) tracked in `server`, model `tiny-adapter`,
    and what MlflowClient reads back of it (read here: the server-stopped test stops that server)."""
    from llama_core.checkpoint.export_peft import export_peft
    from llama_core.config import apply_overrides, load_config
    from operators.report import ReportOperator

    run_dir = tmp_path_factory.mktemp("runs") / "r1"
    tracking = {"conn_id": "mlflow_test", "experiment": "tracked", "register_model": "tiny-adapter"}
    data = {"records_written": 16, "supervised_tokens": 448, "seq_length": 32}
    with pytest.MonkeyPatch.context() as mp, _caught() as caplog:
        mp.setenv("AIRFLOW_CONN_MLFLOW_TEST", server.uri)
        mp.setitem(QUICK_HTTP, *PATIENT)
        context = _context("r1", {"tokenize_to_mindrecord": data})
        finetune = _finetune(records, run_dir, context, tracking)
        cfg = apply_overrides(load_config(TINY), OVERRIDES.items())
        adapter = export_peft(run_dir / "checkpoint", run_dir / "adapter", "tiny", config=cfg).output_dir
        context["ti"].xcoms.update(
            finetune=finetune,
            export_adapter={"output_dir": str(adapter), "finetuned_checkpoint": finetune["final_checkpoint"]},
        )
        op = ReportOperator(
            task_id="report", run_dir=str(run_dir), config=TINY, overrides=OVERRIDES, tracking=tracking
        )
        op.execute(context)
        report = op.execute(context)  # the report cleared and run again: the same MLflow run, one version
        warnings = _warnings(caplog)
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    run_id = run.info.run_id
    yield SimpleNamespace(
        run=run, run_dir=run_dir, report=report, adapter=Path(adapter), warnings=warnings,
        summary=json.loads((run_dir / "train_summary.json").read_text()), pushed=context["ti"].pushed,
        history={
            name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in ("loss", "learning_rate", "eval_loss", "tokens_per_s")
        },
        artifacts={a.path for a in client.list_artifacts(run_id)},
        downloaded=Path(client.download_artifacts(run_id, "", str(tmp_path_factory.mktemp("artifacts")))),
        versions=client.search_model_versions("name = 'tiny-adapter'"),
    )  # fmt: skip


class _Records(logging.Handler):
    """caplog for a module fixture (caplog itself is per test)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _caught() -> Iterator[_Records]:
    handler, root = _Records(), logging.getLogger()
    level, root.level = root.level, logging.INFO
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.level = level


@pytest.mark.slow
def test_the_run_holds_the_loss_series_of_train_summary_and_its_eval_points(tracked: SimpleNamespace) -> None:
    series, evals, history = tracked.summary["loss_series"], tracked.summary["eval_series"], tracked.history
    assert tracked.warnings == []
    assert history["loss"] == [(p["step"], p["loss"]) for p in series] and len(series) == 12
    assert history["learning_rate"] == [(p["step"], p["lr"]) for p in series]
    assert history["eval_loss"] == [(p["step"], p["loss"]) for p in evals]
    assert [step for step, _ in history["eval_loss"]] == [5, 10, 12]
    speeds = history["tokens_per_s"]  # live only: each progress read, at its step
    assert speeds and all(v > 0 for _, v in speeds) and speeds[-1][0] == 12
    assert tracked.pushed["progress"]["step"] == 12  # the XComs still go out beside it


@pytest.mark.slow
def test_the_run_holds_params_tags_artifacts_and_the_registered_adapter(tracked: SimpleNamespace) -> None:
    run, got = tracked.run, tracked.downloaded
    report = json.loads(Path(tracked.report["report_json"]).read_text())
    params = run.data.params
    assert params["config_digest"] == report["config"]["digest"]
    assert params["runner_config.batch_size"] == "4" and params["parallel_config.data_parallel"] == "1"
    assert params["model.model_config.pet_config.target_modules"] == ".*wq|.*wk|.*wv|.*wo"
    assert params["data.records_written"] == "16" and params["data.supervised_tokens"] == "448"
    tags = run.data.tags
    assert tags["airflow.dag_id"] == "tracked" and tags["airflow.run_id"] == "r1"
    assert tags["airflow.logical_date"] == "2026-01-05T00:00:00+00:00" and tags[RUN_KEY_TAG] == "tracked/r1"
    # evaluate did not run: the report calls the run incomplete, and so does MLflow
    assert tracked.report["incomplete"] == ["evaluate"] and run.info.status == "FAILED"
    assert {"report.md", "report.json", "loss_curve.png", "adapter"} <= tracked.artifacts
    for name in ("report.md", "loss_curve.png"):
        assert (got / name).read_bytes() == (tracked.run_dir / name).read_bytes(), name
    adapter = sorted(p.relative_to(tracked.adapter) for p in tracked.adapter.rglob("*") if p.is_file())
    uploaded = sorted(p.relative_to(got / "adapter") for p in (got / "adapter").rglob("*") if p.is_file())
    assert adapter and uploaded == adapter
    (version,) = tracked.versions
    assert version.run_id == run.info.run_id and version.source.endswith("/adapter")


@pytest.mark.slow
def test_a_server_stopped_mid_run_leaves_the_fine_tune_succeeding_with_one_warning(
    server: MlflowServer,
    tracked: SimpleNamespace,  # done with the server (read back) before this test stops it
    records: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_TEST", server.uri)
    monkeypatch.setitem(QUICK_HTTP, *PATIENT)
    client = MlflowClient(server.uri)
    opened = threading.Event()

    def stop_once_the_run_has_params() -> None:  # the tracking reached the server, then it goes away
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not opened.is_set():
            exp = client.get_experiment_by_name("stopped")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and runs[0].data.params.get("config_digest"):
                opened.set()
            time.sleep(0.2)
        server.stop()

    stopper = threading.Thread(target=stop_once_the_run_has_params)
    stopper.start()
    try:
        with caplog.at_level(logging.INFO):
            tracking = {"conn_id": "mlflow_test", "experiment": "stopped"}
            result = _finetune(records, tmp_path / "run", _context("r2", {}), tracking)
    finally:
        stopper.join()
        server.stop()
    assert opened.is_set(), "the fine-tune never reached the server"
    assert result["steps"] == 12 and result["final_loss"] is not None
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and server.uri in warnings[0], warnings


def _listener_that_never_answers() -> socket.socket:
    """A server that accepts connections (the kernel's backlog) and never answers a request."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@pytest.mark.parametrize("answers", ["refused", "never"])
def test_a_server_down_warns_once_and_costs_at_most_the_time_out(
    answers: str, caplog: pytest.LogCaptureFixture
) -> None:
    silent = _listener_that_never_answers() if answers == "never" else None
    port = silent.getsockname()[1] if silent else free_port()
    tags = {RUN_KEY_TAG: "d/r", "airflow.dag_id": "d", "airflow.run_id": "r"}
    tracker = Tracker(TrackingTarget(f"http://127.0.0.1:{port}", "d", "m"), tags)
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.INFO):
            tracker.log_params({"a": "1"})
            tracker.log_progress(
                {"step": 1, "curve": [[1, 2.0, 2.0]], "learning_rate": 1e-3, "tokens_per_s": 9.0}
            )
            tracker.log_summary({"loss_series": [{"step": 1, "loss": 2.0, "lr": 1e-3}]})
            tracker.log_artifacts([], {})
            assert tracker.register("adapter") is None
            tracker.finish(failed=False)
    finally:
        if silent:
            silent.close()
    elapsed = time.monotonic() - t0
    assert elapsed < (HTTP_TIMEOUT_S + 3 if silent else 3), elapsed
    assert tracker.disabled and len(_warnings(caplog)) == 1
    assert f"127.0.0.1:{port}" in _warnings(caplog)[0]


def test_a_missing_connection_warns_and_leaves_the_task_untracked(caplog: pytest.LogCaptureFixture) -> None:
    from operators.tracking import open_tracker

    with caplog.at_level(logging.INFO):
        tracker = open_tracker({"conn_id": "no_such_mlflow"}, _context("r", {}))
    assert tracker is None
    assert any("connection 'no_such_mlflow' not read" in r.getMessage() for r in caplog.records)


def test_the_connection_names_the_server() -> None:
    from operators.tracking import tracking_uri

    def conn(**kw: Any) -> SimpleNamespace:
        return SimpleNamespace(**{"conn_type": "http", "host": None, "port": None, "schema": None, **kw})

    assert tracking_uri(conn(host="127.0.0.1", port=5000)) == "http://127.0.0.1:5000"
    assert (
        tracking_uri(conn(conn_type="https", host="mlflow.example", schema="ml"))
        == "https://mlflow.example/ml"
    )
    assert (
        tracking_uri(conn(conn_type="generic", host="https://mlflow.example:8443"))
        == "https://mlflow.example:8443"
    )


def test_params_are_flat_strings_within_mlflows_limits() -> None:
    from llama_core.tracking import MAX_PARAM_LENGTH, run_params

    config = {"a": {"b": [1, {"c": None}], "long": "x" * 9000}, "empty": {}, "odd@key": 1}
    params = run_params(config, "d1", {"records": 3})
    assert params == {
        "a.b.0": "1", "a.long": "x" * MAX_PARAM_LENGTH, "empty": "{}", "odd_key": "1", "config_digest": "d1",
        "data.records": "3",
    }  # fmt: skip


TRACKED_DAG = """
import json, sys
from operators.pipeline import build_dag
from operators.pipeline_file import load_pipeline
dag = build_dag(load_pipeline(sys.argv[1]))
print(json.dumps({"finetune": dag.get_task("finetune").partial_kwargs.get("tracking"),
                  "report": dag.get_task("report").tracking, "mlflow": "mlflow" in sys.modules}))
"""


def test_the_tracking_section_reaches_both_tasks_and_parsing_imports_no_mlflow(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    from operators.pipeline_file import PipelineError, load_pipeline

    doc = yaml.safe_load((REPO / "configs" / "pipelines" / "llama2_tiny_lora_demo.yaml").read_text())
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**doc, "tracking": {"conn_id": "mlflow", "uri": "http://x"}}))
    with pytest.raises(PipelineError, match=r"key 'tracking.uri': Extra inputs are not permitted"):
        load_pipeline(path)
    path.write_text(yaml.safe_dump({**doc, "tracking": {"conn_id": "mlflow"}}))
    out = subprocess.run(
        [sys.executable, "-c", TRACKED_DAG, str(path)], cwd=REPO, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {"conn_id": "mlflow", "experiment": "llama2_tiny_lora_demo", "register_model": None}
    assert got == {"finetune": expected, "report": expected, "mlflow": False}
