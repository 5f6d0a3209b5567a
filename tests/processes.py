"""Finding a launch's processes, for tests that check nothing outlives a stop."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil


def job_processes(launcher_pid: int) -> list[int]:
    """Live processes started by the launcher `launcher_pid` (they carry its pid in their environment)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("LLAMA_LAUNCHER_PID") == str(launcher_pid) and proc.status() != "zombie":
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds passed; its last value, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
