"""A real Airflow on loopback for tests: start, REST calls, waits, task logs and a process scan.

`AirflowLive(home, ...).start()` runs `airflow db migrate`, then the api-server, scheduler,
dag-processor and triggerer (LocalExecutor, SQLite in `home`) as separate process groups with
their output in `home/<component>.log`. Every process they start (task supervisors, task
processes, msrun and its ranks) inherits `LIVE_TAG_ENV=<tag>` in its environment, so `stop()` can
find and report anything left behind. REST calls carry a JWT from `POST /auth/token`.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psutil
import requests

from llama_core.launch.preflight import free_port as any_free_port

T = TypeVar("T")

LIVE_TAG_ENV = "LLAMA_LIVE_AIRFLOW_TAG"
LAUNCHER_PID_ENV = "LLAMA_LAUNCHER_PID"
# Command-line fragments of the processes a fine-tune starts.
JOB_CMDLINE_MARKERS = ("msrun", "llama_core.run", "llama_core.launch")
# Port 9 (discard) on loopback, where nothing listens: the proxy of every process we start.
DEAD_PROXY = "http://127.0.0.1:9"
LOOPBACK_HOSTS = "127.0.0.1,localhost,::1"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
TERMINAL_RUN_STATES = {"success", "failed"}
TERMINAL_TI_STATES = {"success", "failed", "upstream_failed", "skipped", "removed"}
# Overrides that evaluate the held-out split once, at the end (not every few steps)
EVAL_AT_END = {"eval_step_interval": 100000}
# A demo run cut to what the scheduling tests look at: one epoch of training, evaluated once at the
# end, 4 new tokens per answer, no merged export (params, and overrides on the pipeline's own)
QUICK_RUN = {"max_new_tokens": 4, "export_merged": False}
QUICK_OVERRIDES = {"runner_config.epochs": 1, **EVAL_AT_END}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (never 8793, the worker log server's default)."""
    while (port := any_free_port()) == 8793:
        pass
    return port


class WaitTimeout(AssertionError):
    """`wait_for` gave up; the message says what was awaited and the last value seen."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str = "condition",
    interval: float = 0.5,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` s pass (WaitTimeout).

    `check` runs before every poll and may raise to give up early (e.g. a component died).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if check is not None:
            check()
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def parse_time(value: str | None) -> datetime | None:
    """An API timestamp (ISO 8601, 'Z' or offset) as an aware datetime."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def tail_file(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"<{path} unreadable>"


# ---------------------------------------------------------------- process scan


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    cmdline: str
    launcher_pid: str | None
    tagged: bool

    def __str__(self) -> str:
        owner = f" {LAUNCHER_PID_ENV}={self.launcher_pid}" if self.launcher_pid else ""
        return f"pid {self.pid} (ppid {self.ppid}{owner}): {self.cmdline[:200]}"


