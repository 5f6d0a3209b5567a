"""Each msrun rank's log in the Airflow task log, and a failed rank one click away.

Live: every line a rank writes is logged through its own logger, `msrun.rank_<i>`, so the task
log's "Sources" filter shows one rank alone. At the end: one collapsible `::group::` per rank,
failed ranks first, headed with the rank's state, exit code and log path, holding its last lines.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

TAIL_LINES = 60


def rank_logger(rank: int) -> logging.Logger:
    """The logger whose name the Airflow UI shows (and filters by) for this rank's lines."""
    return logging.getLogger(f"msrun.rank_{rank}")


class RankLogRelay:
    """`on_line(rank, line)` callback for the launcher: forwards lines to the rank's logger."""

    def __init__(self) -> None:
        self._loggers: dict[int, logging.Logger] = {}

    def __call__(self, rank: int, line: str) -> None:
        logger = self._loggers.get(rank)
        if logger is None:
            logger = self._loggers[rank] = rank_logger(rank)
        logger.info(line.rstrip("\n"))


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last `lines` lines of a text file (empty when it does not exist)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError:
        return []


class RankOutcome(Protocol):
    """How a rank ended, as `llama_core.launch.RankResult` reports it."""

    rank: int
    log_path: Path
    exit_code: int | None
    killed_by_launcher: bool


def rank_state(outcome: RankOutcome) -> str:
    """'ok', 'FAILED (exit N)', or why the rank did not finish on its own."""
    if outcome.killed_by_launcher:
        return "stopped after another rank failed"
    if outcome.exit_code is None:
        return "FAILED (vanished without an exit status: killed from outside?)"
    return "ok" if outcome.exit_code == 0 else f"FAILED (exit {outcome.exit_code})"


def summary_lines(ranks: Iterable[RankOutcome]) -> Iterable[str]:
    """One `::group::` per rank, failed ranks first, each with its state, log path and last lines."""

    def order(outcome: RankOutcome) -> tuple[int, int]:
        state = rank_state(outcome)
        return (0 if state.startswith("FAILED") else 1 if state != "ok" else 2), outcome.rank

    for outcome in sorted(ranks, key=order):
        yield f"::group::rank {outcome.rank}: {rank_state(outcome)} - {outcome.log_path}"
        yield from tail(Path(outcome.log_path))
        yield "::endgroup::"
