"""The rank wrapper: what msrun starts for each process of a job, around the real command.

`python -m llama_core.launch.wrapper STATUS_DIR -- <command>` records its pid, runs the command as
its child (same stdout: the rank's log) and records the child's exit status. msrun itself only
reports the first failing pid (and nothing with `--join False`), so these files are the launcher's
one robust source of per-rank outcomes.

It also makes sure no rank outlives its launcher, even one killed with SIGKILL (an Airflow task
process that is killed, a worker that dies): a watchdog thread checks every `WATCHDOG_S` that the
launcher recorded in the environment still runs, and when it is gone kills the wrapper's whole
process group (the rank and anything it started). The child also gets the kernel's parent-death
signal, so it dies with the wrapper if the wrapper itself is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from llama_core.atomic import write_json_atomic
from llama_core.launch.lock import hold_ranks_lock
from llama_core.launch.status import (
    LOG_DIR_ENV,
    STOP_FILE,
    is_running,
    launcher_of,
    parent_death_signal,
    start_time,
    status_name,
)

WATCHDOG_S = 0.5


def _watch_launcher(pid: int, started: float, name: str) -> None:
    while is_running(pid, started):
        time.sleep(WATCHDOG_S)
    print(f"[launcher pid {pid} is gone: stopping {name} and everything it started]", flush=True)
    # The wrapper's own group: a rank's wrapper leads its own session (msrun starts ranks with
    # setsid); the scheduler's wrapper shares msrun's group, so msrun goes with it.
    os.killpg(os.getpgid(0), signal.SIGKILL)


def rank_wrapper(status_dir: Path, command: Sequence[str]) -> int:
    """Run `command` as a child, recording our pid first and the child's exit status last."""
    name = status_name()
    me = os.getpid()
    write_json_atomic(
        status_dir / f"{name}.pid.json", {"pid": me, "pgid": os.getpgid(0), "start_time": start_time(me)}
    )
    # The launcher writes STOP_FILE before it reads the pid files: either it sees ours and kills us,
    # or we see its file here, so no rank it meant to stop starts late and runs on unwatched.
    if (status_dir / STOP_FILE).exists():
        status = {"exit_code": -signal.SIGKILL, "not_started": True}
        write_json_atomic(status_dir / f"{name}.exit.json", status)
        return 128 + signal.SIGKILL
    launcher = launcher_of(dict(os.environ))
    log_dir = os.environ.get(LOG_DIR_ENV)
    ranks_lock = hold_ranks_lock(Path(log_dir)) if log_dir else None
    # The rank holds the ranks lock too: a new job in this folder waits until the rank is gone.
    lock_fds = () if ranks_lock is None else (ranks_lock,)
    child = subprocess.Popen(list(command), preexec_fn=parent_death_signal(), pass_fds=lock_fds)
    if launcher is not None:
        threading.Thread(target=_watch_launcher, args=(*launcher, name), daemon=True).start()

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    write_json_atomic(status_dir / f"{name}.exit.json", {"exit_code": code})
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m llama_core.launch.wrapper STATUS_DIR -- COMMAND...", file=sys.stderr)
        return 2
    return rank_wrapper(Path(argv[0]), argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
