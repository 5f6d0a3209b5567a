"""The pipeline operated in a real Airflow, as an operator would: REST API and a real browser.

One Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor, SQLite) runs on
loopback for the whole module, in a pytest temp folder, with the DAG folder of this repo and one
set of generated demo inputs; see `tests/airflow_live.py`. The scenarios run in file order and
share work: the demo run fills the work_dir cache, so later runs only train. Each scenario is a
module fixture (so any test can run alone) and the tests assert on what it observed.

The deployment: LLAMA_LORA_WORK_ROOT (work_dir must be inside it) and LLAMA_LORA_PIPELINES, a folder
with the demo pipeline file as shipped except for its sources (the generated inputs), work_dir, pool (a
1-slot pool) and schedule (a daily cron at an hour that does not come during the test), plus a broken
pipeline file, which must show as an import error without hiding the demo's DAG.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from airflow_live import (
    CHROMIUM_ARGS,
    EVAL_AT_END,
    QUICK_OVERRIDES,
    QUICK_RUN,
    AirflowLive,
    job_processes,
    launcher_pids,
    parse_time,
    scan_processes,
    ui_log_items,
    ui_login,
    ui_pick_log_source,
    ui_scroll_log_to,
    ui_task_log_url,
    ui_toggle_log_setting,
    wait_for,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "llama2_tiny_lora_demo"
CONSUMER = "llama_lora_adapter_check"
POOL = "ascend_npu"
TASKS = {
    "validate",
    "fetch_alpaca",
    "fetch_tokenizer",
    "fetch_weights",
    "alpaca_to_conversations",
    "tokenize_to_mindrecord",
    "import_checkpoint",
    "shard_checkpoint",
    "finetune",
    "evaluate",
    "export_adapter",
    "export_merged",
    "report",
}
STOP_WITHIN_S = 10.0
# A refused conf fails "in seconds": the task's own check takes well under one, but its wall time also
# counts starting a task process (2 s of imports idle; 12.5 s seen in CI with the other test worker
# training on the same two cores).
REFUSED_WITHIN_S = 30.0
# What the log must say when Airflow stopped the task: the cause, not just "killed".
STOP_REASON = re.compile(r"(?i)stopp.*(Airflow|marked failed|SIGTERM|on_kill)|(Airflow|SIGTERM).*stopp")
# A level in a rank's own line: MindSpore's `[WARNING] ` tag or Python logging's `WARNING name: `.
LEVEL_TAG = re.compile(r"\[(WARNING|ERROR|CRITICAL)\] |(WARNING|ERROR|CRITICAL) [\w.-]+: ")
# A run long enough to stop mid-training: 12 epochs of the demo's training split (~55 steps each).
LONG_OVERRIDES = {
    "parallel_config.data_parallel": 2,
    "runner_config.epochs": 12,
    "callbacks.1.save_checkpoint_steps": 10,
    **EVAL_AT_END,  # periodic evals would slow it down
}
# The run that is stopped and cleared: the same training on 2 ranks as one tensor-parallel group
# (each rank half of every weight; global batch 2), 2 epochs: stopped at its first checkpoint (step
# 10), it resumes and trains the other ~210 of its ~222 steps.
TENSOR_PARALLEL_OVERRIDES = {
    **LONG_OVERRIDES,
    "parallel_config.data_parallel": 1,
    "parallel_config.model_parallel": 2,
    "runner_config.epochs": 2,
}
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------- the deployment


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("airflow_live")


@pytest.fixture(scope="module")
def artifacts(base: Path) -> Path:
    """Screenshots and copies of the component logs end up here (printed at the end)."""
    path = base / "artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def demo_inputs(base: Path, copy_demo_inputs: Callable[[Path], Path]) -> Path:
    """The tiny Llama, its tokenizer and 240 Alpaca records (`llama_core.demo`), this module's copy (the
    backfill test adds dated snapshots beside them)."""
    return copy_demo_inputs(base / "inputs")


@pytest.fixture(scope="module")
def work_root(base: Path) -> Path:
    root = base / "work_root"
    root.mkdir()
    return root


def demo_conf(inputs: Path, work_dir: Path, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The conf a demo run triggers (the generated inputs, 2 CPU ranks), with `changes` applied."""
    from llama_core.demo import demo_params

    return {**demo_params(str(inputs), work_dir), **(changes or {})}


def quick_conf(inputs: Path, work_dir: Path, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's params cut to a quick run (`QUICK_RUN`), with `changes` applied."""
    from operators.pipeline_file import load_pipeline

    pipeline = load_pipeline(REPO / "configs" / "pipelines" / f"{DAG_ID}.yaml")
    quick = {**QUICK_RUN, "overrides": {**pipeline.overrides, **QUICK_OVERRIDES}}
    return demo_conf(inputs, work_dir, {**quick, **(changes or {})})


def progress_xcom(airflow: AirflowLive, run_id: str) -> dict[str, Any]:
    """The finetune task's `progress` XCom (node 0's), through the REST API: what the UI view reads."""
    xcom = airflow.get(
        f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/finetune/xcomEntries/progress",
        params={"map_index": 0, "deserialize": True},
    )
    return xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])


def holdout_file(work_dir: Path, layout: str = "") -> Path:
    """The demo's training MindRecord (the pipeline file holds out 10 %)."""
    from llama_core.demo import DEMO_SEQ_LENGTH

    (path,) = work_dir.glob(f"data/alpaca-*/seq{DEMO_SEQ_LENGTH}/alpaca{layout}-holdout0.1.mindrecord")
    return path


