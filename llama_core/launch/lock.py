"""The run-folder lock: one msrun job at a time per run folder (per node of a multi-node run).

A task Celery delivers twice, a retry started while the first try's ranks still save, or a clear run
on another host that shares the disk would otherwise train two jobs into one folder, each deleting
the other's checkpoints. The process table cannot see other hosts; a lock on the shared disk can.

Two `flock` files in the job's log folder:
- `JOB_LOCK`, exclusive, taken by the launcher before msrun starts and held by the launcher and by
  msrun (the descriptor is passed on), so it is free only when both are gone;
- `RANKS_LOCK`, shared, taken by every rank wrapper and passed to its rank, for as long as the rank
  lives. The launcher takes it exclusively for a moment before it starts msrun: that waits for the
  ranks of an earlier job whose launcher died (they stop themselves within a second) and refuses
  while any still run.
The job lock's content names its holder (host, pid, start time) for the refusal message. flock over
NFS v4 is a byte-range lock on the server, so it holds across hosts there too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from llama_core.launch.results import LaunchError

JOB_LOCK = ".job.lock"
RANKS_LOCK = ".ranks.lock"
# A launcher killed a moment ago releases at once; its ranks stop within a second or two.
LOCK_WAIT_S = 30.0
_POLL_S = 0.2


def _flock(fd: int, mode: int, deadline: float) -> bool:
    """Try `flock(fd, mode)` until `deadline` (monotonic); True once held."""
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']} since {time.ctime(info['since'])}"
    return "a process that did not say who it is"


class RunFolderLock:
    """Held from `acquire()` to `release()` by the launcher (and, through `fd`, by msrun)."""

    def __init__(self, log_dir: Path, wait_s: float = LOCK_WAIT_S) -> None:
        self.path = log_dir / JOB_LOCK
        self.ranks_path = log_dir / RANKS_LOCK
        self.wait_s = wait_s
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the job lock, then make sure no rank of an earlier job runs; LaunchError otherwise."""
        deadline = time.monotonic() + self.wait_s
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, fcntl.LOCK_EX, deadline):
            os.close(fd)
            raise LaunchError(
                f"another msrun job is training in {self.path.parent} ({_holder(self.path)} holds "
                f"{self.path}); waited {self.wait_s:.0f} s. Two jobs in one run folder would overwrite "
                "each other's checkpoints: stop that one first, or wait for it to end."
            )
        self.fd = fd
        try:
            self._wait_for_earlier_ranks(deadline)
        except BaseException:
            self.release()
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def _wait_for_earlier_ranks(self, deadline: float) -> None:
        fd = os.open(self.ranks_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _flock(fd, fcntl.LOCK_EX, deadline):
                raise LaunchError(
                    f"ranks of an earlier msrun job still run in {self.path.parent} (they hold "
                    f"{self.ranks_path}) although its launcher is gone; waited {self.wait_s:.0f} s. "
                    "Find them with `fuser -v` on that file (on every host sharing the folder) and stop them."
                )
        finally:
            os.close(fd)  # released: this job's ranks take it shared

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def hold_ranks_lock(log_dir: Path) -> int | None:
    """For a rank wrapper: the ranks lock taken shared, its descriptor inheritable (pass it to the rank).
    None when the launcher did not set up a lock folder (the wrapper run by hand)."""
    path = log_dir / RANKS_LOCK
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR)
    # The launcher holds it exclusively only before msrun starts, so this waits for nothing.
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.set_inheritable(fd, True)
    return fd
