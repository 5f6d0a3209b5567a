"""A real Airflow deployment on this machine, as the official docker-compose runs one: `make airflow`.

`python -m deploy.stack start|stop|status|demo|burst [--root .airflow] [--ascend-workers N]
[--netns-hosts N] [--nodes N] [--runs N]` (`demo`: the demo's fine-tune triggered through the REST API
and waited for; `burst`: N demo runs triggered at once, deploy/burst.py)

Every process runs under supervisord (deploy/supervisor.py), which restarts a component that exits, as
compose's `restart: always` does:

- PostgreSQL (Debian's server, `postgres -D` in the foreground as the `postgres` user when run as root)
  is the metadata DB, Redis (`redis-server`, foreground) the Celery broker;
- Airflow's api-server (the UI), scheduler, dag-processor and triggerer, with CeleryExecutor;
- Celery workers: one on the default queue, and "Ascend node" workers on queue `ascend`, concurrency
  1 each: `--ascend-workers N` on this host, and/or `--netns-hosts N`, each in its own Linux network
  namespace (`ip netns`, veth on a bridge; root only) with its own address and its own log folder,
  like a separate host sharing this machine's disk (the shared storage multi-node fine-tunes need).
  Their task logs reach the UI through each worker's log server.
- The pool `ascend_nodes` with one slot per Ascend worker, and the deployment's pipeline folder
  (`<root>/pipelines`, `LLAMA_LORA_PIPELINES`): the shipped pipelines, the demo's moved to queue
  `ascend` and that pool, so its fine-tune runs on the "Ascend" workers.

Everything lives in the root folder (default `.airflow/`, git-ignored): the database, Redis, logs,
secrets and ports, chosen at the first start and kept, so a second start reuses the DB. `stop` has
supervisord stop every program (their process groups) and exit, and removes the namespaces; the data
stays. `status` lists supervisord's view (`supervisorctl -c ROOT/run/supervisord.conf` works too).
`SERVICES` and `airflow_settings` are the deployment's one description: docker/docker-compose.yaml
runs the same commands with the same settings (tests/test_deploy.py holds them equal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from deploy.services import (
    DB_NAME,
    DB_USER,
    SUBNET,
    Postgres,
    bridge_ip,
    check_tools,
    create_hosts,
    host_ip,
    redis_program,
    remove_hosts,
)
from deploy.supervisor import Program, Supervisor
from llama_core.atomic import write_bytes_atomic
from llama_core.launch.preflight import free_port as any_free_port
from llama_core.launch.watch import last_lines

REPO = Path(__file__).resolve().parents[1]
POOL = "ascend_nodes"
DEMO_DAG = "llama2_tiny_lora_demo"
ASCEND_QUEUE = "ascend"

# Airflow's commands, by service name: docker-compose.yaml runs the same (tests/test_deploy.py).
SERVICES: dict[str, list[str]] = {
    "api-server": ["airflow", "api-server"],
    "scheduler": ["airflow", "scheduler"],
    "dag-processor": ["airflow", "dag-processor"],
    "triggerer": ["airflow", "triggerer"],
    "worker": ["airflow", "celery", "worker", "--queues", "default"],
    "ascend-worker": ["airflow", "celery", "worker", "--queues", ASCEND_QUEUE, "--concurrency", "1"],
}
CONTROL_PLANE = ("api-server", "scheduler", "dag-processor", "triggerer")


def airflow_settings(
    *,
    db_url: str,
    broker_url: str,
    api_url: str,
    secrets_: Mapping[str, str],
    dags_folder: str,
    work_root: str,
    pipelines: str,
    source_hosts: str = "",
) -> dict[str, str]:
    """Every setting the components share (environment variables), given the deployment's addresses
    and secrets. The long-run settings are explained in docs/operations.md."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__DAGS_FOLDER": dags_folder,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__FERNET_KEY": secrets_["fernet_key"],
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db_url,
        # an Ascend worker takes one fine-tune at a time and asks for the next only when free
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
        "AIRFLOW__API__BASE_URL": f"{api_url}/",
        "AIRFLOW__API__SECRET_KEY": secrets_["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets_["jwt_secret"],
        # long fine-tunes: the task's token is refreshed by its heartbeats (docs/operations.md)
        "AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME": "600",
        # A control-plane outage (database, API server) must not stop a running fine-tune: its
        # supervisor heartbeats every 5 s and gives up (stops the task) only after 20 failed heartbeats
        # in a row (~200 s: each failure is 5 tries, ~10 s), below the 300 s without one after which
        # the scheduler fails a task. The task's token is renewed only in its last 20 % (120 s of 600):
        # an api-server outage longer than what is left of it is fatal (docs/operations.md).
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "5",
        "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "300",
        # a task whose Celery message was lost (broker restarted) is queued again after this long
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
        # Redis hands an unacknowledged message (a running task's) out again after this long. Airflow
        # ignores that second delivery while the task runs, but not while the api-server is down
        # (then the scheduler fails the running task): 7 days makes it rare
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "604800",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        # the address other hosts reach this one at: where the UI fetches a worker's task logs
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "llama_core.launch.cluster.node_address",
        "LLAMA_LORA_WORK_ROOT": work_root,
        "LLAMA_LORA_SOURCE_ROOTS": work_root,  # local sources: inside the work root (docs/operations.md)
        "LLAMA_LORA_SOURCE_HOSTS": source_hosts,  # the http(s) hosts a trigger may name; empty: any
        "LLAMA_LORA_PIPELINES": pipelines,
    }


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    """`preferred` when it is free on `host`, else any free port."""
    if preferred:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((host, preferred))
            return preferred
    return any_free_port(host)