def quiet_daily_cron(now: datetime | None = None) -> str:
    """A daily cron whose tick is ~12 h away: the scheduler has no reason to start a run during the test."""
    now = now or datetime.now(timezone.utc)
    return f"{now.minute} {(now.hour + 12) % 24} * * *"


@pytest.fixture(scope="module")
def schedule() -> str:
    return quiet_daily_cron()


@pytest.fixture(scope="module")
def airflow(
    base: Path, demo_inputs: Path, work_root: Path, artifacts: Path, schedule: str
) -> Iterator[AirflowLive]:
    pipelines = base / "pipelines"
    pipelines.mkdir()
    demo = yaml.safe_load((REPO / "configs" / "pipelines" / f"{DAG_ID}.yaml").read_text())
    conf = demo_conf(demo_inputs, work_root / "demo")
    for name in ("alpaca", "tokenizer", "weights"):
        demo["sources"][name]["url"] = conf[f"{name}_url"]
    # retries as production pipelines have them: a wrong param must still fail validate at try 1
    demo |= {"work_dir": conf["work_dir"], "schedule": schedule, "retries": 1}
    demo["cluster"]["pool"] = POOL
    (pipelines / f"{DAG_ID}.yaml").write_text(yaml.safe_dump(demo))
    broken = {**demo, "dag_id": "broken_pipeline", "cluster": {**demo["cluster"], "nodes": "two"}}
    (pipelines / "broken_pipeline.yaml").write_text(yaml.safe_dump(broken))
    live = AirflowLive(
        home=base / "airflow",
        repo=REPO,
        env_extra={
            "LLAMA_LORA_WORK_ROOT": str(work_root),
            "LLAMA_LORA_SOURCE_ROOTS": f"{work_root}:{demo_inputs}",  # the demo's inputs sit beside it
            "LLAMA_LORA_PIPELINES": str(pipelines),
            "LLAMA_CORE_CACHE_DIR": str(base / "llama_core_cache"),
        },
    )
    try:
        live.start()
        live.ensure_pool(POOL, 1, "one 8-NPU node (here: the CPU)")
        live.wait_for_dag()
        live.wait_for_dag(dag_id=CONSUMER)
        yield live
    finally:
        leftovers = live.stop()
        for name in ("api-server", "scheduler", "dag-processor", "triggerer", "db-migrate"):
            src = live.home / f"{name}.log"
            if src.exists():
                shutil.copy(src, artifacts / src.name)
        print(f"\nairflow_live: timings {live.timings}; logs and screenshots in {artifacts}")
        assert not leftovers, "processes left after stopping Airflow:\n" + "\n".join(map(str, leftovers))


def job_procs(airflow: AirflowLive, launcher: int | None = None) -> list:
    return job_processes(airflow.tag, path_hint=str(airflow.home.parent), launcher_pid=launcher)


def ensure_unpaused(airflow: AirflowLive) -> None:
    if airflow.dag()["is_paused"]:
        airflow.set_paused(False)


def trigger_and_wait(airflow: AirflowLive, conf: dict[str, Any], timeout: float) -> dict[str, Any]:
    ensure_unpaused(airflow)
    t0 = time.monotonic()
    run_id = airflow.trigger(conf).json()["dag_run_id"]
    run = airflow.wait_run(run_id, timeout)
    return {"run_id": run_id, "run": run, "elapsed_s": time.monotonic() - t0}


def rank_lines(lines: list[dict[str, Any]], rank: int) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("logger") == f"msrun.rank_{rank}"]


def run_dir(work_dir: Path, run_id: str) -> Path:
    return work_dir / "runs" / run_id


def wait_training(airflow: AirflowLive, run_id: str, out: Path, timeout: float = 300) -> int:
    """Until finetune runs, both ranks have saved a checkpoint and the job's processes are alive;
    returns the launching task process's pid (their LLAMA_LAUNCHER_PID)."""
    airflow.wait_ti(run_id, "finetune", {"running"}, timeout)

    def training() -> int | None:
        state = airflow.ti_state(run_id, "finetune")
        if state != "running":
            raise AssertionError(
                f"finetune left running ({state}) before training:\n{airflow.failure_report(run_id)}"
            )
        ckpts = [list((out / "checkpoint" / f"rank_{r}").glob("*.ckpt")) for r in (0, 1)]
        pids = launcher_pids(airflow.tag)
        if all(ckpts) and len(pids) == 1:
            return next(iter(pids))
        return None

    return wait_for(training, timeout, f"ranks of {run_id} to save a checkpoint", interval=0.5)


# ---------------------------------------------------------------- scenarios (module fixtures)


@pytest.fixture(scope="module")
def demo_run(airflow: AirflowLive, demo_inputs: Path, work_root: Path) -> dict[str, Any]:
    """The demo conf triggered through the REST API, waited for to the end (the example consumer DAG
    unpaused first: it runs on the adapter this run publishes)."""
    airflow.set_paused(False, dag_id=CONSUMER)
    work_dir = work_root / "demo"
    result = trigger_and_wait(airflow, demo_conf(demo_inputs, work_dir), timeout=600)
    return {**result, "work_dir": work_dir}


