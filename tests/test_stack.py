"""The deployment users run (`make airflow`, deploy/stack.py), driven as an operator would drive it:
PostgreSQL, Redis, CeleryExecutor with the api-server, scheduler, dag-processor and triggerer, and two
"Ascend hosts", each a Celery worker of queue `ascend` in its own network namespace with its own
address and log folder (sharing this machine's disk, the shared storage multi-node runs need).

- the demo fine-tune runs on an Ascend host and its per-rank log reaches the API from that host's
  worker log server;
- a 2-node x 1-rank fine-tune over both hosts gives the 1-node x 2-rank loss curve;
- a rank killed on one host fails both node tasks within 60 s and leaves no process on either host;
- more nodes than free hosts fail within the start time-out instead of hanging;
- with the task token's lifetime cut to 30 s, a fine-tune of 5+ lifetimes (minutes) succeeds;
- stopping leaves no process; starting again finds the earlier runs in the same database.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from airflow_live import AirflowLive, wait_for

from deploy.stack import SUBNET, Stack, free_port

REPO = Path(__file__).resolve().parents[1]
TOKEN_LIFETIME_S = 30
NO_DROPOUT = {"model.model_config.pet_config.lora_dropout": 0}
# long runs evaluate the held-out split only at the end: the periodic evals would be most of their time
EVAL_AT_END = {"eval_step_interval": 100000}
RUNS: dict[str, str] = {}  # run ids one test leaves for a later one

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and PostgreSQL's user need root"),
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("ip", "initdb", "pg_ctl", "redis-server")),
        reason="needs iproute2, PostgreSQL 15 and redis-server (.ci/run installs them)",
    ),
]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # not under pytest's private tmp folder: the postgres user must reach the database folder
    root = Path(tempfile.mkdtemp(prefix="llama-stack-"))
    root.chmod(0o755)
    deployment = Stack(
        root,
        env_extra={
            "AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME": str(TOKEN_LIFETIME_S),
            "LLAMA_CORE_CACHE_DIR": str(root / "llama_core_cache"),
        },
    )
    try:
        deployment.start(ascend_workers=0, netns_hosts=2, api_port=free_port(), log=print)
        yield deployment
    finally:
        deployment.stop(timeout=30)
        assert not namespaces(), "namespaces left after stop"
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(stack: Stack) -> AirflowLive:
    state = stack.state
    assert state is not None
    live = AirflowLive(
        home=stack.home, repo=REPO, port=state.api_port, password=state.secrets["admin_password"]
    )
    live.check_alive = stack.check_alive  # type: ignore[method-assign]
    live.wait_for_dag()
    if live.dag()["is_paused"]:
        live.set_paused(False)
    return live


@pytest.fixture(scope="module")
def inputs(stack: Stack) -> Path:
    out = stack.root / "work" / "inputs"
    proc = subprocess.run(
        [sys.executable, "-m", "llama_core.demo", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def conf(stack: Stack, inputs: Path, **changes: Any) -> dict[str, Any]:
    """The demo's params (without LoRA dropout: exact curves), with `changes` applied."""
    from llama_core.demo import demo_params
    from operators.pipeline import load_pipeline

    params = demo_params(str(inputs), stack.root / "work" / "demo")
    pipeline = load_pipeline(REPO / "configs" / "pipelines" / "llama2_tiny_lora_demo.yaml")
    overrides = {**pipeline.overrides, **NO_DROPOUT, **changes.pop("overrides", {})}
    return {**params, **changes, "overrides": overrides}


def run(client: AirflowLive, conf_: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    t0 = time.monotonic()
    run_id = client.trigger(conf_).json()["dag_run_id"]
    state = client.wait_run(run_id, timeout)
    return {"run_id": run_id, "run": state, "elapsed_s": time.monotonic() - t0}


def losses(stack: Stack, run_id: str) -> list[float]:
    summary = stack.root / "work" / "demo" / "runs" / run_id / "train_summary.json"
    return [point["loss"] for point in json.loads(summary.read_text())["loss_series"]]


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("llh")]


