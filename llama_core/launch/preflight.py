"""Checks before msrun starts: a writable log folder, a free master port, no earlier job left over."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from pathlib import Path

import psutil

from llama_core.launch.results import LaunchError
from llama_core.launch.status import LOG_DIR_ENV, is_running, launcher_of

log = logging.getLogger("llama_core.launch")

# Processes of a job whose launcher died stop themselves within a second (their wrappers' watchdog);
# a retry started right after a stop waits for them instead of refusing.
ORPHAN_WAIT_S = 15.0


def describe(pid: int) -> str:
    """A process's command line, shortened, for messages."""
    with contextlib.suppress(psutil.Error):
        return " ".join(psutil.Process(pid).cmdline())[:200]
    return "?"


def _port_owner(port: int) -> str:
    """Who listens on `port`, as ' by pid N (cmd)', or '' when the OS does not tell us."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" by pid {conn.pid} ({describe(conn.pid)})"
    return ""


def stale_processes(port: int, log_dir: Path | None = None) -> list[psutil.Process]:
    """Processes of an earlier msrun job on `port` (MS_SCHED_PORT) or writing into `log_dir`."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            env = proc.environ()
            same_dir = log_dir is not None and env.get(LOG_DIR_ENV) == str(log_dir)
            if env.get("MS_ROLE") and (env.get("MS_SCHED_PORT") == str(port) or same_dir):
                found.append(proc)
    return found


def _orphaned(proc: psutil.Process) -> bool:
    """True when the process belongs to a job whose launcher is gone (it is stopping itself)."""
    with contextlib.suppress(psutil.Error, OSError):
        launcher = launcher_of(proc.environ())
        return launcher is not None and not is_running(*launcher)
    return True  # it vanished while we looked


def _wait_for_orphans(stale: list[psutil.Process]) -> list[psutil.Process]:
    orphans = [p for p in stale if _orphaned(p)]
    if orphans:
        log.info("waiting up to %.0f s for %d process(es) of a stopped job", ORPHAN_WAIT_S, len(orphans))
        _gone, alive = psutil.wait_procs(orphans, timeout=ORPHAN_WAIT_S)
        return [p for p in stale if p not in orphans or p in alive]
    return stale


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on `addr` now (for a master port chosen per launch)."""
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]


def preflight(log_dir: Path, master_addr: str, master_port: int, is_master: bool) -> None:
    """Refuse to start when the launch could not work: raises LaunchError with the fix."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LaunchError(f"log_dir {log_dir} is not writable: {exc}") from exc
    stale = _wait_for_orphans(stale_processes(master_port, log_dir))
    if stale:
        listing = "; ".join(f"pid {p.pid} ({describe(p.pid)})" for p in stale[:8])
        raise LaunchError(
            f"{len(stale)} process(es) of an earlier msrun job on port {master_port} or in {log_dir} are "
            f"still running (maybe the last training process is running): {listing}. Stop them "
            f"(kill {' '.join(str(p.pid) for p in stale[:8])}) or choose another --master_port."
        )
    if not is_master:
        return
    with socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET) as sock:
        # SO_REUSEADDR: a port in TIME_WAIT after a clean exit is usable; a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((master_addr, master_port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise LaunchError(f"cannot bind master {master_addr}:{master_port}: {exc}") from exc
            raise LaunchError(
                f"master_port {master_port} on {master_addr} is already in use{_port_owner(master_port)}. "
                "Maybe the last training process is running; stop it or choose another --master_port."
            ) from exc