def stop_mid_training(
    airflow: AirflowLive,
    demo_inputs: Path,
    work_dir: Path,
    stop: Callable[[str, int], None],
    overrides: dict[str, Any] = LONG_OVERRIDES,
) -> dict[str, Any]:
    """Trigger a long run, wait until its ranks have saved a checkpoint, `stop(run_id, launcher pid)`,
    and time how long the job's processes take to be gone (60 s at most)."""
    ensure_unpaused(airflow)
    conf = demo_conf(demo_inputs, work_dir, {"overrides": overrides})
    run_id = airflow.trigger(conf).json()["dag_run_id"]
    out = run_dir(work_dir, run_id)
    launcher = wait_training(airflow, run_id, out)
    before = job_procs(airflow, launcher)
    t0 = time.monotonic()
    stop(run_id, launcher)
    stop_call_s = time.monotonic() - t0
    left: list = []
    try:
        wait_for(lambda: not job_procs(airflow, launcher), 60, "the job's processes to end", interval=0.2)
    except AssertionError:
        left = job_procs(airflow, launcher)
    return {
        "run_id": run_id,
        "work_dir": work_dir,
        "out": out,
        "launcher": launcher,
        "before": before,
        "left": left,
        "gone_s": time.monotonic() - t0,
        "stop_call_s": stop_call_s,
    }


@pytest.fixture(scope="module")
def stopped_run(airflow: AirflowLive, demo_run: dict[str, Any], demo_inputs: Path) -> dict[str, Any]:
    """A long tensor-parallel run: finetune marked failed mid-training, then cleared and waited for
    to the end (evaluate and the exports then read its sharded checkpoints)."""
    stopped = stop_mid_training(  # the demo run's work_dir: its cache leaves shard and finetune to do
        airflow,
        demo_inputs,
        demo_run["work_dir"],
        lambda run_id, _launcher: airflow.set_ti_state(run_id, "finetune", "failed"),
        TENSOR_PARALLEL_OVERRIDES,
    )
    run_id = stopped["run_id"]
    ti1 = airflow.wait_ti(run_id, "finetune", {"failed"}, 60)
    # the task process may still be writing its last lines: let its log settle
    time.sleep(3)
    log1 = airflow.log_lines(run_id, "finetune", 1)

    t1 = time.monotonic()
    airflow.clear_tasks(run_id, ["finetune"])
    run = airflow.wait_run(run_id, 600)
    return {**stopped, "ti1": ti1, "log1": log1, "run": run, "resume_s": time.monotonic() - t1}


@pytest.fixture(scope="module")
def killed_run(airflow: AirflowLive, stopped_run: dict[str, Any], demo_inputs: Path) -> dict[str, Any]:
    """A long run whose finetune task process gets SIGKILL mid-training."""
    killed = stop_mid_training(
        airflow,
        demo_inputs,
        stopped_run["work_dir"],
        lambda _run_id, launcher: os.kill(launcher, signal.SIGKILL),
    )
    ti = airflow.wait_ti(killed["run_id"], "finetune", {"failed", "up_for_retry", "success"}, 120)
    run = airflow.wait_run(killed["run_id"], 120)
    return {**killed, "ti": ti, "run": run}


# ---------------------------------------------------------------- scheduling


def test_unpausing_a_scheduled_dag_starts_no_run(airflow: AirflowLive, schedule: str) -> None:
    dag = airflow.dag_details()
    assert schedule in str(dag.get("timetable_summary")), f"schedule {dag.get('timetable_summary')!r}"
    assert dag["is_paused"], "the DAG is not paused at creation"
    before = {r["dag_run_id"] for r in airflow.dag_runs()}
    airflow.set_paused(False)
    unpaused_at = datetime.now(timezone.utc)

    # Two scheduler loops after unpausing: the scheduler heartbeats every 2 s (loops every 0.5-2 s);
    # three new heartbeats mean at least two whole loops saw the DAG unpaused.
    beats: set[str] = set()

    def two_loops() -> bool:
        beat = airflow.health()["scheduler"]["latest_scheduler_heartbeat"]
        if beat and parse_time(beat) > unpaused_at:
            beats.add(beat)
        return len(beats) >= 3

    wait_for(two_loops, 60, "two scheduler loops after unpausing", interval=0.5, check=airflow.check_alive)
    time.sleep(2)
    runs = [r for r in airflow.dag_runs() if r["dag_run_id"] not in before]
    assert not runs, f"unpausing created runs: {[(r['dag_run_id'], r['run_type']) for r in runs]}"
    nxt = airflow.dag()["next_dagrun_run_after"]
    assert nxt and parse_time(nxt) > unpaused_at, f"next run after {nxt}: not the next cron tick"
    print(f"unpaused: no run after {len(beats)} heartbeats; next run after {nxt}")


# ---------------------------------------------------------------- refused confs


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"work_dir": "relative/work"}, "work_dir"),
        ({"master_port": 80}, "master_port"),
        ({"device_target": "GPU"}, "device_target"),
    ],
    ids=["relative-work_dir", "master_port-80", "device_target-GPU"],
)
def test_conf_failing_the_param_schema_is_refused_with_400(
    airflow: AirflowLive, demo_inputs: Path, work_root: Path, change: dict[str, Any], param: str
) -> None:
    before = {r["dag_run_id"] for r in airflow.dag_runs()}
    cwd_before = set(os.listdir(airflow.cwd))
    resp = airflow.trigger(demo_conf(demo_inputs, work_root / "refused", change), expect=None)
    assert resp.status_code == 400, f"HTTP {resp.status_code}: {resp.text[:1000]}"
    assert param in resp.text, f"the 400 does not name {param}: {resp.text[:1000]}"
    assert {r["dag_run_id"] for r in airflow.dag_runs()} == before, "a refused conf created a run"
    assert set(os.listdir(airflow.cwd)) == cwd_before
    assert not (work_root / "refused").exists()


