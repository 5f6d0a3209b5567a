"""Each msrun rank's log in the Airflow task log, at its own level, and a failed rank one click away.

Live: `RankLogRelay` logs every line a rank writes through the rank's own logger, `msrun.rank_<i>`,
so the task log's "Sources" filter shows one rank alone, and prefixes it with `[rank i] ` so ranks
are told apart in the default view too (where the source column is hidden). Each line keeps its
level: MindSpore's `[WARNING]`-style tags, our `LEVEL logger: message` Python logging lines, ERROR for
a whole traceback (chained blocks and the exception's message included), INFO for anything else.
MindSpore's known start-up chatter (connect/register retries, "cluster initialized" notices) is logged
at `chatter_level`, DEBUG by default, so the task log at Airflow's default INFO level hides it; the
rank's own log file is never touched and keeps every line.

At the end: `log_rank_summary` logs one collapsible `::group::` per rank, failed ranks first, under
that rank's logger, headed with its state, exit code and log path, holding its last lines.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

TAIL_LINES = 60
VIEW_LINES = 20  # of a failed rank, in its `ranks` XCom: the view shows them, a few KB at most

_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
_LEVEL = "|".join(_LEVELS)
# One anchored match per line decides its kind: the relay runs for every line of every rank.
# Groups: 1 = MindSpore tag (`[WARNING] ME(...`), 2 = Python logging (`WARNING llama_core.data: ...`),
# 3 = a traceback header or the line joining chained tracebacks.
_LINE_KIND = re.compile(
    rf"\[({_LEVEL})\] |({_LEVEL}) [\w.-]+: "
    r"|(Traceback \(most recent call last\):"
    r"|During handling of the above exception|The above exception was the direct cause)"
)

# MindSpore logs its distributed start-up at WARNING: every connect attempt while the scheduler is
# not listening yet, a "retry" every 0.5 s while ranks register, then success notices (and INFO
# event-loop notices at exit). In a tiny 2-rank run that is a quarter of each rank's lines, drowning
# the real warnings. Only these exact messages are demoted; the failures that matter ("Failed to
# connect to the meta server. Maybe it has exited", heartbeat losses, a peer's end of file) don't
# match, and ERROR/CRITICAL lines are never demoted.
CHATTER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"Connect\] Connection \d+ source: \S+, destination: "),
    re.compile(r"Failed to connect to the meta server node url: "),
    re.compile(r"Failed to register and try to reconnect to the meta server\."),
    re.compile(r"Topology build timed out\., retry\("),
    re.compile(r"Cluster is successfully initialized\."),
    re.compile(r"This node \d+ rank id: \d+"),
    re.compile(r"The worker node start sync start!"),
    re.compile(r"collective communication lib for group \S+ has already been initialized\."),
    re.compile(r"Create collective communication group: "),
    re.compile(r"The group \S+ has already existed\."),
    re.compile(r"TcpConnection is constructed! fd is "),
    re.compile(r"Event base dispatch success!"),
)
# The tuple reads (and tests) one message at a time; the relay checks them in one pass.
_CHATTER = re.compile("|".join(f"(?:{p.pattern})" for p in CHATTER_PATTERNS))


def rank_logger(rank: int) -> logging.Logger:
    """The logger whose name the Airflow UI shows (and filters by) for this rank's lines."""
    return logging.getLogger(f"msrun.rank_{rank}")


class RankLogRelay:
    """`on_line(rank, line)` callback for the launcher: logs each line under the rank's logger at the
    line's own level, MindSpore's known start-up chatter at `chatter_level`."""

    def __init__(self, chatter_level: int = logging.DEBUG) -> None:
        self.chatter_level = chatter_level
        self._loggers: dict[int, logging.Logger] = {}
        # Ranks inside a traceback: its frame lines, exception message (MindSpore's spans lines, C++
        # call stack included) and chained blocks carry no level of their own. The block ends at the
        # next line that has one.
        self._in_traceback: set[int] = set()

    def _level(self, rank: int, line: str) -> int:
        """The level `line` is logged at; tracks whether `rank` is inside a traceback."""
        m = _LINE_KIND.match(line)
        if m is None:
            return logging.ERROR if rank in self._in_traceback else logging.INFO
        tag, python_level, _ = m.groups()
        if tag is None and python_level is None:
            self._in_traceback.add(rank)
            return logging.ERROR
        self._in_traceback.discard(rank)
        if python_level is not None:
            return _LEVELS[python_level]
        level = _LEVELS[tag]
        if level < logging.ERROR and _CHATTER.search(line, m.end()):
            return min(level, self.chatter_level)
        return level

    def __call__(self, rank: int, line: str) -> None:
        logger = self._loggers.get(rank)
        if logger is None:
            logger = self._loggers[rank] = rank_logger(rank)
        line = line.rstrip("\r\n")
        logger.log(self._level(rank, line), "[rank %d] %s", rank, line)


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


def _failed(outcome: RankOutcome) -> bool:
    return not outcome.killed_by_launcher and outcome.exit_code != 0


def _severity(outcome: RankOutcome) -> int:
    """0 failed, 1 stopped by the launcher, 2 ok: the summary's order and, via _SUMMARY_LEVELS, level."""
    return 0 if _failed(outcome) else 1 if outcome.killed_by_launcher else 2


_SUMMARY_LEVELS = (logging.ERROR, logging.WARNING, logging.INFO)


def rank_state(outcome: RankOutcome, stop_cause: str = "another rank failed") -> str:
    """'ok', 'FAILED (exit N)', or why the rank did not finish on its own."""
    if outcome.killed_by_launcher:
        return f"stopped by the launcher: {stop_cause}"
    if outcome.exit_code is None:
        return "FAILED (vanished without an exit status: killed from outside?)"
    return "ok" if outcome.exit_code == 0 else f"FAILED (exit {outcome.exit_code})"


def log_rank_summary(
    ranks: Iterable[RankOutcome], stop_cause: str = "another rank failed"
) -> list[dict[str, Any]]:
    """One `::group::` per rank, failed ranks first, each with its state, log path and last lines;
    returns the same as data, by rank (the finetune task's XCom `ranks`, what the UI view shows):
    rank, state (ok, failed, stopped), detail, exit code, log path, a failed rank's last lines.

    Everything of a group goes through the rank's own logger, so filtering the UI by `msrun.rank_<i>`
    shows its summary too. The header is ERROR for a failed rank, WARNING for one the launcher
    stopped (`stop_cause` says why), INFO when ok; `::endgroup::` repeats the header's level so a
    level filter that shows the header also closes its group.
    """
    states = []
    for outcome in sorted(ranks, key=lambda o: (_severity(o), o.rank)):
        rank, path, severity = outcome.rank, Path(outcome.log_path), _severity(outcome)
        logger, level = rank_logger(rank), _SUMMARY_LEVELS[severity]
        detail, lines = rank_state(outcome, stop_cause), tail(path)
        logger.log(level, "::group::rank %d: %s - %s", rank, detail, path)
        for line in lines:  # INFO: relayed live at their own level already, not counted twice
            logger.info("[rank %d] %s", rank, line)
        logger.log(level, "::endgroup::")
        states.append({
            "rank": rank, "state": ("failed", "stopped", "ok")[severity], "detail": detail,
            "exit_code": outcome.exit_code, "log_path": str(path),
            "last_lines": lines[-VIEW_LINES:] if severity == 0 else [],
        })  # fmt: skip
    return sorted(states, key=lambda s: s["rank"])
