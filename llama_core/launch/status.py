"""What the launcher and the rank wrappers share: status files, environment, parent-death signal.

Each process msrun starts runs under a wrapper that writes `STATUS_DIR/<name>.pid.json` when it
starts and `STATUS_DIR/<name>.exit.json` when its command ends (`name` is `rank_<RANK_ID>` or
`scheduler`). The launcher writes `STATUS_DIR/stop.json` before it stops the job. Every process of a
job carries `LAUNCHER_PID_ENV` (the launcher's pid) and `LAUNCHER_START_ENV` (its start time), so a
wrapper can tell when its launcher is gone and an orphan of a killed job can be recognised.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

STATUS_DIRNAME = ".rank_status"
STOP_FILE = "stop.json"
SCHEDULER = "scheduler"
LAUNCHER_PID_ENV = "LLAMA_LAUNCHER_PID"
LAUNCHER_START_ENV = "LLAMA_LAUNCHER_START"
LOG_DIR_ENV = "LLAMA_LAUNCH_LOG_DIR"
_PR_SET_PDEATHSIG = 1


def status_name() -> str:
    """`scheduler` or `rank_<RANK_ID>`, from the environment msrun gives each process."""
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return SCHEDULER
    return f"rank_{os.environ.get('RANK_ID', os.environ.get('DEVICE_ID', '0'))}"


def read_json(path: Path) -> dict | None:
    """A status file's content, or None while it does not exist (they are written atomically)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_running(pid: int | None, create_time: float | None) -> bool:
    """True while the process `pid` started at `create_time` runs (a reused pid or a zombie is not it)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def launcher_of(env: dict[str, str]) -> tuple[int, float] | None:
    """(pid, start time) of the launcher recorded in a job process's environment, if any."""
    try:
        return int(env[LAUNCHER_PID_ENV]), float(env[LAUNCHER_START_ENV])
    except (KeyError, ValueError):
        return None


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child when its parent thread exits.

    None where prctl is unavailable (not Linux); the watchdog still covers that case. libc is loaded
    here, before the fork, so the child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # the running process's symbols, libc's among them
    parent = os.getpid()

    def set_pdeathsig() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + int(sig))

    return set_pdeathsig