def host_processes(ns: str) -> list[psutil.Process]:
    """Processes of a fine-tune (msrun, wrappers, ranks) in namespace `ns`."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in map(int, pids):
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        if "msrun" in cmd or "llama_core" in cmd:
            found.append(psutil.Process(pid))
    return found


def in_subnet(host: str | None) -> bool:
    return host is not None and ipaddress.ip_address(host) in SUBNET


def test_demo_runs_on_an_ascend_host_and_its_rank_logs_come_from_that_hosts_log_server(
    stack: Stack, client: AirflowLive, inputs: Path
) -> None:
    assert stack.env()["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert stack.env()["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert client.health()["metadatabase"]["status"] == "healthy"
    result = run(client, conf(stack, inputs))
    run_id = result["run_id"]
    assert result["run"]["state"] == "success", client.failure_report(run_id)
    tis = client.task_instances(run_id)
    finetune = tis["finetune"]
    assert finetune["queue"] == "ascend" and in_subnet(finetune["hostname"]), finetune
    assert finetune["rendered_map_index"] == "node 0"
    assert tis["tokenize_to_mindrecord"]["queue"] == "default"
    # the API read it from the host's worker log server: that host's log folder is its own
    log = client.task_log(run_id, "finetune")["content"]
    served = f"http://{finetune['hostname']}:{stack.state.log_port}/log/"
    assert any(served in str(line.get("event")) for line in log[:5] if isinstance(line, dict)), log[:3]
    for rank in (0, 1):
        assert any(isinstance(x, dict) and x.get("logger") == f"msrun.rank_{rank}" for x in log), rank
    print(f"demo on Celery: {result['elapsed_s']:.0f} s, finetune on {finetune['hostname']}")
    RUNS["one_node"] = run_id  # the reference curve of the next test


def test_two_nodes_give_the_one_node_loss_curve(stack: Stack, client: AirflowLive, inputs: Path) -> None:
    result = run(client, conf(stack, inputs, nodes=2))
    run_id = result["run_id"]
    assert result["run"]["state"] == "success", client.failure_report(run_id)
    tis = client.task_instances(run_id)
    nodes = [tis["finetune"], tis["finetune[1]"]]
    assert [t["rendered_map_index"] for t in nodes] == ["node 0", "node 1"]
    hosts = {t["hostname"] for t in nodes}
    assert len(hosts) == 2 and all(map(in_subnet, hosts)), hosts  # one node task per host
    for node, task in enumerate(("finetune", "finetune[1]")):
        log = client.log_lines(run_id, task)
        assert any(x.get("logger") == f"msrun.rank_{node}" for x in log), (
            f"no rank {node} in node {node}'s log"
        )
    one, two = losses(stack, RUNS["one_node"]), losses(stack, run_id)
    assert len(one) == len(two) > 10
    assert max(abs(a - b) / abs(a) for a, b in zip(one, two, strict=True)) <= 1e-5
    print(f"2 nodes x 1 rank: {result['elapsed_s']:.0f} s, the 1 x 2 curve within 1e-5 over {len(two)} steps")


def test_a_rank_killed_on_one_host_fails_both_nodes_within_60s_and_leaves_nothing(
    stack: Stack, client: AirflowLive, inputs: Path
) -> None:
    long = {"runner_config.epochs": 20, "callbacks.1.save_checkpoint_steps": 1000, **EVAL_AT_END}
    run_id = client.trigger(conf(stack, inputs, nodes=2, overrides=long)).json()["dag_run_id"]

    def training() -> psutil.Process | None:
        ranks = [p for p in host_processes("llh2") if "llama_core.run" in " ".join(p.cmdline())]
        out = stack.root / "work" / "demo" / "runs" / run_id / "msrun_log"
        logs = list(out.glob("node_*/worker_*.log"))
        stepping = len(logs) == 2 and all(" step=" in p.read_text(errors="replace") for p in logs)
        wrapped = [p for p in ranks if "llama_core.launch.wrapper" not in " ".join(p.cmdline())]
        return wrapped[0] if stepping and wrapped else None

    rank = wait_for(training, 300, "both nodes to train", interval=1, check=stack.check_alive)
    killed_at = time.monotonic()
    rank.send_signal(signal.SIGKILL)
    for task in ("finetune", "finetune[1]"):
        client.wait_ti(run_id, task, {"failed", "success"}, 60 - (time.monotonic() - killed_at) + 1)
    ended = time.monotonic() - killed_at
    tis = client.task_instances(run_id)
    assert tis["finetune"]["state"] == tis["finetune[1]"]["state"] == "failed", client.run_summary(run_id)
    assert ended < 60
    wait_for(
        lambda: not host_processes("llh1") and not host_processes("llh2"), 30, "no job process on either host"
    )
    events = [str(x.get("event")) for t in ("finetune", "finetune[1]") for x in client.log_lines(run_id, t)]
    assert any("node " in e and " failed: " in e for e in events), "no node names the failed node"
    print(f"killed a rank on llh2: both node tasks failed {ended:.1f} s later, no process left")


def test_more_nodes_than_free_hosts_fail_within_the_start_timeout(
    stack: Stack, client: AirflowLive, inputs: Path
) -> None:
    timeout = 30
    conf_ = conf(stack, inputs, nodes=3, node_start_timeout=timeout,
                 overrides={"parallel_config.data_parallel": 3})  # fmt: skip
    result = run(client, conf_, timeout=600)
    run_id = result["run_id"]
    assert result["run"]["state"] == "failed"
    tis = client.task_instances(run_id)
    states = [tis[t]["state"] for t in ("finetune", "finetune[1]", "finetune[2]")]
    assert states == ["failed"] * 3, client.run_summary(run_id)
    events = [
        str(x.get("event"))
        for t in ("finetune", "finetune[1]", "finetune[2]")
        for x in client.log_lines(run_id, t)
    ]
    assert any(f"did not join within {timeout} s" in e for e in events), "no node said who was missing"
    # two start-up time-outs at most: the first nodes give up, the late one finds no live session
    assert result["elapsed_s"] < 2 * timeout + 150
    print(f"3 nodes on 2 hosts: failed after {result['elapsed_s']:.0f} s (start time-out {timeout} s)")


def test_a_fine_tune_longer_than_many_token_lifetimes_succeeds(
    stack: Stack, client: AirflowLive, inputs: Path
) -> None:
    assert stack.env()["AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME"] == str(TOKEN_LIFETIME_S)
    long = {"runner_config.epochs": 100, "callbacks.1.save_checkpoint_steps": 1000, **EVAL_AT_END}
    result = run(client, conf(stack, inputs, overrides=long), timeout=1200)
    run_id = result["run_id"]
    assert result["run"]["state"] == "success", client.failure_report(run_id)
    finetune = client.task_instance(run_id, "finetune")
    seconds = finetune["duration"]
    assert seconds > 5 * TOKEN_LIFETIME_S, f"the fine-tune took only {seconds:.0f} s"
    print(f"fine-tune of {seconds:.0f} s with a {TOKEN_LIFETIME_S} s task token: success")


def test_stop_leaves_nothing_and_a_restart_reuses_the_database(stack: Stack, client: AirflowLive) -> None:
    before = {r["dag_run_id"] for r in client.dag_runs()}
    stack.stop(timeout=30)
    assert not namespaces()
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if str(stack.root) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers
    stack.start(ascend_workers=1, netns_hosts=0)
    client.token(refresh=True)  # a new session of the same deployment
    assert before <= {r["dag_run_id"] for r in client.dag_runs()}