def scan_processes(tag: str | None = None, path_hint: str | None = None) -> list[ProcInfo]:
    """Live (non-zombie) processes of interest, read from /proc via psutil.

    A process is reported when its environment carries `LIVE_TAG_ENV=tag` (everything an
    `AirflowLive` started, however deep), or `LLAMA_LAUNCHER_PID` together with the tag, or -- the
    second check, for a launcher that would scrub the environment -- when its command line holds
    one of `JOB_CMDLINE_MARKERS` and `path_hint` (e.g. the test's temp folder).
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        try:
            if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            try:
                env = proc.environ()
            except (psutil.AccessDenied, OSError):
                env = {}
            tagged = tag is not None and env.get(LIVE_TAG_ENV) == tag
            by_cmdline = bool(
                path_hint and path_hint in cmdline and any(m in cmdline for m in JOB_CMDLINE_MARKERS)
            )
            if tagged or by_cmdline:
                found.append(
                    ProcInfo(proc.pid, proc.info["ppid"], cmdline, env.get(LAUNCHER_PID_ENV), tagged)
                )
        except psutil.Error:
            continue
    return found


def job_processes(
    tag: str | None, path_hint: str | None = None, launcher_pid: int | None = None
) -> list[ProcInfo]:
    """Processes of fine-tune jobs: they carry LLAMA_LAUNCHER_PID (of `launcher_pid` when given) or
    have an msrun / llama_core.run / llama_core.launch command line mentioning `path_hint`."""
    jobs = []
    for info in scan_processes(tag, path_hint):
        is_job = info.launcher_pid is not None or any(m in info.cmdline for m in JOB_CMDLINE_MARKERS)
        if launcher_pid is not None and info.launcher_pid not in (None, str(launcher_pid)):
            continue
        if is_job:
            jobs.append(info)
    return jobs


def launcher_pids(tag: str | None) -> set[int]:
    """The task processes that launched a job: the LLAMA_LAUNCHER_PID values of tagged processes."""
    return {int(p.launcher_pid) for p in scan_processes(tag) if p.launcher_pid}


def kill_processes(infos: Iterable[ProcInfo], sig: int = signal.SIGKILL) -> None:
    for info in infos:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(info.pid, sig)


# ---------------------------------------------------------------- Airflow


class ApiError(AssertionError):
    def __init__(self, method: str, path: str, response: requests.Response) -> None:
        super().__init__(f"{method} {path} -> HTTP {response.status_code}: {response.text[:2000]}")
        self.status_code = response.status_code
        self.response = response


# Tasks of the DAG mapped over node ranks: named alone, they mean their instance 0.
MAPPED_TASKS = {"finetune": 0}


@dataclass
class AirflowLive:
    """One Airflow deployment on loopback, in `home` (see the module docstring)."""

    home: Path
    repo: Path
    env_extra: Mapping[str, str] = field(default_factory=dict)
    dag_id: str = "llama2_tiny_lora_demo"
    components: tuple[str, ...] = COMPONENTS
    port: int = 0
    tag: str = ""
    username: str = "admin"
    password: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str | None = None
    _session: requests.Session | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        self.port = self.port or free_port()
        self.tag = self.tag or secrets.token_hex(8)
        self.password = self.password or secrets.token_urlsafe(12)
        self.cwd = self.home / "cwd"  # MindSpore drops compile dumps (rank_<i>/) into the working dir

    # -------------------------------------------------------- set-up

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        passwords = self.home / "passwords.json"
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.repo / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": f"{self.base_url}/",
            "AIRFLOW__API__SECRET_KEY": self._secret("api_secret"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self._port("worker_log")),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self._port("trigger_log")),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.repo), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            LIVE_TAG_ENV: self.tag,
            **self.env_extra,
        }
        # Loopback only: anything that would reach out (an http(s) source, a hub) is sent to a
        # closed loopback port instead, and fails there.
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            env[name] = DEAD_PROXY
        env.update(
            NO_PROXY=LOOPBACK_HOSTS, no_proxy=LOOPBACK_HOSTS, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
        )
        return env

    def _secret(self, name: str) -> str:
        attr = f"_{name}"
        if not hasattr(self, attr):
            setattr(self, attr, secrets.token_urlsafe(64))
        return getattr(self, attr)

    def _port(self, name: str) -> int:
        attr = f"_port_{name}"
        if not hasattr(self, attr):
            setattr(self, attr, free_port())
        return getattr(self, attr)

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run an `airflow` CLI command against this deployment (short-lived, read-mostly use only:
        a second writer on SQLite can lock the scheduler out)."""
        return subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), *args],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 240) -> AirflowLive:
        t0 = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({self.username: self.password}))
        migrate = self.airflow("db", "migrate")
        (self.home / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{(migrate.stdout + migrate.stderr)[-4000:]}")
        self.timings["db_migrate_s"] = time.monotonic() - t0
        env = self.env
        airflow_bin = str(Path(sys.executable).parent / "airflow")
        for name in self.components:
            with open(self.home / f"{name}.log", "ab") as out:
                self.procs[name] = subprocess.Popen(
                    [airflow_bin, name],
                    env=env,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stop() signals the whole group
                )
        wait_for(self._api_up, timeout, "the API server to answer", check=self.check_alive)
        wait_for(
            self._healthy,
            timeout,
            "scheduler, dag-processor and triggerer to be healthy",
            check=self.check_alive,
        )
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _api_up(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def health(self) -> dict[str, Any]:
        return requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=10).json()

    def _healthy(self) -> bool:
        health = self.health()
        wanted = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}
        return all(
            (health.get(key) or {}).get("status") == "healthy"
            for name, key in wanted.items()
            if name in self.components
        )

    def check_alive(self) -> None:
        """Raise, with the tail of its output, when a component has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                output = tail_file(self.home / f"{name}.log", 60)
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{output}")

    def component_log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    # -------------------------------------------------------- tear-down

    def stop(self, timeout: float = 30) -> list[ProcInfo]:
        """Stop every component's process group (SIGTERM, then SIGKILL after `timeout` s), then
        SIGKILL anything else still carrying our tag. Returns what was still alive at that point."""
        t0 = time.monotonic()
        for name in ("scheduler", "triggerer", "dag-processor", "api-server"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():  # the groups: a component's children die with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        time.sleep(0.5)
        leftovers = scan_processes(self.tag, path_hint=str(self.home.parent))
        kill_processes(leftovers)
        self.timings["stop_s"] = time.monotonic() - t0
        return leftovers

    # -------------------------------------------------------- REST

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # no proxy: loopback only
        return self._session

    def token(self, refresh: bool = False) -> str:
        if self._token is None or refresh:
            resp = self.session.post(
                f"{self.base_url}/auth/token",
                json={"username": self.username, "password": self.password},
                timeout=30,
            )
            if resp.status_code not in (200, 201):
                raise ApiError("POST", "/auth/token", resp)
            self._token = resp.json()["access_token"]
        return self._token

    def request(
        self, method: str, path: str, expect: Iterable[int] | None = (200,), **kwargs: Any
    ) -> requests.Response:
        """`method` on `/api/v2` + `path` with the JWT; raises ApiError unless the status is in `expect`."""
        url = f"{self.base_url}/api/v2{path}"
        headers = {"Authorization": f"Bearer {self.token()}", **kwargs.pop("headers", {})}
        resp = self.session.request(method, url, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)
        if resp.status_code == 401:  # token expired: once more with a new one
            headers["Authorization"] = f"Bearer {self.token(refresh=True)}"
            resp = self.session.request(method, url, headers=headers, timeout=60, **kwargs)
        if expect is not None and resp.status_code not in set(expect):
            raise ApiError(method, path, resp)
        return resp

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(
        self, path: str, body: Any, expect: Iterable[int] | None = (200, 201), **kwargs: Any
    ) -> requests.Response:
        return self.request("POST", path, json=body, expect=expect, **kwargs)

    def patch(
        self, path: str, body: Any, expect: Iterable[int] | None = (200,), **kwargs: Any
    ) -> requests.Response:
        return self.request("PATCH", path, json=body, expect=expect, **kwargs)

    # -------------------------------------------------------- DAG, runs, task instances

    def _dag(self, dag_id: str | None) -> str:
        return quote(dag_id or self.dag_id, safe="")

    def dag(self, dag_id: str | None = None) -> dict[str, Any]:
        return self.get(f"/dags/{self._dag(dag_id)}")

    def dag_details(self, dag_id: str | None = None) -> dict[str, Any]:
        return self.get(f"/dags/{self._dag(dag_id)}/details")

    def import_errors(self) -> list[dict[str, Any]]:
        return self.get("/importErrors")["import_errors"]

    def wait_for_dag(self, timeout: float = 120, dag_id: str | None = None) -> dict[str, Any]:
        """Until the dag-processor has serialised the DAG; fails at once with an import error of the
        DAG file that builds the pipelines."""

        def found() -> dict[str, Any] | None:
            errors = [e for e in self.import_errors() if "llama_lora_pipelines.py" in e.get("filename", "")]
            if errors:
                raise AssertionError(f"the DAG file does not import:\n{errors[0].get('stack_trace')}")
            resp = self.request("GET", f"/dags/{self._dag(dag_id)}", expect=None)
            return resp.json() if resp.status_code == 200 else None

        return wait_for(found, timeout, f"DAG {dag_id or self.dag_id} to be parsed", check=self.check_alive)

    def set_paused(self, paused: bool, dag_id: str | None = None) -> dict[str, Any]:
        return self.patch(f"/dags/{self._dag(dag_id)}", {"is_paused": paused}).json()

    def ensure_pool(self, name: str, slots: int, description: str = "") -> dict[str, Any]:
        resp = self.request("GET", f"/pools/{quote(name, safe='')}", expect=None)
        if resp.status_code == 200:
            return self.patch(f"/pools/{quote(name, safe='')}", {"slots": slots}).json()
        return self.post("/pools", {"name": name, "slots": slots, "description": description}).json()

    def trigger(
        self,
        conf: Mapping[str, Any],
        run_id: str | None = None,
        expect: Iterable[int] | None = (200,),
        dag_id: str | None = None,
    ) -> requests.Response:
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf)}
        if run_id:
            body["dag_run_id"] = run_id
        return self.post(f"/dags/{self._dag(dag_id)}/dagRuns", body, expect=expect)

    def dag_run(self, run_id: str, dag_id: str | None = None) -> dict[str, Any]:
        return self.get(f"/dags/{self._dag(dag_id)}/dagRuns/{quote(run_id, safe='')}")

    def dag_runs(self, dag_id: str | None = None, **params: Any) -> list[dict[str, Any]]:
        return self.get(f"/dags/{self._dag(dag_id)}/dagRuns", params={"limit": 100, **params})["dag_runs"]

    def _ti_path(self, run_id: str, task_id: str, dag_id: str | None = None) -> tuple[str, int | None]:
        """The REST path of a task instance and its map index: `task[k]` names mapped instance k, and
        a mapped task named alone (`finetune`, mapped over the nodes) means its instance 0."""
        name, _, index = task_id.partition("[")
        map_index = int(index.rstrip("]")) if index else MAPPED_TASKS.get(name)
        path = f"/dags/{self._dag(dag_id)}/dagRuns/{quote(run_id, safe='')}/taskInstances/{name}"
        return (path if map_index is None else f"{path}/{map_index}"), map_index

    def task_instances(self, run_id: str, dag_id: str | None = None) -> dict[str, dict[str, Any]]:
        """By task id; a mapped task's instance k > 0 as `task[k]`."""
        tis = self.get(
            f"/dags/{self._dag(dag_id)}/dagRuns/{quote(run_id, safe='')}/taskInstances", params={"limit": 100}
        )["task_instances"]
        return {ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] > 0 else ""): ti for ti in tis}

    def task_instance(self, run_id: str, task_id: str, dag_id: str | None = None) -> dict[str, Any]:
        return self.get(self._ti_path(run_id, task_id, dag_id)[0])

    def ti_state(self, run_id: str, task_id: str) -> str | None:
        return self.task_instance(run_id, task_id)["state"]

    def ti_tries(self, run_id: str, task_id: str, dag_id: str | None = None) -> list[dict[str, Any]]:
        """Every try of a task instance (the history plus the current one); none for a mapped task
        that was never expanded (its upstream failed)."""
        try:
            return self.get(self._ti_path(run_id, task_id, dag_id)[0] + "/tries")["task_instances"]
        except ApiError as exc:
            if exc.status_code == 404:
                return []
            raise

    def set_ti_state(self, run_id: str, task_id: str, state: str) -> requests.Response:
        return self.patch(self._ti_path(run_id, task_id)[0], {"new_state": state})

    def clear_tasks(
        self, run_id: str, task_ids: list[str], only_failed: bool = False, downstream: bool = True
    ) -> requests.Response:
        """Clear tasks as the UI's Clear does by default: with their downstream tasks (after the
        fine-tune: evaluate, the exports and the report), else those stay upstream_failed."""
        return self.post(
            f"/dags/{self._dag(None)}/clearTaskInstances",
            {
                "dag_run_id": run_id,
                "task_ids": task_ids,
                "dry_run": False,
                "only_failed": only_failed,
                "include_downstream": downstream,
                "reset_dag_runs": True,
            },
        )

    def wait_run(
        self, run_id: str, timeout: float, states: Iterable[str] = TERMINAL_RUN_STATES
    ) -> dict[str, Any]:
        states = set(states)

        def done() -> dict[str, Any] | None:
            run = self.dag_run(run_id)
            return run if run["state"] in states else None

        return wait_for(
            done, timeout, f"run {run_id} to reach {sorted(states)}", interval=1, check=self.check_alive
        )

    def wait_ti(
        self, run_id: str, task_id: str, states: Iterable[str], timeout: float, interval: float = 0.5
    ) -> dict[str, Any]:
        states = set(states)

        def reached() -> dict[str, Any] | None:
            try:
                ti = self.task_instance(run_id, task_id)
            except ApiError as exc:  # a mapped task has no instance until its upstream ran
                if exc.status_code == 404:
                    return None
                raise
            return ti if ti["state"] in states else None

        return wait_for(
            reached,
            timeout,
            f"{task_id} of {run_id} to reach {sorted(states)}",
            interval=interval,
            check=self.check_alive,
        )

    def task_log(
        self, run_id: str, task_id: str, try_number: int = 1, dag_id: str | None = None
    ) -> dict[str, Any]:
        """The task log as the REST API returns it with `Accept: application/json` (`full_content`)."""
        path, map_index = self._ti_path(run_id, task_id, dag_id)
        if map_index is not None:  # logs take the map index as a query parameter
            path = path.rsplit("/", 1)[0]
        params = {"full_content": "true", **({"map_index": map_index} if map_index is not None else {})}
        return self.get(f"{path}/logs/{try_number}", params=params, headers={"Accept": "application/json"})

    def log_lines(self, run_id: str, task_id: str, try_number: int = 1) -> list[dict[str, Any]]:
        """The structured log lines (dicts with event, level, logger, timestamp, ...) of one try."""
        return [
            line for line in self.task_log(run_id, task_id, try_number)["content"] if isinstance(line, dict)
        ]

    def run_summary(self, run_id: str) -> str:
        """One line per task instance (state, try, times): for assertion messages."""
        try:
            tis = self.task_instances(run_id)
        except Exception as exc:  # a summary must never hide the real failure
            return f"<task instances unavailable: {exc}>"
        return "\n".join(
            f"  {tid}: {ti['state']} try={ti['try_number']} start={ti['start_date']} end={ti['end_date']}"
            for tid, ti in sorted(tis.items())
        )

    def failure_report(self, run_id: str, max_lines: int = 40) -> str:
        """The states of a run's tasks and the last lines of each failed task's log."""
        parts = [f"run {run_id}:", self.run_summary(run_id)]
        with contextlib.suppress(Exception):
            for tid, ti in self.task_instances(run_id).items():
                if ti["state"] in ("failed", "up_for_retry") and ti["try_number"]:
                    lines = self.log_lines(run_id, tid, ti["try_number"])
                    parts.append(f"--- {tid} try {ti['try_number']} (last {max_lines} lines)")
                    parts += [
                        f"{ln.get('level', '')} [{ln.get('logger', '')}] {ln.get('event', '')}"
                        for ln in lines[-max_lines:]
                    ]
        return "\n".join(parts)


