"""What a launch reports: each rank's outcome, the job's, and the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_core.errors import LlamaCoreError


@dataclass
class RankResult:
    """How one rank ended. exit_code: the command's exit code, -N if killed by signal N (-9 when the
    launcher stopped it), None if it vanished without a status."""

    rank: int
    log_path: Path
    exit_code: int | None = None
    killed_by_launcher: bool = False


@dataclass
class LaunchResult:
    """Outcome of a launch; `ranks` is ordered by rank id (only this node's ranks).

    `stop_reason` says why the launcher stopped the job from outside (None when it ran to its end or
    a rank failed).
    """

    ok: bool
    ranks: list[RankResult]
    scheduler: RankResult | None
    log_dir: Path
    msrun_log: Path
    msrun_command: list[str]
    duration_s: float
    master_port: int
    failure: str | None = None
    stop_reason: str | None = None

    @property
    def exit_codes(self) -> dict[int, int | None]:
        return {r.rank: r.exit_code for r in self.ranks}

    @property
    def log_paths(self) -> dict[int, Path]:
        return {r.rank: r.log_path for r in self.ranks}


class LaunchError(LlamaCoreError):
    """The launch failed: pre-flight refused, msrun failed, or a rank exited non-zero or vanished.

    `result` holds every rank's outcome and log path when processes were started (else None);
    `rank` is the failed rank (-1 for the scheduler, None when no rank is at fault). Retryable: a launch
    fails for the node's state (a busy port, a lost device) as often as for its input.
    """

    retryable = True

    def __init__(self, message: str, result: LaunchResult | None = None, rank: int | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.rank = rank


class LaunchStopped(LaunchError):
    """The job was stopped from outside (`MsrunJob.stop`): every process of it is gone."""
