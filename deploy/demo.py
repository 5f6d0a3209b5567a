"""`python -m deploy.stack demo`: the demo's fine-tune triggered through a running stack's REST API."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import requests

from deploy.stack import DEMO_DAG, Stack

# An api-server just (re)started takes ~10 s to answer (more under load): wait for it this long.
API_WAIT_S = 60.0


def rest_session(stack: Stack, wait_s: float = API_WAIT_S) -> tuple[requests.Session, str]:
    """A session logged in to the stack's API as its admin, and the API's base URL."""
    state = stack.load()
    if state is None:
        raise RuntimeError(f"no stack in {stack.root}: make airflow first")
    api = f"http://127.0.0.1:{state.api_port}"
    http = requests.Session()
    http.trust_env = False
    login = {"username": "admin", "password": state.secrets["admin_password"]}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            token = http.post(f"{api}/auth/token", json=login, timeout=30)
            break
        except requests.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the stack's api-server at {api} did not answer within {wait_s:.0f} s: is it up "
                    f"(make airflow)? its log: {stack.root / 'logs' / 'api-server.log'}"
                ) from exc
            time.sleep(1)
    token.raise_for_status()
    http.headers["Authorization"] = "Bearer " + token.json()["access_token"]
    return http, api


def demo_conf(stack: Stack, **changes: Any) -> dict[str, Any]:
    """The demo's params on this stack (its generated inputs, written now; training under work/demo)."""
    from llama_core.demo import demo_params

    inputs = stack.root / "work" / "inputs"
    subprocess.run([sys.executable, "-m", "llama_core.demo", str(inputs)], check=True, capture_output=True)
    return {**demo_params(str(inputs), stack.root / "work" / "demo"), **changes}


def run_demo(
    stack: Stack, nodes: int = 1, timeout: float = 900, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The demo's fine-tune (generated inputs, 2 CPU ranks over `nodes` nodes) triggered through the
    REST API and waited for; returns the run as the API reports it."""
    http, api = rest_session(stack)
    dag = f"{api}/api/v2/dags/{DEMO_DAG}"
    http.patch(dag, json={"is_paused": False}).raise_for_status()
    created = http.post(f"{dag}/dagRuns", json={"logical_date": None, "conf": demo_conf(stack, nodes=nodes)})
    created.raise_for_status()
    run_id = created.json()["dag_run_id"]
    log(f"triggered {run_id}: {api}/dags/{DEMO_DAG}/runs/{run_id}")
    deadline = time.monotonic() + timeout
    while (run := http.get(f"{dag}/dagRuns/{run_id}").json())["state"] not in ("success", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run_id} still {run['state']} after {timeout:.0f} s")
        time.sleep(3)
    log(f"{run_id}: {run['state']}")
    return run