# ---------------------------------------------------------------- the web UI (Playwright)

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def ui_login(page: Any, airflow: AirflowLive, timeout_ms: int = 60_000) -> None:
    """Sign in through the simple auth manager's login form, as a person would."""
    page.goto(f"{airflow.base_url}/", timeout=timeout_ms)
    page.get_by_label("Username").fill(airflow.username)
    page.get_by_label("Password").fill(airflow.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=timeout_ms)


def ui_task_log_url(airflow: AirflowLive, run_id: str, task_id: str, try_number: int) -> str:
    name, _, index = task_id.partition("[")
    map_index = int(index.rstrip("]")) if index else MAPPED_TASKS.get(name)
    mapped = "" if map_index is None else f"/mapped/{map_index}"
    return (
        f"{airflow.base_url}/dags/{quote(airflow.dag_id, safe='')}/runs/{quote(run_id, safe='')}"
        f"/tasks/{quote(name, safe='')}{mapped}?try_number={try_number}"
    )


def ui_pick_log_source(page: Any, source: str) -> None:
    """Choose one source in the log view's "All Sources" select."""
    page.get_by_role("combobox").filter(has_text="All Sources").click()
    page.get_by_role("option", name=source, exact=True).click()
    page.keyboard.press("Escape")


def ui_toggle_log_setting(page: Any, name: str) -> None:
    """A log-view setting from its gear menu: "Show Source", "Wrap", "Expand", "Hide Timestamps"."""
    page.get_by_role("button", name="Log Settings").click()
    page.get_by_role("menuitem", name=re.compile(re.escape(name))).click()


