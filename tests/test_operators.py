"""Operators are thin: these tests check the glue they add (XCom values, pass-through, failure report)."""

import dataclasses
import logging
import os
from pathlib import Path

import pytest
from processes import job_processes, wait_until

from llama_core.launch.preflight import free_port
from llama_core.results import to_jsonable
from operators.finetune import MsrunFinetuneOperator
from operators.stages import ImportCheckpointOperator

REPO = Path(__file__).resolve().parents[1]


def test_to_xcom_makes_results_json_able(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Inner:
        path: Path

    @dataclasses.dataclass
    class Result:
        inner: Inner
        files: list[Path]
        counts: dict[str, int]

    value = to_jsonable(Result(Inner(tmp_path), [tmp_path / "a"], {"n": 1}))
    assert value == {"inner": {"path": str(tmp_path)}, "files": [str(tmp_path / "a")], "counts": {"n": 1}}


def test_mindspore_checkpoint_is_passed_through(tmp_path: Path) -> None:
    ckpt = tmp_path / "llama2_7b.ckpt"
    ckpt.write_bytes(b"not parsed")
    op = ImportCheckpointOperator(
        task_id="import", input_path=str(ckpt), output_path=str(tmp_path / "o.ckpt")
    )
    result = op.execute({})
    assert result.pop("stage_seconds") >= 0
    assert result == {"output_path": str(ckpt), "imported": False, "cached": True}
    assert not (tmp_path / "o.ckpt").exists()


@pytest.mark.slow
def test_failed_ranks_fail_the_task_with_their_logs_grouped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llama_core.launch import LaunchError

    op = MsrunFinetuneOperator(
        task_id="finetune",
        config=str(REPO / "configs" / "lora_llama2_tiny.yaml"),
        train_dataset_dir=str(tmp_path / "missing.mindrecord"),
        output_dir=str(tmp_path / "run"),
        device_target="CPU",
        master_port=free_port(),
    )
    with caplog.at_level(logging.INFO), pytest.raises(LaunchError) as failure:
        op.execute({})
    assert failure.value.rank in (0, 1)
    assert f"rank {failure.value.rank}" in str(failure.value)
    messages = [r.getMessage() for r in caplog.records]
    groups = [r for r in caplog.records if r.getMessage().startswith("::group::rank ")]
    assert groups and "FAILED" in groups[0].getMessage()  # failed ranks come first
    assert groups[0].levelno == logging.ERROR
    for group in groups:  # each rank's summary is under that rank's own source
        assert group.name == "msrun.rank_" + group.getMessage().split()[1].rstrip(":")
    assert any("missing.mindrecord" in m for m in messages)  # the rank's own error is in the log


def test_overrides_arrive_as_a_dict_whichever_way_they_were_rendered() -> None:
    from llama_core.validate import overrides_dict

    assert overrides_dict({"runner_config.epochs": 1}) == {"runner_config.epochs": 1}
    assert overrides_dict('{"runner_config.epochs": 1}') == {"runner_config.epochs": 1}
    assert overrides_dict(None) == {} and overrides_dict("") == {}


def test_a_deterministic_error_fails_the_task_without_retries(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from operators.stages import ShardCheckpointOperator

    op = ShardCheckpointOperator(
        task_id="shard",
        load_checkpoint=str(tmp_path / "x.ckpt"),
        config=str(tmp_path / "missing.yaml"),
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(AirflowFailException, match="ConfigError: config file not found"):
        op.execute({})


def test_a_retryable_error_is_left_to_the_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_core.fetch
    from llama_core.fetch import FetchError
    from operators.stages import FetchOperator

    def network_down(*args: object, **kwargs: object) -> None:
        raise FetchError("giving up on http://127.0.0.1:9/x after 6 attempts", retryable=True)

    monkeypatch.setattr(llama_core.fetch, "fetch", network_down)
    op = FetchOperator(task_id="fetch", source="http://127.0.0.1:9/x", dest=str(tmp_path))
    with pytest.raises(FetchError, match="giving up"):
        op.execute({})


def test_validate_fails_fast_naming_the_param(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from operators.validate import ValidateParamsOperator

    monkeypatch.setenv("LLAMA_LORA_WORK_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("LLAMA_LORA_SOURCE_ROOTS", str(tmp_path))  # the source sits beside the work root
    (tmp_path / "a.json").write_text("[]")
    params = {
        "alpaca_url": str(tmp_path / "a.json"),
        "tokenizer_url": str(tmp_path / "a.json"),
        "weights_url": str(tmp_path / "a.json"),
        "work_dir": str(tmp_path / "root" / "w"),
        "config": str(REPO / "configs" / "lora_llama2_tiny.yaml"),
        "overrides": {},
        "seq_length": 32,
        "device_target": "CPU",
        "master_port": None,
    }
    op = ValidateParamsOperator(task_id="validate", default_work_root="/nonexistent")
    assert op.retries == 0
    (plan,) = op.execute({"params": params})
    assert plan["world_size"] == 2 and plan["node_rank"] == 0 and plan["ranks_per_node"] == 2
    plans = op.execute({"params": {**params, "nodes": 2}})
    assert [(p["node_rank"], p["nodes"], p["ranks_per_node"]) for p in plans] == [(0, 2, 1), (1, 2, 1)]
    with pytest.raises(AirflowFailException, match=r"param 'work_dir'.*outside the allowed work root"):
        op.execute({"params": {**params, "work_dir": str(tmp_path / "elsewhere")}})
    # a connection the pipeline file did not name, nor the workers' list: its credentials are not lent
    with pytest.raises(AirflowFailException, match=r"param 'storage_conn_id': 'airflow_db' is neither"):
        op.execute({"params": {**params, "storage_conn_id": "airflow_db"}})
    monkeypatch.setenv("LLAMA_LORA_STORAGE_CONNECTIONS", "team_bucket, no_such_conn")
    with pytest.raises(
        AirflowFailException, match=r"param 'storage_conn_id'.*no_such_conn"
    ):  # allowed, absent
        op.execute({"params": {**params, "storage_conn_id": "no_such_conn"}})
    own = ValidateParamsOperator(task_id="v", default_work_root="/x", trusted_conn_id="pipeline_conn")
    with pytest.raises(
        AirflowFailException, match=r"storage_conn_id': The conn_id .pipeline_conn. isn't defined"
    ):  # allowed: its own
        own.execute({"params": {**params, "storage_conn_id": "pipeline_conn"}})


# Loaded by every Python process of the launch (via PYTHONPATH): a rank's `llama_core.run` says it
# trains, then sleeps, standing in for a long fine-tune.
SLOW_TRAINING = """
import os, sys, time
if os.environ.get("MS_ROLE") == "MS_WORKER" and sys.orig_argv[1:3] == ["-m", "llama_core.run"]:
    print("training", flush=True)
    time.sleep(600)
"""


@pytest.fixture()
def slow_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MsrunFinetuneOperator:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_TRAINING)
    monkeypatch.setenv("PYTHONPATH", f"{site}:{REPO}")
    return MsrunFinetuneOperator(
        task_id="finetune",
        config=str(REPO / "configs" / "lora_llama2_tiny.yaml"),
        train_dataset_dir=str(tmp_path / "data.mindrecord"),
        output_dir=str(tmp_path / "run"),
        device_target="CPU",
    )


def _ranks_training(run_dir: Path) -> bool:
    return all("training" in _text(run_dir / "msrun_log" / f"worker_{r}.log") for r in (0, 1))


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
def test_execution_timeout_stops_every_rank(
    slow_training: MsrunFinetuneOperator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As Airflow's task runner does it: execute under `timeout`, then `on_kill`."""
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import timeout

    with caplog.at_level(logging.INFO), pytest.raises(AirflowTaskTimeout), timeout(15):
        try:
            slow_training.execute({})
        finally:
            assert _ranks_training(tmp_path / "run"), "the ranks never started training"
    slow_training.on_kill()
    assert job_processes(os.getpid()) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("the launcher was interrupted (AirflowTaskTimeout)" in m for m in messages)
    assert any("stopped by the launcher: the task was stopped" in m for m in messages)


# The task process as Airflow 3 runs it: SIGTERM calls the operator's on_kill and does not raise.
TASK_PROCESS = """
import logging, signal, sys
from operators.finetune import MsrunFinetuneOperator
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
op = MsrunFinetuneOperator(task_id="finetune", config=sys.argv[1], train_dataset_dir=sys.argv[2] + "/data",
                           output_dir=sys.argv[2] + "/run", device_target="CPU")
signal.signal(signal.SIGTERM, lambda *_: op.on_kill())
op.execute({})
"""


@pytest.mark.slow
def test_sigterm_to_the_task_process_stops_every_rank_within_10_s(
    slow_training: MsrunFinetuneOperator, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    task = subprocess.Popen(
        [sys.executable, "-c", TASK_PROCESS, slow_training.config, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # Airflow's logging writes to stdout
        text=True,
    )
    try:
        assert wait_until(lambda: _ranks_training(tmp_path / "run"), 90), "the ranks never started training"
        assert len(job_processes(task.pid)) >= 5
        task.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        assert wait_until(lambda: job_processes(task.pid) == [], 10), job_processes(task.pid)
        output, _ = task.communicate(timeout=30)
        assert time.monotonic() - stopped_at < 10 or task.returncode != 0
    finally:
        task.kill()
    assert task.returncode != 0
    assert "stopping the msrun job (2 ranks" in output and "Airflow stopped the task" in output
    assert "LaunchStopped: the msrun job was stopped: Airflow stopped the task" in output
    assert "rank 0: stopped by the launcher: the task was stopped" in output


def test_overlapping_runs_of_a_stage_write_its_output_once(tmp_path: Path) -> None:
    """Two runs (a backfill) converting the same data at once: one writes, the other finds the cache."""
    import json
    import threading

    from operators.stages import AlpacaToConversationsOperator

    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(2000)]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    out = tmp_path / "work" / "data" / "conversations.json"
    results: list[dict] = []

    def run(n: int) -> None:
        op = AlpacaToConversationsOperator(
            task_id=f"convert_{n}", data_path=str(tmp_path / "alpaca.json"), output_path=str(out)
        )
        results.append(op.execute({}))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["cached"] for r in results) == [False, True]
    assert [r["records_written"] for r in results] == [2000, 2000]
    assert (tmp_path / "work" / "data" / ".conversations.json.stage.lock").exists()
