"""The stack's processes under supervisord (PyPI `supervisor`): what compose's `restart: always` is to
the containers, supervisord is to `make airflow`. One `Program` says how one service runs; supervisord
starts it in its own process group, restarts it whenever it exits, and stops the whole group (SIGTERM,
SIGKILL after `STOP_WAIT_S`) on `stop`/`shutdown`. Everything is driven over supervisord's XML-RPC
on a unix socket in the stack's folder (mode 0700: root, or the user who started it, only).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A component gets this long to stop after its stop signal before SIGKILL (compose's default is 10 s;
# a Celery worker's warm shutdown and PostgreSQL's checkpoint can take longer).
STOP_WAIT_S = 30
# supervisord gives up on a program that exits within `startsecs` this many times in a row; a
# scheduler exiting while the database is down must keep being restarted, as compose does.
START_RETRIES = 1000


@dataclass
class Program:
    """One supervised service: `command` run in `group` with `env` added to supervisord's own."""

    name: str
    group: str
    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None
    stop_signal: str = "TERM"
    # PostgreSQL's backends must not get the postmaster's stop signal: only it is signalled
    stop_as_group: bool = True
    autostart: bool = False

    def section(self, logs: Path, cwd: Path) -> str:
        lines = [
            f"[program:{self.name}]",
            "command=" + _escape(" ".join(shlex.quote(str(a)) for a in self.command)),
            f"directory={cwd}",
            f"autostart={str(self.autostart).lower()}",
            "autorestart=true",
            "startsecs=1",
            f"startretries={START_RETRIES}",
            f"stopsignal={self.stop_signal}",
            f"stopwaitsecs={STOP_WAIT_S}",
            f"stopasgroup={str(self.stop_as_group).lower()}",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={logs / f'{self.name}.log'}",
            "stdout_logfile_maxbytes=50MB",
            "stdout_logfile_backups=2",
        ]
        if self.user:
            lines.append(f"user={self.user}")
        if self.env:
            lines.append("environment=" + ",".join(f"{k}={_quote_env(v)}" for k, v in self.env.items()))
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    """supervisord's configuration expands `%(name)s`: a literal % is written %%."""
    return text.replace("%", "%%")


def _quote_env(value: str) -> str:
    # supervisord splits `environment=` with a non-POSIX shlex: a double-quoted value may hold anything
    # but a double quote (no escapes exist) and loses quote characters at its ends.
    if '"' in value or "\n" in value or value[-1:] == "'":
        raise ValueError(f"supervisord cannot pass this environment value: {value!r}")
    return _escape(f'"{value}"')


class Supervisor:
    """supervisord for the stack in `root`: its configuration `root/run/supervisord.conf`, its socket and
    pid file in `root/run`, its log and the programs' logs in `root/logs`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "run" / "supervisord.conf"
        self.socket = root / "run" / "supervisor.sock"
        self.pidfile = root / "run" / "supervisord.pid"

    def write(self, groups: Mapping[str, Sequence[Program]]) -> None:
        """The configuration: `groups` in start order (a shutdown stops them in the reverse order, each
        group's programs at once). It holds secrets (the programs' environments): mode 0600."""
        logs, cwd = self.root / "logs", self.root / "run"
        parts = [
            f"[unix_http_server]\nfile={self.socket}\nchmod=0700\n",
            f"[supervisord]\nlogfile={logs / 'supervisord.log'}\npidfile={self.pidfile}\n"
            f"childlogdir={logs}\ndirectory={cwd}\n",
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
            f"[supervisorctl]\nserverurl=unix://{self.socket}\n",
        ]
        for priority, (group, programs) in enumerate(groups.items(), start=1):
            names = ",".join(p.name for p in programs)
            parts.append(f"[group:{group}]\nprograms={names}\npriority={priority * 100}\n")
            parts += [p.section(logs, cwd) for p in programs]
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text("\n".join(parts))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.conf)

    @property
    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def running(self) -> bool:
        try:
            return self.rpc.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def up(self, timeout: float = 30) -> None:
        """Start supervisord with the written configuration, or make a running one apply it (programs
        whose settings changed are restarted, new ones added, removed ones stopped)."""
        if self.running():
            self.ctl("update")
            return
        bindir = Path(sys.executable).parent
        subprocess.run([str(bindir / "supervisord"), "-c", str(self.conf)], check=True)
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start: see {self.root / 'logs' / 'supervisord.log'}")
            time.sleep(0.2)

    def ctl(self, *args: str) -> str:
        """A supervisorctl command (e.g. `restart airflow:scheduler`); its output."""
        bindir = Path(sys.executable).parent
        proc = subprocess.run(
            [str(bindir / "supervisorctl"), "-c", str(self.conf), *args], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"supervisorctl {' '.join(args)}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def start_group(self, group: str) -> None:
        """Start the programs of `group` that do not run (without waiting for them)."""
        self.rpc.startProcessGroup(group, False)

    def processes(self) -> dict[str, dict[str, Any]]:
        """Every program's state by name: `statename` (RUNNING, STARTING, BACKOFF, EXITED, FATAL,
        STOPPED...), `pid`, `start` (epoch s) and `group`; none when supervisord is not running."""
        try:
            return {p["name"]: p for p in self.rpc.getAllProcessInfo()}
        except (OSError, xmlrpc.client.Fault):
            return {}

    def pid(self, name: str) -> int:
        """The pid of the running program `name` (0 when it does not run)."""
        return int(self.processes().get(name, {}).get("pid") or 0)

    def shutdown(self, timeout: float) -> None:
        """Stop every program (the groups in reverse order) and supervisord; wait up to `timeout` s."""
        if not self.running():
            return
        pid = int(self.pidfile.read_text())
        with contextlib.suppress(OSError, xmlrpc.client.Fault):
            self.rpc.shutdown()
        deadline = time.monotonic() + timeout
        while _exists(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord ({pid}) still stopping after {timeout:.0f} s")
            time.sleep(0.3)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