def ui_log_items(page: Any) -> dict[int, str]:
    """Text of every item (line or group header) of the virtualised log view, by index: scrolls the
    view from top to bottom, as only the items in sight are rendered."""
    container = page.get_by_test_id("virtual-scroll-container")
    container.evaluate("el => { el.scrollTop = 0; }")
    items: dict[int, str] = {}
    for _ in range(2000):
        page.wait_for_timeout(60)
        for idx, text in container.evaluate(
            """el => [...el.querySelectorAll(
                       '[data-testid^="virtualized-item-"], [data-testid^="group-header-"]')]
                   .map(e => [Number(e.dataset.index), e.innerText])"""
        ):
            items[idx] = text
        done = container.evaluate(
            "el => { const end = el.scrollTop + el.clientHeight >= el.scrollHeight - 2;"
            " el.scrollTop += Math.max(50, el.clientHeight * 0.7); return end; }"
        )
        if done:
            break
    return dict(sorted(items.items()))


def ui_scroll_log_to(page: Any, header_text: str) -> None:
    """Scroll the (virtualised) log view until the group header holding `header_text` is in sight.

    Each probe finds the header and scrolls onto it inside one JS call: between two Playwright calls
    the virtualiser may re-render or drop its rows (wrapped lines change height once measured), which
    made a locator found by `count()` vanish before `scroll_into_view_if_needed`."""
    container = page.get_by_test_id("virtual-scroll-container")
    probe = """(el, text) => {
        const header = [...el.querySelectorAll('[data-testid^="group-header-"]')]
            .find(h => h.innerText.includes(text));
        if (header) {
            header.scrollIntoView({block: "center"});
            const box = header.getBoundingClientRect(), view = el.getBoundingClientRect();
            return box.top >= view.top && box.bottom <= view.bottom ? "seen" : "moved";
        }
        const end = el.scrollTop + el.clientHeight >= el.scrollHeight - 2;
        el.scrollTop += Math.max(50, el.clientHeight * 0.7);
        return end ? "end" : "next";
    }"""
    for _ in range(3):  # from the top again if the rows moved under the scan
        container.evaluate("el => { el.scrollTop = 0; }")
        settled = 0
        for _ in range(2000):
            page.wait_for_timeout(60 if not settled else 300)
            state = container.evaluate(probe, header_text)
            if state == "end":
                break
            # in sight on two probes 300 ms apart: the virtualiser has measured the rows around it
            settled = settled + 1 if state == "seen" else 0
            if settled == 2:
                return
    raise AssertionError(f"no log group header holding {header_text!r} in the log view")