@pytest.mark.parametrize(
    "case", ["missing-config", "unknown-override", "work_dir-outside-root"], ids=lambda case: case
)
def test_bad_conf_fails_in_validate_within_seconds_without_retry(
    airflow: AirflowLive, demo_inputs: Path, work_root: Path, base: Path, case: str
) -> None:
    outside = base / f"outside_{case}"
    work_dir = work_root / f"bad_{case}"
    changes = {
        "missing-config": {"config": str(base / "no_such_config.yaml")},
        "unknown-override": {"overrides": {"parallel_config.data_parallel": 2, "runner_config.epoks": 3}},
        "work_dir-outside-root": {"work_dir": str(outside)},
    }[case]
    conf = demo_conf(demo_inputs, work_dir, changes)
    ensure_unpaused(airflow)
    cwd_before, base_before = set(os.listdir(airflow.cwd)), set(os.listdir(base))

    t0 = time.monotonic()
    resp = airflow.trigger(conf, expect=None)
    if resp.status_code == 400:  # refusing it up front is as good
        return
    assert resp.status_code == 200, resp.text[:1000]
    run_id = resp.json()["dag_run_id"]
    states_seen: set[str] = set()

    def validate_done() -> dict[str, Any] | None:
        ti = airflow.task_instance(run_id, "validate")
        states_seen.add(str(ti["state"]))
        return ti if ti["state"] in {"failed", "success", "up_for_retry", "upstream_failed"} else None

    ti = wait_for(validate_done, 120, f"validate of {run_id}", interval=0.3, check=airflow.check_alive)
    wall_s = time.monotonic() - t0
    assert ti["state"] != "up_for_retry", f"a wrong param is retried: {ti}"
    run = airflow.wait_run(run_id, 60)
    time.sleep(1)
    ti = airflow.task_instance(run_id, "validate")
    report = airflow.failure_report(run_id)
    assert ti["state"] == "failed", report
    assert ti["try_number"] == 1 and "up_for_retry" not in states_seen, (states_seen, report)
    assert run["state"] == "failed", report
    took = (parse_time(ti["end_date"]) - parse_time(ti["start_date"])).total_seconds()
    assert took <= REFUSED_WITHIN_S, f"validate ran {took:.1f} s"
    assert wall_s <= REFUSED_WITHIN_S, f"{wall_s:.1f} s from trigger to validate failing"
    others = {tid: t["state"] for tid, t in airflow.task_instances(run_id).items() if tid != "validate"}
    assert set(others.values()) <= {"upstream_failed", None}, others
    # nothing created outside the work root: not the outside work_dir, nothing beside the root,
    # nothing in the working directory of Airflow's processes (where a relative path would land)
    assert not outside.exists(), f"{outside} was created"
    assert set(os.listdir(base)) == base_before
    assert set(os.listdir(airflow.cwd)) == cwd_before
    text = "\n".join(json.dumps(line) for line in airflow.log_lines(run_id, "validate", 1))
    hint = {
        "missing-config": "no_such_config",
        "unknown-override": "epoks",
        "work_dir-outside-root": "LLAMA_LORA_WORK_ROOT",
    }
    assert hint[case] in text, f"the validate log does not name {hint[case]!r}:\n{text[-3000:]}"
    print(f"{case}: validate {took:.1f} s, trigger -> failed {wall_s:.1f} s")


# ---------------------------------------------------------------- the demo run


