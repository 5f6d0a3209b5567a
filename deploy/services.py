"""The stack's non-Airflow pieces: PostgreSQL and Redis as supervised foreground programs, and the
network-namespace "hosts" the Ascend workers run in."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from deploy.supervisor import Program

BRIDGE = "llbr0"
SUBNET = ipaddress.ip_network("10.77.0.0/24")  # the netns hosts' network (no route leaves the machine)
DB_USER = DB_NAME = "airflow"


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


def as_postgres(argv: list[str]) -> list[str]:
    """A PostgreSQL tool (found by `pg_tool`), run as `postgres` when we are root (the server refuses
    root)."""
    argv = [pg_tool(argv[0]), *argv[1:]]
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def check_tools(netns_hosts: int) -> None:
    """Fail before starting anything when a program the stack needs is missing, saying what to install."""
    pg_tool("initdb")
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found: install Redis (Debian: apt-get install redis-server)")
    if netns_hosts and (os.geteuid() != 0 or shutil.which("ip") is None):
        raise RuntimeError("--netns-hosts needs root and iproute2's `ip` (network namespaces)")


class Postgres:
    """The metadata database in `root/pg`, its socket in `root/run/pg`."""

    def __init__(self, root: Path, port: int, listen: list[str], password: str) -> None:
        self.root, self.port, self.listen, self.password = root, port, listen, password
        self.data, self.sockets = root / "pg", root / "run" / "pg"
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def init(self, netns: bool) -> None:
        """Create the cluster once (`initdb`); let the namespace hosts in when there are any."""
        if (
            self.owner is not None
            and subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(self.root)]).returncode
        ):
            raise RuntimeError(
                f"the postgres user cannot reach {self.root}: make its parent folders traversable "
                "(chmod o+x) or choose another --root"
            )
        self.sockets.mkdir(exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(mode=0o700, exist_ok=True)
            pwfile = self.root / "run" / "pgpass.tmp"
            pwfile.write_text(self.password + "\n")
            self._chown(self.data, pwfile)
            try:
                subprocess.run(
                    as_postgres(["initdb", "-D", str(self.data), "-U", DB_USER, "--pwfile", str(pwfile),
                                 "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"]),
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
            finally:
                pwfile.unlink(missing_ok=True)
        self._chown(self.sockets)
        hba = self.data / "pg_hba.conf"
        line = f"host all all {SUBNET} scram-sha-256\n"
        if netns and line not in hba.read_text():
            with open(hba, "a") as f:
                f.write(line)

    def _chown(self, *paths: Path) -> None:
        if self.owner is not None:
            for path in paths:
                os.chown(path, self.owner.pw_uid, self.owner.pw_gid)

    def program(self) -> Program:
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for every client to disconnect)
        command = [pg_tool("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.sockets),
                   "-c", f"listen_addresses={','.join(self.listen)}"]  # fmt: skip
        user = "postgres" if self.owner is not None else None
        return Program("postgres", "data", command, user=user, stop_signal="INT", stop_as_group=False,
                       autostart=True)  # fmt: skip

    def _psql(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        where = ["-h", str(self.sockets), "-p", str(self.port), "-U", DB_USER]
        return subprocess.run(
            as_postgres([args[0], *where, *args[1:]]), capture_output=True, text=True, timeout=timeout
        )

    def ready(self) -> bool:
        return self._psql("pg_isready", "-d", "postgres").returncode == 0

    def wait_and_create_db(self, timeout: float = 60) -> None:
        """Until the server accepts connections; then the `airflow` database, unless it exists."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL is not ready after {timeout:.0f} s: see logs/postgres.log")
            time.sleep(0.5)
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"
        if self._psql("psql", "-d", "postgres", "-tAc", query).stdout.strip() != "1":
            created = self._psql("createdb", DB_NAME)
            if created.returncode != 0:
                raise RuntimeError(f"createdb {DB_NAME}: {created.stderr}")


def redis_program(root: Path, port: int, listen: list[str], password: str) -> Program:
    """Redis in the foreground, logging to its output (supervisord's log file), nothing on disk."""
    conf = root / "run" / "redis.conf"
    conf.write_text(
        f"bind {' '.join(listen)}\nport {port}\nrequirepass {password}\n"
        f'dir {root / "run"}\nsave ""\nappendonly no\nprotected-mode no\ndaemonize no\nlogfile ""\n'
    )
    os.chmod(conf, 0o600)
    return Program("redis", "data", [shutil.which("redis-server") or "redis-server", str(conf)],
                   autostart=True)  # fmt: skip


def bridge_ip() -> str:
    return str(SUBNET.network_address + 1)


def host_ip(k: int) -> str:
    """The address of netns host k (1-based)."""
    return str(SUBNET.network_address + 10 + k)


def create_hosts(n: int) -> None:
    """Namespaces llh1..llhN on bridge llbr0 (SUBNET): each a host with one address."""
    run = _run_quiet
    if not _exists(["ip", "link", "show", BRIDGE]):
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{bridge_ip()}/{SUBNET.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    for k in range(1, n + 1):
        ns, veth = f"llh{k}", f"vllh{k}"
        in_ns = ["ip", "netns", "exec", ns]
        if not _exists([*in_ns, "true"]):
            run(["ip", "netns", "add", ns])
        if not _exists(["ip", "link", "show", veth]):
            run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            run([*in_ns, "ip", "addr", "add", f"{host_ip(k)}/{SUBNET.prefixlen}", "dev", "eth0"])
        run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        run([*in_ns, "ip", "link", "set", "eth0", "up"])
        run([*in_ns, "ip", "link", "set", "lo", "up"])


def remove_hosts() -> None:
    """Every llhK namespace (and whatever still runs in it) and the bridge."""
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


def _run_quiet(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def _exists(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True).returncode == 0