class FinetuneTab:
    """The "Fine-tune" tab of a DAG run (operators/finetune_view.py) in Debian's Chromium, signed in as
    the deployment's admin: `open(run_id)` clicks the tab on the run's page, `text(testid)` reads an
    element of the view inside its frame, `shot(path)` keeps a screenshot."""

    def __init__(self, airflow: AirflowLive, chromium: str = "/usr/bin/chromium") -> None:
        self.airflow, self.chromium = airflow, chromium

    def __enter__(self) -> FinetuneTab:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=self.chromium, args=list(CHROMIUM_ARGS))
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1300})
        self.page.set_default_timeout(60_000)
        ui_login(self.page, self.airflow)
        return self

    def __exit__(self, *exc: object) -> None:
        self.browser.close()
        self._pw.stop()

    def open(self, run_id: str) -> None:
        dag = quote(self.airflow.dag_id, safe="")
        self.page.goto(f"{self.airflow.base_url}/dags/{dag}/runs/{quote(run_id, safe='')}")
        self.page.get_by_role("link", name="Fine-tune", exact=True).click()
        self.frame = self.page.frame_locator("iframe").first
        self.frame.get_by_test_id("ft-run").filter(has_text=run_id).wait_for()

    def text(self, testid: str, timeout_ms: float = 30_000) -> str:
        node = self.frame.get_by_test_id(testid)
        node.wait_for(timeout=timeout_ms)
        return node.inner_text()

    def wait_text(self, testid: str, predicate: Callable[[str], bool], timeout: float = 60) -> str:
        """The element's text once `predicate` holds (the view refreshes every 3 s)."""

        def matching() -> str | None:
            text = self.text(testid)
            return text if predicate(text) else None

        return wait_for(matching, timeout, f"{testid} to change", interval=1)

    def shot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
