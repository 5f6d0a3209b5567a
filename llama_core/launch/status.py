"""What the launcher and the rank wrappers share: status files, environment, parent-death signal.

Each process msrun starts runs under a wrapper that writes `STATUS_DIR/<name>.pid.json` when it
starts and `STATUS_DIR/<name>.exit.json` when its command ends (`name` is `rank_<RANK_ID>` or
`scheduler`). The launcher writes `STATUS_DIR/stop.json` before it stops the job. Every process of a
job carries `LAUNCHER_PID_ENV` (the launcher's pid) and `LAUNCHER_START_ENV` (its `start_time`), so a
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
# /proc/<pid>/stat: starttime is field 22, the 20th after the command name (field 2).
_STARTTIME_AFTER_COMM = 19


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


def start_time(pid: int) -> float:
    """When process `pid` started, as recorded to tell it from a later process given the same pid.

    On Linux: seconds since boot, from the starttime field of /proc/<pid>/stat (proc(5)). psutil's
    `create_time` adds the boot time, which the kernel derives from the wall clock: a clock step or
    slew that moves it past a whole second makes a live process no longer match what another
    process recorded for it (CI saw a healthy rank reported vanished). Elsewhere psutil's value.
    Raises psutil.NoSuchProcess when the process is gone.
    """
    if not sys.platform.startswith("linux"):
        return psutil.Process(pid).create_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise psutil.NoSuchProcess(pid) from exc
    try:  # the command name (2nd field) may hold spaces and ")": count the fields after its last ")"
        return int(stat.rsplit(b")", 1)[1].split()[_STARTTIME_AFTER_COMM]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):  # not the layout proc(5) documents: psutil's own reading
        return psutil.Process(pid).create_time()


def is_running(pid: int | None, started: float | None) -> bool:
    """True while the process `pid` that started at `started` (its `start_time`) runs; a reused pid
    or a zombie is not it."""
    if pid is None:
        return False
    try:
        return start_time(pid) == started and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
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
