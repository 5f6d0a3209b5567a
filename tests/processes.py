"""Finding a launch's processes, for tests that check nothing outlives a stop."""

from __future__ import annotations

import subprocess
import sys
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


def sleeper_with_env(env: dict[str, str], seconds: float) -> subprocess.Popen:
    """A process that sleeps `seconds` with `env`, returned once /proc shows that environment: right
    after a vfork+exec the kernel may still show it empty, and a scan then would miss it."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"], env=env)
    if not wait_until(lambda: _environ(proc.pid).get("MS_ROLE") == env.get("MS_ROLE"), 10, 0.01):
        proc.kill()
        raise AssertionError(f"pid {proc.pid} never showed its environment")
    return proc


def _environ(pid: int) -> dict[str, str]:
    try:
        return psutil.Process(pid).environ()
    except psutil.Error:
        return {}