@dataclass
class StackState:
    """Chosen at the first start and kept in ROOT/stack.json: ports, secrets, the shape."""

    api_port: int
    pg_port: int
    redis_port: int
    log_port: int
    trigger_log_port: int
    secrets: dict[str, str]
    ascend_workers: int = 1
    netns_hosts: int = 0


class Stack:
    """The deployment in `root` (see the module docstring)."""

    def __init__(
        self, root: str | os.PathLike[str], repo: Path = REPO, env_extra: Mapping[str, str] | None = None
    ) -> None:
        """`env_extra`: settings added to every component's environment (e.g. shorter time limits)."""
        self.root = Path(root).absolute()
        self.repo = repo
        self.env_extra = dict(env_extra or {})
        self.home = self.root / "home"  # AIRFLOW_HOME
        self.state_file = self.root / "stack.json"
        self.state: StackState | None = None
        self.supervisor = Supervisor(self.root)

    # ------------------------------------------------------------ state

    def load(self) -> StackState | None:
        if self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            # a stack.json of an earlier version also holds the pids it tracked: not state any more
            self.state = StackState(**{f.name: saved[f.name] for f in fields(StackState) if f.name in saved})
        return self.state

    def save(self) -> None:
        assert self.state is not None
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        os.chmod(tmp, 0o600)  # it holds the secrets
        os.replace(tmp, self.state_file)

    def _new_state(self, ascend_workers: int, netns_hosts: int, api_port: int | None) -> StackState:
        from cryptography.fernet import Fernet

        return StackState(
            api_port=free_port(preferred=api_port or 8080),
            pg_port=free_port(preferred=5432),
            redis_port=free_port(preferred=6379),
            log_port=free_port(preferred=8793),
            trigger_log_port=free_port(preferred=8794),
            secrets={
                "fernet_key": Fernet.generate_key().decode(),
                "api_secret_key": secrets.token_urlsafe(48),
                "jwt_secret": secrets.token_urlsafe(48),
                "db_password": secrets.token_urlsafe(24),
                "redis_password": secrets.token_urlsafe(24),
                "admin_password": secrets.token_urlsafe(12),
            },
            ascend_workers=ascend_workers,
            netns_hosts=netns_hosts,
        )

    # ------------------------------------------------------------ addresses

    def listen(self) -> list[str]:
        assert self.state is not None
        return ["127.0.0.1", *([bridge_ip()] if self.state.netns_hosts else [])]

    def env(self, control_host: str = "127.0.0.1", extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a component that reaches the control plane at `control_host`."""
        st = self.state
        assert st is not None
        db = f"postgresql+psycopg2://{DB_USER}:{st.secrets['db_password']}@{control_host}:{st.pg_port}/{DB_NAME}"
        settings = airflow_settings(
            db_url=db,
            broker_url=f"redis://:{st.secrets['redis_password']}@{control_host}:{st.redis_port}/0",
            api_url=f"http://{control_host}:{st.api_port}",
            secrets_=st.secrets,
            dags_folder=str(self.repo / "dags"),
            work_root=str(self.root / "work"),
            pipelines=str(self.root / "pipelines"),
            source_hosts=os.environ.get("LLAMA_LORA_SOURCE_HOSTS", ""),  # the operator's, as compose's .env
        )
        venv_bin = str(Path(sys.executable).parent)
        return {
            **os.environ,
            **settings,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__API__HOST": "0.0.0.0" if st.netns_hosts else "127.0.0.1",
            "AIRFLOW__API__PORT": str(st.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.root / "passwords.json"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.root / "logs" / "tasks"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(st.log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(st.trigger_log_port),
            # where this host's workers are reached (their logs, msrun's master): the bridge once
            # namespace hosts exist, as they cannot reach this host's loopback
            "LLAMA_LORA_NODE_ADDR": bridge_ip()
            if st.netns_hosts and control_host == "127.0.0.1"
            else control_host,
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.repo), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": f"localhost,127.0.0.1,{SUBNET}",
            "no_proxy": f"localhost,127.0.0.1,{SUBNET}",
            **self.env_extra,
            **(extra or {}),
        }

    def env_file_text(self) -> str:
        """`source ROOT/env` gives a shell the airflow CLI of this deployment."""
        env = self.env()
        keys = sorted(k for k in env if k.startswith(("AIRFLOW", "LLAMA_LORA")))
        return "".join(f"export {k}={shlex.quote(env[k])}\n" for k in keys)

    # ------------------------------------------------------------ the services

    def programs(self) -> dict[str, list[Program]]:
        """What the stack runs, by supervisord group in start order: the data stores, Airflow's control
        plane, the Celery workers (each service's command from SERVICES, with this stack's settings)."""
        st = self.state
        assert st is not None
        listen = self.listen()
        postgres = Postgres(self.root, st.pg_port, listen, st.secrets["db_password"])
        redis = redis_program(self.root, st.redis_port, listen, st.secrets["redis_password"])
        airflow = [self.program(name, "airflow", self.env()) for name in CONTROL_PLANE]
        # this host's log server (the default worker's) serves the shared log folder
        workers = [self.program("worker", "workers", self.env(), service="worker")]
        workers += [
            self.program(f"ascend-worker-{i}", "workers", self.env(), service="ascend-worker", logs=False)
            for i in range(1, st.ascend_workers + 1)
        ]
        for k in range(1, st.netns_hosts + 1):
            env = self.env(
                bridge_ip(),
                {"LLAMA_LORA_NODE_ADDR": host_ip(k),
                 "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.root / f"host{k}" / "logs")},
            )  # fmt: skip
            workers.append(self.program(f"ascend-host-{k}", "workers", env, "ascend-worker", netns=f"llh{k}"))
        return {"data": [postgres.program(), redis], "airflow": airflow, "workers": workers}

    def program(
        self,
        name: str,
        group: str,
        env: Mapping[str, str],
        service: str | None = None,
        logs: bool = True,
        netns: str | None = None,
    ) -> Program:
        """Airflow's `service` (default: `name`) as program `name`: a Celery worker is named `name@host`
        and serves its task logs when `logs`; `netns`: run inside that namespace (another "host")."""
        argv = [str(Path(sys.executable).parent / "airflow"), *SERVICES[service or name][1:]]
        if argv[1:3] == ["celery", "worker"]:
            argv += ["--celery-hostname", f"{name}@%h"] + ([] if logs else ["--skip-serve-logs"])
        if netns:
            argv = [shutil.which("ip") or "ip", "netns", "exec", netns, *argv]
        # supervisord gives every program its own environment on top of its own (ours)
        changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
        return Program(name, group, argv, changed)

    # ------------------------------------------------------------ start

    def write_pipelines(self, ascend_nodes: int) -> Path:
        """`<root>/pipelines`: the shipped pipeline files; the demo's fine-tune goes to the Ascend queue
        and pool (its ranks are CPU processes there) and trains under `<root>/work/demo`."""
        import yaml

        folder = self.root / "pipelines"
        folder.mkdir(exist_ok=True)
        for path in sorted((self.repo / "configs" / "pipelines").glob("*.yaml")):
            doc = yaml.safe_load(path.read_text())
            if doc["dag_id"] == DEMO_DAG:
                doc["work_dir"] = str(self.root / "work" / "demo")
                doc["cluster"] |= {"queue": ASCEND_QUEUE, "pool": POOL, "queue_nodes": max(ascend_nodes, 1)}
            write_bytes_atomic(folder / path.name, yaml.safe_dump(doc, sort_keys=False).encode())
        return folder

    def start(
        self,
        ascend_workers: int = 1,
        netns_hosts: int = 0,
        api_port: int | None = None,
        timeout: float = 300,
        log: Callable[[str], None] = print,
    ) -> StackState:
        """Start everything not running yet (the DB is created once and reused)."""
        check_tools(netns_hosts)
        self.root.mkdir(parents=True, exist_ok=True)
        state = self.load()
        if state is None:
            state = self.state = self._new_state(ascend_workers, netns_hosts, api_port)
        else:
            state.ascend_workers, state.netns_hosts = ascend_workers, netns_hosts
        self.save()
        for folder in ("home", "logs", "run", "work"):
            (self.root / folder).mkdir(exist_ok=True)
        (self.root / "passwords.json").write_text(json.dumps({"admin": state.secrets["admin_password"]}))
        if netns_hosts:
            create_hosts(netns_hosts)
        postgres = Postgres(self.root, state.pg_port, self.listen(), state.secrets["db_password"])
        postgres.init(netns=bool(netns_hosts))
        self.supervisor.write(self.programs())
        log(f"supervisord: PostgreSQL on port {state.pg_port}, Redis on {state.redis_port}")
        self.supervisor.up()
        postgres.wait_and_create_db()
        log("airflow db migrate ...")
        self.airflow("db", "migrate", timeout=600)
        slots = ascend_workers + netns_hosts
        self.airflow("pools", "set", POOL, str(slots), "one slot per Ascend node (queue ascend)")
        self.write_pipelines(slots)
        self.supervisor.start_group("airflow")
        self.supervisor.start_group("workers")
        (self.root / "env").write_text(self.env_file_text())
        self.wait_ready(timeout)
        log(
            f"Airflow is up: http://127.0.0.1:{state.api_port}  "
            f"login admin / {state.secrets['admin_password']}\n"
            f"CLI: source {self.root / 'env'}   stop: make airflow-stop   logs: {self.root / 'logs'}\n"
            f"processes: {Path(sys.executable).parent / 'supervisorctl'} -c {self.supervisor.conf} status"
        )
        return state

    def airflow(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        env = self.env()
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), *args],
            env=env,
            cwd=self.root / "run",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return proc

    # ------------------------------------------------------------ readiness

    def wait_ready(self, timeout: float) -> None:
        """Until the API answers, scheduler, dag-processor and triggerer are healthy and every Celery
        worker answers a ping; a component that exits meanwhile fails at once with its log's tail."""
        import requests

        st = self.state
        assert st is not None
        deadline = time.monotonic() + timeout
        workers = {name for name, p in self.supervisor.processes().items() if p["group"] == "workers"}
        first_pid: dict[str, int] = {}
        url = f"http://127.0.0.1:{st.api_port}/api/v2/monitor/health"
        while True:
            for name, proc in self.supervisor.processes().items():
                restarted = proc["pid"] and first_pid.setdefault(name, proc["pid"]) != proc["pid"]
                if proc["statename"] in ("BACKOFF", "EXITED", "FATAL", "STOPPED") or restarted:
                    raise RuntimeError(f"{name} exited while starting; its log:\n{self.tail(name)}")
            try:
                health = requests.get(url, timeout=5, proxies={"http": "", "https": ""}).json()
                healthy = all(
                    (health.get(k) or {}).get("status") == "healthy"
                    for k in ("scheduler", "dag_processor", "triggerer")
                )
            except (requests.RequestException, ValueError):
                healthy = False
            if healthy and workers <= self.ping_workers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the stack was not ready within {timeout:.0f} s (logs in {self.root / 'logs'})"
                )
            time.sleep(2)

    def ping_workers(self) -> set[str]:
        """The names of the Celery workers that answer a ping."""
        code = (
            "from airflow.providers.celery.executors.celery_executor import app;"
            "import json; print(json.dumps([n for r in (app.control.ping(timeout=2) or []) for n in r]))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            return set()
        names = json.loads(proc.stdout.strip().splitlines()[-1])
        return {n.split("@")[0] for n in names}

    def tail(self, name: str, lines: int = 30) -> str:
        return last_lines(self.root / "logs" / f"{name}.log", lines)

    def check_alive(self) -> None:
        """Raise when supervisord is gone or has given up on a program (or it was stopped): a program
        that exited and is being restarted is alive, as with compose's `restart: always`."""
        procs = self.supervisor.processes()
        if not procs:
            raise RuntimeError(f"supervisord is not running; its log:\n{self.tail('supervisord')}")
        for name, proc in procs.items():
            if proc["statename"] in ("FATAL", "STOPPED"):
                raise RuntimeError(f"{name} is {proc['statename']}; the end of its log:\n{self.tail(name)}")

    # ------------------------------------------------------------ stop

    def stop(self, timeout: float = 120, log: Callable[[str], None] = print) -> None:
        """Stop every program (workers, then Airflow, then PostgreSQL and Redis; SIGKILL after
        STOP_WAIT_S each), supervisord itself, and the namespaces; the data stays."""
        state = self.load()
        if state is None:
            log(f"nothing to stop: no stack in {self.root}")
            return
        self.supervisor.shutdown(timeout)
        if state.netns_hosts:
            remove_hosts()
        log(f"stopped the stack in {self.root}")

    def run_demo(
        self, nodes: int = 1, timeout: float = 900, log: Callable[[str], None] = print
    ) -> dict[str, Any]:
        """The demo's fine-tune on this stack (deploy/demo.py); the run as the API reports it."""
        from deploy.demo import run_demo

        return run_demo(self, nodes, timeout, log)

    def status(self) -> dict[str, str]:
        """Each program's supervisord state (RUNNING, STARTING, BACKOFF, STOPPED...)."""
        return {name: p["statename"] for name, p in self.supervisor.processes().items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status", "demo", "burst"])
    parser.add_argument("--root", default=str(REPO / ".airflow"), help="state folder (default .airflow/)")
    parser.add_argument("--ascend-workers", type=int, default=1, help="Ascend workers on this host")
    parser.add_argument(
        "--netns-hosts", type=int, default=0, help="Ascend workers in network namespaces (root)"
    )
    parser.add_argument(
        "--api-port", type=int, default=None, help="UI port at the first start (default 8080)"
    )
    parser.add_argument("--nodes", type=int, default=1, help="demo: nodes the fine-tune spans")
    parser.add_argument("--runs", type=int, default=20, help="burst: demo runs triggered at once")
    args = parser.parse_args(argv)
    try:
        return _run_action(args)
    except RuntimeError as exc:  # the stack's own errors say what to do: no traceback around them
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run_action(args: argparse.Namespace) -> int:
    stack = Stack(args.root)
    if args.action == "start":
        stack.start(args.ascend_workers, args.netns_hosts, args.api_port)
    elif args.action == "stop":
        stack.stop()
    elif args.action == "demo":
        return 0 if stack.run_demo(args.nodes)["state"] == "success" else 1
    elif args.action == "burst":
        from deploy.burst import burst
        from deploy.demo import demo_conf

        result = burst(stack, demo_conf(stack), args.runs)
        print(result.describe())
        return 0 if set(result.states.values()) == {"success"} and not result.overlaps else 1
    else:
        for name, state in stack.status().items():
            print(f"{name:20s} {state.lower()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
