"""Each msrun rank's log in the Airflow task log, and a failed rank one click away.

Live: every line a rank writes is logged through its own logger, `msrun.rank_<i>`, so the task
log's "Sources" filter shows one rank alone. At the end: one collapsible `::group::` per rank,
failed ranks first, headed with the rank's state, exit code and log path, holding its last lines.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

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


def summary_lines(exit_codes: Mapping[int, int | None], log_paths: Mapping[int, Path]) -> Iterable[str]:
    """One `::group::` per rank, failed ranks first; `None` exit code means it was still running."""

    def state(code: int | None) -> str:
        if code is None:
            return "killed while running"
        return "ok" if code == 0 else f"FAILED (exit {code})"

    ranks = sorted(exit_codes, key=lambda r: (exit_codes[r] == 0, r))
    for rank in ranks:
        path = log_paths.get(rank)
        yield f"::group::rank {rank}: {state(exit_codes[rank])} - {path}"
        if path is not None:
            yield from tail(Path(path))
        yield "::endgroup::"
