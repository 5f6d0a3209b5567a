"""A real Airflow deployment on this machine, as the official docker-compose runs one: `make airflow`.

`python -m deploy.stack start|stop|status|demo [--root .airflow] [--ascend-workers N] [--netns-hosts N]
[--nodes N]` (`demo`: the demo's fine-tune triggered through the REST API and waited for)

- PostgreSQL (Debian's server: `initdb` + `pg_ctl`, as the `postgres` user when run as root) is the
  metadata DB, Redis the Celery broker;
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
secrets and ports, chosen at the first start and kept, so a second start reuses the DB. `stop` ends
every process it started (by pid and start time) and removes the namespaces; the data stays.
`SERVICES` and `airflow_settings` are the deployment's one description: docker/docker-compose.yaml
runs the same commands with the same settings (tests/test_deploy.py holds them equal).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from llama_core.atomic import write_bytes_atomic
from llama_core.launch.preflight import free_port as any_free_port
from llama_core.launch.watch import last_lines

REPO = Path(__file__).resolve().parents[1]
POOL = "ascend_nodes"
DEMO_DAG = "llama2_tiny_lora_demo"
ASCEND_QUEUE = "ascend"
BRIDGE = "llbr0"
SUBNET = ipaddress.ip_network("10.77.0.0/24")  # the netns hosts' network (no route leaves the machine)
DB_USER = DB_NAME = "airflow"

# Airflow's commands, by service name: docker-compose.yaml runs the same (tests/test_deploy.py).
SERVICES: dict[str, list[str]] = {
    "api-server": ["airflow", "api-server"],
    "scheduler": ["airflow", "scheduler"],
    "dag-processor": ["airflow", "dag-processor"],
    "triggerer": ["airflow", "triggerer"],
    "worker": ["airflow", "celery", "worker", "--queues", "default"],
    "ascend-worker": ["airflow", "celery", "worker", "--queues", ASCEND_QUEUE, "--concurrency", "1"],
}


def airflow_settings(
    *,
    db_url: str,
    broker_url: str,
    api_url: str,
    secrets_: Mapping[str, str],
    dags_folder: str,
    work_root: str,
    pipelines: str,
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
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "300",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        # the address other hosts reach this one at: where the UI fetches a worker's task logs
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "llama_core.launch.cluster.node_address",
        "LLAMA_LORA_WORK_ROOT": work_root,
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
    procs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> pid, create_time, netns


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

    # ------------------------------------------------------------ state

    def load(self) -> StackState | None:
        if self.state_file.exists():
            self.state = StackState(**json.loads(self.state_file.read_text()))
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

    @property
    def bridge_ip(self) -> str:
        return str(SUBNET.network_address + 1)

    def host_ip(self, k: int) -> str:
        """The address of netns host k (1-based)."""
        return str(SUBNET.network_address + 10 + k)

    def listen(self) -> list[str]:
        assert self.state is not None
        return ["127.0.0.1", *([self.bridge_ip] if self.state.netns_hosts else [])]

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
            "LLAMA_LORA_NODE_ADDR": self.bridge_ip
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
            self.create_hosts(netns_hosts)
        self.start_postgres(log)
        self.start_redis(log)
        log("airflow db migrate ...")
        self.airflow("db", "migrate", timeout=600)
        slots = ascend_workers + netns_hosts
        self.airflow("pools", "set", POOL, str(slots), "one slot per Ascend node (queue ascend)")
        self.write_pipelines(slots)
        for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
            self.spawn(name, SERVICES[name], self.env())
        self.spawn("worker", SERVICES["worker"], self.env(), serve_logs=True)
        for i in range(1, ascend_workers + 1):
            # this host's log server (the default worker's) serves the shared log folder
            self.spawn(f"ascend-worker-{i}", SERVICES["ascend-worker"], self.env(), serve_logs=False)
        for k in range(1, netns_hosts + 1):
            ip = self.host_ip(k)
            env = self.env(
                self.bridge_ip,
                {
                    "LLAMA_LORA_NODE_ADDR": ip,
                    "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.root / f"host{k}" / "logs"),
                },
            )
            self.spawn(f"ascend-host-{k}", SERVICES["ascend-worker"], env, serve_logs=True, netns=f"llh{k}")
        (self.root / "env").write_text(self.env_file_text())
        self.wait_ready(timeout)
        log(
            f"Airflow is up: http://127.0.0.1:{state.api_port}  "
            f"login admin / {state.secrets['admin_password']}\n"
            f"CLI: source {self.root / 'env'}   stop: make airflow-stop   logs: {self.root / 'logs'}"
        )
        return state

    def airflow(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        env = self.env()
        proc = subprocess.run(
            [shutil.which("airflow", path=env["PATH"]) or "airflow", *args],
            env=env,
            cwd=self.root / "run",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        return proc

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        serve_logs: bool = True,
        netns: str | None = None,
    ) -> None:
        """Start one component in its own session (unless it already runs), its output in logs/NAME.log."""
        assert self.state is not None
        if self._alive(self.state.procs.get(name)):
            return
        argv = list(argv)
        if argv[:3] == ["airflow", "celery", "worker"]:
            argv += ["--celery-hostname", f"{name}@%h"]
            if not serve_logs:
                argv.append("--skip-serve-logs")
        if argv[0] == "airflow":  # this venv's
            argv[0] = str(Path(sys.executable).parent / "airflow")
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        with open(self.root / "logs" / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                argv, env=dict(env), cwd=self.root / "run", stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.state.procs[name] = {
            "pid": proc.pid,
            "create_time": psutil.Process(proc.pid).create_time(),
            "netns": netns,
        }
        self.save()

    @staticmethod
    def _alive(info: Mapping[str, Any] | None) -> bool:
        if not info:
            return False
        try:
            proc = psutil.Process(info["pid"])
            same = abs(proc.create_time() - info["create_time"]) < 0.01
            return same and proc.status() != psutil.STATUS_ZOMBIE  # exited, not yet reaped by us
        except psutil.NoSuchProcess:
            return False

    # ------------------------------------------------------------ PostgreSQL and Redis

    def _as_postgres(self, argv: list[str]) -> list[str]:
        """Run a PostgreSQL tool (found by `pg_tool`) as `postgres` when we are root (the server
        refuses root)."""
        return self._as_postgres_cmd([pg_tool(argv[0]), *argv[1:]])

    @staticmethod
    def _as_postgres_cmd(argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start_postgres(self, log: Callable[[str], None]) -> None:
        st = self.state
        assert st is not None
        data = self.root / "pg"
        owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if (
            owner is not None
            and subprocess.run(self._as_postgres_cmd(["test", "-x", str(self.root)])).returncode
        ):
            raise RuntimeError(
                f"the postgres user cannot reach {self.root}: make its parent folders traversable "
                "(chmod o+x) or choose another --root"
            )
        if not (data / "PG_VERSION").exists():
            log(f"creating the PostgreSQL cluster in {data}")
            data.mkdir(mode=0o700, exist_ok=True)
            pwfile = self.root / "run" / "pgpass.tmp"
            pwfile.write_text(st.secrets["db_password"] + "\n")
            if owner is not None:
                for path in (data, pwfile):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
            try:
                subprocess.run(
                    self._as_postgres(
                        ["initdb", "-D", str(data), "-U", DB_USER, "--pwfile", str(pwfile),
                         "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"]
                    ),
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
            finally:
                pwfile.unlink(missing_ok=True)
        hba = data / "pg_hba.conf"
        line = f"host all all {SUBNET} scram-sha-256\n"
        if st.netns_hosts and line not in hba.read_text():
            with open(hba, "a") as f:
                f.write(line)
        sockets, pg_log = self.root / "run", self.root / "logs" / "postgres.log"
        pg_log.touch()
        if owner is not None:
            for path in (sockets, pg_log):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        status = subprocess.run(self._as_postgres(["pg_ctl", "-D", str(data), "status"]), capture_output=True)
        if status.returncode == 0:
            subprocess.run(self._as_postgres(["pg_ctl", "-D", str(data), "reload"]), capture_output=True)
            return
        log(f"starting PostgreSQL on {','.join(self.listen())}:{st.pg_port}")
        options = f"-p {st.pg_port} -k {sockets} -c listen_addresses={','.join(self.listen())}"
        started = subprocess.run(
            self._as_postgres(
                [
                    "pg_ctl",
                    "-D",
                    str(data),
                    "-l",
                    str(self.root / "logs" / "postgres.log"),
                    "-o",
                    options,
                    "-w",
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
        )
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start:\n{started.stdout}{started.stderr}")
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"
        exists = subprocess.run(
            self._as_postgres(["psql", "-h", str(sockets), "-p", str(st.pg_port), "-U", DB_USER,
                               "-d", "postgres", "-tAc", query]),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        if exists.stdout.strip() != "1":
            subprocess.run(
                self._as_postgres(
                    ["createdb", "-h", str(sockets), "-p", str(st.pg_port), "-U", DB_USER, DB_NAME]
                ),
                check=True,
                capture_output=True,
            )

    def start_redis(self, log: Callable[[str], None]) -> None:
        st = self.state
        assert st is not None
        if self._alive(st.procs.get("redis")):
            return
        log(f"starting Redis on {','.join(self.listen())}:{st.redis_port}")
        conf = self.root / "run" / "redis.conf"
        conf.write_text(
            f"bind {' '.join(self.listen())}\nport {st.redis_port}\n"
            f"requirepass {st.secrets['redis_password']}\n"
            f'dir {self.root / "run"}\nsave ""\nappendonly no\nprotected-mode no\n'
            f"logfile {self.root / 'logs' / 'redis.log'}\n"
        )
        os.chmod(conf, 0o600)
        self.spawn("redis", ["redis-server", str(conf)], os.environ)

    # ------------------------------------------------------------ netns hosts

    def create_hosts(self, n: int) -> None:
        """Namespaces llh1..llhN on bridge llbr0 (SUBNET): each a host with one address."""
        run = _run_quiet
        if not _exists(["ip", "link", "show", BRIDGE]):
            run(["ip", "link", "add", BRIDGE, "type", "bridge"])
            run(["ip", "addr", "add", f"{self.bridge_ip}/{SUBNET.prefixlen}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        for k in range(1, n + 1):
            ns, veth = f"llh{k}", f"vllh{k}"
            if not _exists(["ip", "netns", "exec", ns, "true"]):
                run(["ip", "netns", "add", ns])
            if not _exists(["ip", "link", "show", veth]):
                run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
                run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "ip",
                        "addr",
                        "add",
                        f"{self.host_ip(k)}/{SUBNET.prefixlen}",
                        "dev",
                        "eth0",
                    ]
                )
            run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
            run(["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"])
            run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])

    def remove_hosts(self) -> None:
        k = 1
        while _exists(["ip", "netns", "exec", f"llh{k}", "true"]):
            for pid in subprocess.run(
                ["ip", "netns", "pids", f"llh{k}"], capture_output=True, text=True
            ).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", f"llh{k}"], capture_output=True)
            k += 1
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)

    # ------------------------------------------------------------ readiness

    def wait_ready(self, timeout: float) -> None:
        """Until the API answers, scheduler, dag-processor and triggerer are healthy and every Celery
        worker answers a ping; a component that exits fails at once with its log's tail."""
        import requests

        st = self.state
        assert st is not None
        deadline = time.monotonic() + timeout
        workers = {"worker", *(n for n in st.procs if n.startswith(("ascend-worker-", "ascend-host-")))}
        url = f"http://127.0.0.1:{st.api_port}/api/v2/monitor/health"
        while True:
            self.check_alive()
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

    def check_alive(self) -> None:
        assert self.state is not None
        for name, info in self.state.procs.items():
            if not self._alive(info):
                tail = last_lines(self.root / "logs" / f"{name}.log", 30)
                raise RuntimeError(f"{name} is not running; the end of its log:\n{tail}")

    # ------------------------------------------------------------ stop

    def stop(self, timeout: float = 60, log: Callable[[str], None] = print) -> list[str]:
        """Stop every process started here (SIGTERM to each process group, SIGKILL after `timeout`),
        PostgreSQL and the namespaces. Returns the names that needed SIGKILL."""
        state = self.load()
        if state is None:
            log(f"nothing to stop: no stack in {self.root}")
            return []
        alive = {n: i for n, i in state.procs.items() if self._alive(i)}
        for info in alive.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self._alive(i) for i in alive.values()):
            time.sleep(0.5)
        killed = [n for n, i in alive.items() if self._alive(i)]
        for name in killed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(alive[name]["pid"], signal.SIGKILL)
        data = self.root / "pg"
        if (data / "PG_VERSION").exists():
            subprocess.run(
                self._as_postgres(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
            )
        if state.netns_hosts:
            self.remove_hosts()
        state.procs = {}
        self.save()
        log(
            f"stopped {len(alive)} processes and PostgreSQL"
            + (f" ({', '.join(killed)} killed)" if killed else "")
        )
        return killed

    def run_demo(
        self, nodes: int = 1, timeout: float = 900, log: Callable[[str], None] = print
    ) -> dict[str, Any]:
        """The demo's fine-tune (generated inputs, 2 CPU ranks over `nodes` nodes) triggered through the
        REST API and waited for; returns the run as the API reports it."""
        import requests

        from llama_core.demo import demo_params

        state = self.load()
        if state is None:
            raise RuntimeError(f"no stack in {self.root}: make airflow first")
        inputs = self.root / "work" / "inputs"
        subprocess.run(
            [sys.executable, "-m", "llama_core.demo", str(inputs)], check=True, capture_output=True
        )
        api = f"http://127.0.0.1:{state.api_port}"
        http = requests.Session()
        http.trust_env = False
        login = {"username": "admin", "password": state.secrets["admin_password"]}
        http.headers["Authorization"] = (
            "Bearer " + http.post(f"{api}/auth/token", json=login).json()["access_token"]
        )
        dag = f"{api}/api/v2/dags/{DEMO_DAG}"
        http.patch(dag, json={"is_paused": False}).raise_for_status()
        conf = {**demo_params(str(inputs), self.root / "work" / "demo"), "nodes": nodes}
        created = http.post(f"{dag}/dagRuns", json={"logical_date": None, "conf": conf})
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

    def status(self) -> dict[str, bool]:
        state = self.load()
        return {n: self._alive(i) for n, i in (state.procs.items() if state else [])}


def pg_tool(name: str) -> str:
    """A PostgreSQL program: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True
    ):
        if (folder / name).exists():
            return str(folder / name)
    raise RuntimeError(f"{name} not found: install PostgreSQL's server (Debian: apt-get install postgresql)")


def check_tools(netns_hosts: int) -> None:
    """Fail before starting anything when a program the stack needs is missing, saying what to install."""
    pg_tool("initdb")
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found: install Redis (Debian: apt-get install redis-server)")
    if netns_hosts and (os.geteuid() != 0 or shutil.which("ip") is None):
        raise RuntimeError("--netns-hosts needs root and iproute2's `ip` (network namespaces)")


def _run_quiet(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def _exists(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True).returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status", "demo"])
    parser.add_argument("--root", default=str(REPO / ".airflow"), help="state folder (default .airflow/)")
    parser.add_argument("--ascend-workers", type=int, default=1, help="Ascend workers on this host")
    parser.add_argument(
        "--netns-hosts", type=int, default=0, help="Ascend workers in network namespaces (root)"
    )
    parser.add_argument(
        "--api-port", type=int, default=None, help="UI port at the first start (default 8080)"
    )
    parser.add_argument("--nodes", type=int, default=1, help="demo: nodes the fine-tune spans")
    args = parser.parse_args(argv)
    stack = Stack(args.root)
    if args.action == "start":
        stack.start(args.ascend_workers, args.netns_hosts, args.api_port)
    elif args.action == "stop":
        stack.stop()
    elif args.action == "demo":
        return 0 if stack.run_demo(args.nodes)["state"] == "success" else 1
    else:
        for name, alive in stack.status().items():
            print(f"{name:20s} {'running' if alive else 'not running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
