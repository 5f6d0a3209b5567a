"""Watching a job's processes through their wrappers' status files, and tailing the rank logs."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from llama_core.cli import ERROR_PREFIX
from llama_core.launch.results import RankResult
from llama_core.launch.status import SCHEDULER, is_running, read_json

TAIL_LINES = 20
# How long a stop waits for a wrapper whose command has ended to record its exit status (it does so
# right after the command ends; a loaded node can delay that by a few hundred ms).
RECORD_GRACE_S = 2.0


class LogTail:
    """Yields complete new lines of a growing file (cheap: one read per poll)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self, final: bool = False) -> list[str]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


def last_lines(path: Path, n: int = TAIL_LINES) -> str:
    """The last `n` lines of a log, for error messages. The rank's own `error: ...` line (a
    `LlamaCoreError` such as a full disk, as `cli.exit_code` prints it) leads when teardown noise has
    pushed it out of those lines: it says why the rank failed."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    tail = lines[-n:]
    cause = next((line for line in reversed(lines[:-n]) if line.startswith(ERROR_PREFIX)), None)
    return "\n".join([cause, "...", *tail] if cause else tail) or "(empty log)"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "vanished without an exit status (killed by SIGKILL or the OOM killer?)"
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


@dataclass
class WatchedProcess:
    """One msrun-spawned process as seen through its wrapper's status files."""

    name: str
    result: RankResult
    status_dir: Path
    pid: int | None = None
    pgid: int | None = None
    start_time: float | None = None
    done: bool = False
    tail: LogTail | None = field(default=None)
    # Set when the launcher begins stopping the job: a process that vanishes from then on went down
    # with the stop (msrun SIGKILLs its other workers once the launcher killed one), not by itself.
    stopping: bool = False

    def poll(self) -> bool:
        """Refresh; True once the process has ended (exit code recorded or vanished)."""
        if self.done:
            return True
        if self.pid is None:
            info = read_json(self.status_dir / f"{self.name}.pid.json")
            if info is None:
                return False
            self.pid, self.pgid, self.start_time = info["pid"], info["pgid"], info["start_time"]
        status = read_json(self.status_dir / f"{self.name}.exit.json")
        if status is not None:
            self.result.exit_code = status["exit_code"]
            self.result.killed_by_launcher = status.get("not_started", False)
            self.done = True
        elif not self.alive():
            # The wrapper died without writing (SIGKILL, OOM killer); re-check for a late write.
            status = read_json(self.status_dir / f"{self.name}.exit.json")
            self.result.exit_code = None if status is None else status["exit_code"]
            self.result.killed_by_launcher = status is None and self.stopping
            self.done = True
        return self.done

    def alive(self) -> bool:
        return is_running(self.pid, self.start_time)

    def kill(self) -> None:
        """Refresh, then SIGKILL the process group (wrapper + command + anything they started) while
        the wrapper runs; one that already recorded its exit status keeps it, and so does one whose
        command has just ended on its own (its wrapper is about to record how)."""
        self.poll()
        if self.pgid is None or not self.alive():
            return
        if self._command_ended():
            deadline = time.monotonic() + RECORD_GRACE_S
            while not self.poll() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.done:
                return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        if not self.done:
            self.result.exit_code = -signal.SIGKILL
            self.result.killed_by_launcher = True
            self.done = True

    def _command_ended(self) -> bool:
        """The wrapper runs but has no living child: its command ended (a rank that crashed or was
        killed from outside), and a kill now would record that rank as stopped by the launcher."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return False
        living = 0
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                living += child.status() != psutil.STATUS_ZOMBIE
        return living == 0

    def lingering(self) -> bool:
        """Still to wait for when stopping: a wrapper that runs, or a rank msrun has started (it
        creates the rank's log right before spawning it) that has not registered yet. The
        scheduler, unlike the ranks, stays in msrun's process group and dies with it."""
        if self.pid is None:
            return self.name != SCHEDULER and self.result.log_path.exists()
        return self.alive()
