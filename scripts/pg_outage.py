"""How long may PostgreSQL be down while a fine-tune runs? Measured on a real `make airflow` stack.

    .venv/bin/python scripts/pg_outage.py [--outage S]

Starts a stack (deploy/stack.py, its shipped settings) in a temporary folder, triggers the demo's
fine-tune made long, and once it trains stops PostgreSQL (`supervisorctl stop data:postgres`):

- without `--outage`: keeps it down until the task's supervisor gives up and stops the fine-tune
  (its msrun job ends), prints that time (the supervisor's limit; the token's may be lower), starts
  PostgreSQL again and prints the run's final state;
- with `--outage S`: starts it again after S seconds and prints whether the run still succeeds.

The stack is stopped and its folder removed at the end. Root (PostgreSQL's user); ~10 minutes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.stack import DEMO_DAG, Stack, free_port  # noqa: E402
from llama_core.demo import demo_params  # noqa: E402

# a fine-tune far longer than the outage (its supervisor gives up first), without checkpoints or evals
LONG = {
    "runner_config.epochs": 400,
    "callbacks.1.save_checkpoint_steps": 100000,
    "eval_step_interval": 100000,
}


def msrun_running(run_dir: Path) -> bool:
    """Whether an msrun job of this run folder is alive."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "msrun" in cmd and f"--log_dir={run_dir}" in cmd:
            return True
    return False


def api(stack: Stack) -> tuple[requests.Session, str]:
    state = stack.state
    assert state is not None
    base = f"http://127.0.0.1:{state.api_port}"
    http = requests.Session()
    http.trust_env = False
    login = {"username": "admin", "password": state.secrets["admin_password"]}
    token = http.post(f"{base}/auth/token", json=login, timeout=30).json()["access_token"]
    http.headers["Authorization"] = f"Bearer {token}"
    return http, f"{base}/api/v2/dags/{DEMO_DAG}"


def wait(what: str, predicate: Any, timeout: float, interval: float = 1) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


def measure(stack: Stack, outage: float | None) -> None:
    inputs = stack.root / "work" / "inputs"
    subprocess.run([sys.executable, "-m", "llama_core.demo", str(inputs)], check=True, capture_output=True)
    http, dag = api(stack)
    wait("the DAG", lambda: http.get(dag, timeout=30).status_code == 200, 300, 3)
    http.patch(dag, json={"is_paused": False}, timeout=30).raise_for_status()
    conf = {**demo_params(str(inputs), stack.root / "work" / "demo"), "overrides": LONG}
    run_id = http.post(f"{dag}/dagRuns", json={"logical_date": None, "conf": conf}, timeout=30).json()[
        "dag_run_id"
    ]
    run_dir = stack.root / "work" / "demo" / "runs" / run_id / "msrun_log"
    wait("the fine-tune to train", lambda: list(run_dir.glob("worker_*.log")) and msrun_running(run_dir), 600)
    time.sleep(10)  # past the start-up: training
    print(f"{run_id}: training; stopping PostgreSQL")
    t0 = time.monotonic()
    stack.supervisor.ctl("stop", "data:postgres")
    if outage is None:
        wait("the fine-tune to stop", lambda: not msrun_running(run_dir), 1800)
        print(f"the task's supervisor stopped the fine-tune {time.monotonic() - t0:.0f} s into the outage")
    else:
        time.sleep(outage)
        print(f"PostgreSQL down for {time.monotonic() - t0:.0f} s; fine-tune alive: {msrun_running(run_dir)}")
    stack.supervisor.ctl("start", "data:postgres")

    def ended() -> str | None:
        try:
            state = http.get(f"{dag}/dagRuns/{run_id}", timeout=30).json()["state"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return state if state in ("success", "failed") else None

    print(f"{run_id}: {wait('the run to end', ended, 1800, 5)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage", type=float, default=None, help="seconds PostgreSQL stays down")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llama-outage-"))
    root.chmod(0o755)  # the postgres user reaches the database folder
    stack = Stack(root, env_extra={"LLAMA_CORE_CACHE_DIR": str(root / "cache")})
    try:
        stack.start(ascend_workers=1, api_port=free_port())
        measure(stack, args.outage)
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