def test_demo_conf_trains_to_success(airflow: AirflowLive, demo_run: dict[str, Any]) -> None:
    run_id = demo_run["run_id"]
    assert demo_run["run"]["state"] == "success", airflow.failure_report(run_id)
    tis = airflow.task_instances(run_id)
    assert set(tis) == TASKS and {t["state"] for t in tis.values()} == {"success"}, airflow.run_summary(
        run_id
    )
    assert tis["finetune"]["pool"] == tis["evaluate"]["pool"] == POOL
    out = run_dir(demo_run["work_dir"], run_id)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] > 0
    for rank in (0, 1):
        assert list((out / "checkpoint" / f"rank_{rank}").glob("*.ckpt")), f"no checkpoint of rank {rank}"
        assert (out / "msrun_log" / f"worker_{rank}.log").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["finetuned"]["eval_loss"] < report["evaluation"]["base"]["eval_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "merged" / "hf").is_dir()
    # the report's summary is in the report task's log too
    log = "\n".join(str(line.get("event")) for line in airflow.log_lines(run_id, "report", 1))
    assert "Eval loss: base" in log and str(out / "adapter") in log, log[-2000:]
    # a progress line every 5 s (the demo pipeline's training.progress_interval_s) while it trained
    progress = [e for e in map(str, (x.get("event") for x in airflow.log_lines(run_id, "finetune"))) if
                e.startswith("progress: step ")]  # fmt: skip
    assert len(progress) >= 2, "no progress lines in the finetune log"
    steps = [int(line.split()[2].split("/")[0]) for line in progress]
    assert steps == sorted(steps) and steps[-1] <= summary["steps"] and " ETA " in progress[0], progress
    # and the last progress as the finetune task's XCom, through the REST API (what the UI view reads)
    value = progress_xcom(airflow, run_id)
    assert value["state"] == "done" and value["step"] == value["total_steps"] == summary["steps"], value
    assert (
        value["curve"][-1][1] == pytest.approx(summary["final_loss"]) and len(json.dumps(value)) < 64 * 1024
    )
    print(f"demo run: {demo_run['elapsed_s']:.0f} s from trigger to success")


def test_the_adapter_asset_event_runs_the_consumer_dag_on_it(
    airflow: AirflowLive, demo_run: dict[str, Any]
) -> None:
    """export_adapter's outlet event carries where the adapter is; the example consumer DAG, scheduled
    on that Asset, loads it and gets the answers the run's evaluation recorded."""
    run_id = demo_run["run_id"]
    events = airflow.get("/assets/events", params={"source_dag_id": DAG_ID, "source_run_id": run_id})
    adapter_events = [e for e in events["asset_events"] if e["source_task_id"] == "export_adapter"]
    assert len(adapter_events) == 1, events
    extra = adapter_events[0]["extra"]
    out = run_dir(demo_run["work_dir"], run_id)
    assert extra["adapter"] == str(out / "adapter") and extra["run_id"] == run_id
    assert extra["config_digest"] == json.loads((out / "report.json").read_text())["config"]["digest"]

    def consumed() -> dict[str, Any] | None:
        runs = [r for r in airflow.dag_runs(CONSUMER) if r["state"] in {"success", "failed"}]
        return runs[-1] if runs else None

    consumer = wait_for(consumed, 300, "the consumer DAG to run on the adapter", check=airflow.check_alive)
    assert consumer["run_type"] == "asset_triggered"
    assert consumer["state"] == "success", airflow.failure_report(consumer["dag_run_id"])
    airflow.set_paused(True, dag_id=CONSUMER)  # the later scenarios need the CPU for their fine-tunes
    check = out / "adapter_check" / f"{consumer['dag_run_id']}.json".replace(":", "_")
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert json.loads(check.read_text())["finetuned"]["generations"] == evaluation["finetuned"]["generations"]


def test_a_broken_pipeline_file_shows_as_an_import_error_and_hides_no_other_dag(airflow: AirflowLive) -> None:
    errors = airflow.import_errors()
    assert [e["filename"].rsplit("/", 1)[-1] for e in errors] == ["llama_lora_pipeline_errors.py"], errors
    assert "broken_pipeline.yaml (DAG broken_pipeline): key 'cluster.nodes'" in errors[0]["stack_trace"]
    assert airflow.dag()["dag_id"] == DAG_ID and airflow.dag(CONSUMER)["dag_id"] == CONSUMER


def test_layout_param_packs_or_pads_and_keeps_each_layouts_data(
    airflow: AirflowLive, demo_run: dict[str, Any], demo_inputs: Path
) -> None:
    """After the demo (the default, buckets): `packed` tokenizes into a file of its own and trains on
    packed rows; `padded` trains every step at full length on the demo's records, re-tokenizing nothing."""
    work_dir = demo_run["work_dir"]
    unpacked = holdout_file(work_dir)
    stamp = unpacked.stat().st_mtime_ns
    # at seq 256 at least two of the demo's conversations fit a row
    packed = trigger_and_wait(
        airflow, quick_conf(demo_inputs, work_dir, {"layout": "packed", "seq_length": 256}), 600
    )
    assert packed["run"]["state"] == "success", airflow.failure_report(packed["run_id"])
    (report_path,) = work_dir.glob("data/alpaca-*/seq256/alpaca-packed-holdout0.1.mindrecord.report.json")
    report = json.loads(report_path.read_text())
    per_row = report["result"]["packing"]["documents_per_row_max"]
    assert per_row >= 2, report["result"]["packing"]
    out = run_dir(work_dir, packed["run_id"])
    assert f"is packed: up to {per_row} documents per row" in (out / "msrun_log" / "worker_0.log").read_text()

    padded = trigger_and_wait(airflow, quick_conf(demo_inputs, work_dir, {"layout": "padded"}), 600)
    assert padded["run"]["state"] == "success", airflow.failure_report(padded["run_id"])
    summary = json.loads((run_dir(work_dir, padded["run_id"]) / "train_summary.json").read_text())
    assert not summary["length_buckets"]["enabled"] and summary["length_buckets"]["compiles"] == 1
    demo = json.loads((run_dir(work_dir, demo_run["run_id"]) / "train_summary.json").read_text())
    assert demo["length_buckets"]["enabled"] and demo["length_buckets"]["compiles"] >= 1
    assert unpacked.stat().st_mtime_ns == stamp  # the buckets' and padded layouts share one file


def test_finetune_log_shows_each_rank_under_its_source(
    airflow: AirflowLive, demo_run: dict[str, Any], artifacts: Path
) -> None:
    payload = airflow.task_log(demo_run["run_id"], "finetune", 1)
    (artifacts / "demo-finetune-log-try1.json").write_text(json.dumps(payload, indent=1))
    lines = [line for line in payload["content"] if isinstance(line, dict)]
    assert lines, f"empty log payload: {str(payload)[:500]}"
    for rank in (0, 1):
        mine = rank_lines(lines, rank)
        sources = sorted({str(x.get("logger")) for x in lines})
        assert mine, f"no line under source msrun.rank_{rank}; sources: {sources}"
        groups = [x for x in mine if str(x.get("event", "")).startswith("::group::")]
        assert len(groups) == 1 and groups[0]["event"].startswith(f"::group::rank {rank}: ok"), groups
        summary_at = mine.index(groups[0])
        live = mine[:summary_at]
        assert live, f"rank {rank}: no live line before its summary"
        unprefixed = [x["event"] for x in live if not str(x["event"]).startswith(f"[rank {rank}] ")]
        assert not unprefixed, f"rank {rank}: lines without the '[rank {rank}] ' prefix: {unprefixed[:5]}"
        assert any("step=" in str(x["event"]) and "loss=" in str(x["event"]) for x in live), (
            f"rank {rank}: no step"
        )
        # levels kept: a line the rank wrote as WARNING/ERROR (MindSpore's `[WARNING] ME(...)`, or
        # Python logging's `WARNING llama_core.x: ...`) is logged at that level (or DEBUG: chatter)
        tagged = 0
        for x in live:
            m = LEVEL_TAG.match(str(x["event"]), len(f"[rank {rank}] "))
            if m:
                tagged += 1
                level = str(x.get("level", "")).lower()
                assert level in {(m.group(1) or m.group(2)).lower(), "debug"}, x
        assert tagged, f"rank {rank}: no WARNING/ERROR line (MindSpore warns on every start)"
        assert any(str(x.get("level")).lower() == "warning" for x in live), f"rank {rank}: nothing at warning"
        # the summary group ends this rank's lines
        assert mine[-1]["event"] == "::endgroup::", mine[-3:]
    other = [
        x
        for x in lines
        if str(x.get("event", "")).startswith("[rank ")
        and not str(x.get("logger", "")).startswith("msrun.rank_")
    ]
    assert not other, f"rank lines under another source: {other[:3]}"
    levels = {str(x.get("level")) for r in (0, 1) for x in rank_lines(lines, r)}
    print(f"rank line levels: {sorted(levels)}; keys of a line: {sorted(lines[-1])}")


# ---------------------------------------------------------------- stop, clear, resume


def test_marking_finetune_failed_stops_every_rank_within_10s(stopped_run: dict[str, Any]) -> None:
    assert stopped_run["before"], "no job process was seen before the stop"
    assert not stopped_run["left"], "still running 60 s after the stop:\n" + "\n".join(
        map(str, stopped_run["left"])
    )
    assert stopped_run["gone_s"] <= STOP_WITHIN_S, f"the ranks took {stopped_run['gone_s']:.1f} s to go"
    assert stopped_run["ti1"]["try_number"] == 1
    lines = stopped_run["log1"]
    # the project's own lines (not Airflow's "task" logger) say the job was stopped, and why
    said = [
        str(x.get("event"))
        for x in lines
        if x.get("logger") != "task" and STOP_REASON.search(str(x.get("event")))
    ]
    text = "\n".join(f"[{x.get('logger')}] {x.get('event')}" for x in lines)
    assert said, f"the task log does not say what stopped the ranks:\n{text[-4000:]}"
    for rank in (0, 1):
        groups = [x["event"] for x in rank_lines(lines, rank) if str(x["event"]).startswith("::group::")]
        assert len(groups) == 1 and "stopped" in groups[0], f"rank {rank}'s summary: {groups}"
    print(
        f"mark failed -> no process after {stopped_run['gone_s']:.1f} s "
        f"(the PATCH itself took {stopped_run['stop_call_s']:.1f} s)"
    )


def test_cleared_finetune_resumes_from_its_checkpoint_and_succeeds(
    airflow: AirflowLive, stopped_run: dict[str, Any]
) -> None:
    run_id = stopped_run["run_id"]
    assert stopped_run["run"]["state"] == "success", airflow.failure_report(run_id)
    ti = airflow.task_instance(run_id, "finetune")
    assert ti["state"] == "success" and ti["try_number"] == 2, ti
    summary = json.loads((stopped_run["out"] / "train_summary.json").read_text())
    assert summary.get("resumed_from"), f"train_summary.json has no resumed_from: {summary}"
    records = json.loads(Path(f"{holdout_file(stopped_run['work_dir'])}.report.json").read_text())
    steps_per_epoch = records["result"]["records_written"] // 2  # global batch: 2 on one TP group
    assert summary["steps"] == TENSOR_PARALLEL_OVERRIDES["runner_config.epochs"] * steps_per_epoch, summary
    # each rank trained and saved its half of the adapter; the final one was rebuilt whole
    layout = json.loads((stopped_run["out"] / "checkpoint" / "parallel.json").read_text())
    assert layout["layout"]["model_parallel"] == 2
    complete = list((stopped_run["out"] / "checkpoint" / "complete").glob("*_rank_0-*.ckpt"))
    assert len(complete) == 1, complete
    lines = airflow.log_lines(run_id, "finetune", 2)
    for rank in (0, 1):
        resumed = [x["event"] for x in rank_lines(lines, rank) if "resumed from" in str(x["event"])]
        assert resumed, f"try 2's log does not show rank {rank} resuming"
        step = re.search(r"step (\d+)/", resumed[0])
        assert step and int(step.group(1)) > 0, resumed[0]
    # the progress XCom (the UI's curve) holds the whole run: try 1's steps up to the checkpoint too
    value = progress_xcom(airflow, run_id)
    assert value["curve"][0][0] == 1 and value["step"] == summary["steps"], value["curve"][:3]
    print(f"clear -> success in {stopped_run['resume_s']:.0f} s, {resumed[0]}")


def test_sigkill_of_the_task_process_leaves_no_rank_within_10s(killed_run: dict[str, Any]) -> None:
    assert killed_run["before"], "no job process was seen before the kill"
    assert not killed_run["left"], "still running 60 s after SIGKILL:\n" + "\n".join(
        map(str, killed_run["left"])
    )
    assert killed_run["gone_s"] <= STOP_WITHIN_S, f"the ranks took {killed_run['gone_s']:.1f} s to go"
    assert killed_run["ti"]["state"] == "failed", killed_run["ti"]
    print(f"SIGKILL -> no rank after {killed_run['gone_s']:.1f} s")


# ---------------------------------------------------------------- backfill


def create_backfill(airflow: AirflowLive, body: dict[str, Any], tries: int = 5) -> dict[str, Any]:
    """POST /backfills, again after a moment when SQLite was locked by the scheduler's own writes (the
    API answers 503 "Database is locked" then; this deployment is the standalone one, on SQLite)."""
    for _ in range(tries):
        resp = airflow.post("/backfills", body, expect=None)
        if not (resp.status_code == 503 and "Database is locked" in resp.text):
            break
        time.sleep(2)
    assert resp.status_code in (200, 201), f"POST /backfills -> HTTP {resp.status_code}: {resp.text[:1000]}"
    return resp.json()


@pytest.fixture(scope="module")
def backfill(
    airflow: AirflowLive, killed_run: dict[str, Any], demo_inputs: Path, work_root: Path
) -> dict[str, Any]:
    """A backfill of 2 dates, created through the REST API, waited for to the end (and so is any other
    run it set off). The Alpaca source is a dated snapshot, `alpaca-{{ ds }}.json`: each date's file
    (80 of the demo's records) leaves out a different record, so each run must train on its own date's
    data."""
    ensure_unpaused(airflow)
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    dated = {"alpaca_url": f"{demo_inputs}/alpaca-{{{{ ds }}}}.json", "master_port": None}
    body = {
        "dag_id": DAG_ID,
        "from_date": (today - timedelta(days=3)).isoformat(),
        "to_date": (today - timedelta(days=2) + timedelta(hours=23, minutes=59)).isoformat(),
        "dag_run_conf": quick_conf(demo_inputs, work_root / "demo", dated),
        "max_active_runs": 2,  # the pool, not the backfill, must keep the fine-tunes apart
        "reprocess_behavior": "none",
    }
    dry = airflow.post("/backfills/dry_run", body).json()
    records = json.loads((demo_inputs / "alpaca.json").read_text())[:80]
    for i, backfill_run in enumerate(dry["backfills"]):
        snapshot = records[:i] + records[i + 1 :]
        (demo_inputs / f"alpaca-{backfill_run['logical_date'][:10]}.json").write_text(json.dumps(snapshot))
    runs_before = {r["dag_run_id"] for r in airflow.dag_runs()}
    t0 = time.monotonic()
    created = create_backfill(airflow, body)

    def all_done() -> list[dict[str, Any]] | None:
        runs = airflow.dag_runs()
        new = [r for r in runs if r["dag_run_id"] not in runs_before]
        backfilled = [r for r in new if r["run_type"] == "backfill"]
        if len(backfilled) >= 2 and all(r["state"] in {"success", "failed"} for r in new):
            return new
        return None

    new_runs = wait_for(all_done, 600, "the backfill's runs to finish", interval=2, check=airflow.check_alive)
    elapsed = time.monotonic() - t0
    finetunes = []  # every try of finetune in every run of the DAG: (start, end, run_id, try)
    for run in airflow.dag_runs():
        for ti in airflow.ti_tries(run["dag_run_id"], "finetune"):
            if ti["start_date"]:
                end = parse_time(ti["end_date"]) or datetime.now(timezone.utc)
                finetunes.append((parse_time(ti["start_date"]), end, run["dag_run_id"], ti["try_number"]))
    return {
        "dates": [b["logical_date"] for b in dry["backfills"]],
        "created": created,
        "runs": [r for r in new_runs if r["run_type"] == "backfill"],
        "other_runs": [r for r in new_runs if r["run_type"] != "backfill"],
        "finetunes": sorted(finetunes),
        "elapsed_s": elapsed,
    }


def test_backfill_of_two_dates_succeeds_one_finetune_at_a_time(
    airflow: AirflowLive, backfill: dict[str, Any]
) -> None:
    assert len(backfill["dates"]) == 2, backfill["dates"]
    runs = backfill["runs"]
    assert sorted(r["logical_date"] for r in runs) == sorted(backfill["dates"])
    bad = [r["dag_run_id"] for r in runs if r["state"] != "success"]
    assert not bad, "\n".join(airflow.failure_report(run_id) for run_id in bad)
    # at most one finetune at a time, over every run of the DAG (the backfill's and any other)
    spans = backfill["finetunes"]
    for (_s1, e1, r1, t1), (s2, _e2, r2, t2) in itertools.pairwise(spans):
        assert s2 >= e1, (
            f"finetune of {r2} (try {t2}) started at {s2}, before that of {r1} (try {t1}) ended at {e1}"
        )
    shown = [(s.strftime("%H:%M:%S"), e.strftime("%H:%M:%S"), r.split("__")[0]) for s, e, r, _ in spans[-4:]]
    print(f"backfill of {backfill['dates']}: {backfill['elapsed_s']:.0f} s; last finetunes {shown}")


def test_backfill_trains_each_date_on_its_own_snapshot(backfill: dict[str, Any], work_root: Path) -> None:
    data_dirs = set()
    for run in backfill["runs"]:
        report = json.loads((run_dir(work_root / "demo", run["dag_run_id"]) / "report.json").read_text())
        stages = {stage["name"]: stage for stage in report["stages"]}
        fetched = stages["fetch_alpaca"]["outputs"]["path"]
        assert fetched.endswith(f"alpaca-{run['logical_date'][:10]}.json"), (run["logical_date"], fetched)
        data_dirs.add(Path(stages["tokenize_to_mindrecord"]["outputs"]["output"]).parents[1])
    assert len(data_dirs) == 2, data_dirs  # two snapshots, two prepared datasets


def test_backfill_sets_off_no_scheduled_run(backfill: dict[str, Any]) -> None:
    """Backfilled dates are the newest 'automated' runs; the next scheduled run must still wait for the
    next cron tick (with catchup=False a CronTriggerTimetable would run the latest missed tick at once)."""
    others = [(r["dag_run_id"], r["run_type"], r["state"]) for r in backfill["other_runs"]]
    assert not others, f"the backfill set off other runs: {others}"


# ---------------------------------------------------------------- the browser


def browse_one_rank_log(
    airflow: AirflowLive, run_id: str, rank: int, shots: Path
) -> tuple[dict[int, str], dict[int, str]]:
    """In Chromium: log in, open try 1 of finetune, pick source msrun.rank_<rank>, show the source
    column, then expand the rank's summary group. Returns the log view's items (index -> text) before
    and after expanding; screenshots go to `shots`."""
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    source = f"msrun.rank_{rank}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            ui_login(page, airflow)
            page.goto(ui_task_log_url(airflow, run_id, "finetune", 1))
            page.get_by_text("[rank 0]").first.wait_for()
            page.get_by_text("[rank 1]").first.wait_for()
            page.screenshot(path=str(shots / "1-finetune-try1-all-sources.png"))

            ui_pick_log_source(page, source)
            page.wait_for_url(lambda url: f"log_source={source}" in url)
            ui_toggle_log_setting(page, "Show Source")
            ui_toggle_log_setting(page, "Wrap")  # long lines wrap: each line's source shows at its end
            header = page.get_by_test_id(re.compile(r"^group-header-")).filter(has_text=f"rank {rank}: ")
            page.wait_for_timeout(500)  # the settings menu fades out
            ui_scroll_log_to(page, f"rank {rank}: ")
            page.screenshot(path=str(shots / f"2-source-{source}.png"))
            filtered = ui_log_items(page)

            ui_scroll_log_to(page, f"rank {rank}: ")
            header.first.click()  # expand the rank's summary group
            page.wait_for_timeout(500)
            ui_scroll_log_to(page, f"rank {rank}: ")
            page.screenshot(path=str(shots / f"3-{source}-summary-group-expanded.png"))
            expanded = ui_log_items(page)
        finally:
            browser.close()
    return filtered, expanded


def test_browser_log_view_filters_one_rank_by_source(
    airflow: AirflowLive, stopped_run: dict[str, Any], artifacts: Path
) -> None:
    """Log in, open the stopped try's finetune log, pick msrun.rank_1: only rank 1's lines and group."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    shots = artifacts / "browser"
    filtered, expanded = browse_one_rank_log(airflow, stopped_run["run_id"], rank=1, shots=shots)

    group_header = re.compile(r"^\W*rank \d+: ")  # "▶ rank 1: stopped by ... source=msrun.rank_1 ..."

    def rank_items(items: dict[int, str]) -> list[str]:
        return [t for t in items.values() if ("[rank " in t or "source=" in t) and not group_header.match(t)]

    lines, after = rank_items(filtered), rank_items(expanded)
    groups = [t for t in filtered.values() if group_header.match(t)]
    assert lines, f"no log line shown after picking msrun.rank_1: {list(filtered.values())[:5]}"
    strays = [t[:200] for t in lines + after if "[rank 1] " not in t or "source=msrun.rank_1" not in t]
    assert not strays, f"lines of another source or rank shown: {strays[:5]}"
    assert not any("rank 0" in t or "msrun.rank_0" in t for t in [*filtered.values(), *expanded.values()])
    assert len(groups) == 1 and "rank 1: stopped" in groups[0] and "source=msrun.rank_1" in groups[0], groups
    assert len(after) > len(lines) + 5, "expanding rank 1's summary group showed no lines"
    print(f"browser: {len(lines)} rank-1 lines, group {groups[0].strip()[:80]!r}; screenshots in {shots}")


# ---------------------------------------------------------------- tear-down


def test_stopping_airflow_leaves_no_process(airflow: AirflowLive) -> None:
    leftovers = airflow.stop()
    assert not leftovers, "\n".join(map(str, leftovers))
    assert not scan_processes(airflow.tag, path_hint=str(airflow.home.parent))
    with pytest.raises(requests.RequestException):
        airflow.health()
