"""Rate-limited progress lines for task logs: a line every few seconds, never a flood.

Carriage-return progress bars turn into thousands of lines in an Airflow task log, so progress
here is a plain log line (count, percent, rate, ETA) emitted at most every `interval` seconds.
"""

from __future__ import annotations

import logging
import time


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    """3725 -> '1h02m05s'."""
    total = round(s)
    h, rem = divmod(total, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """Counts work done and logs `label: done/total (pct) rate ETA` at most every `interval` s."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "records",
        interval: float = 5.0,
        logger: logging.Logger | None = None,
        start: int = 0,
    ) -> None:
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.logger = logger or logging.getLogger("llama_core.progress")
        self.done = start
        self._start_count = start
        self._t0 = self._last = time.monotonic()

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{int(n):,} {self.unit}"

    def _rate(self) -> float:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        return (self.done - self._start_count) / elapsed

    def line(self) -> str:
        """The current progress line."""
        rate = self._rate()
        rate_s = f"{human_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:,.0f} {self.unit}/s"
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = human_seconds(eta) if eta != float("inf") else "?"
            first = human_bytes(self.done) if self.unit == "bytes" else f"{self.done:,}"
            done = f"{first} / {self._fmt(self.total)} ({pct:.1f}%)"
            return f"{self.label}: {done} {rate_s} ETA {eta_s}"
        return f"{self.label}: {self._fmt(self.done)} {rate_s}"

    def update(self, n: int = 1) -> None:
        """Add `n` units of work; log if `interval` seconds passed since the last line."""
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.logger.info(self.line())

    def close(self) -> float:
        """Log the final line with the elapsed time; return the elapsed seconds."""
        elapsed = time.monotonic() - self._t0
        self.logger.info("%s in %s", self.line().split(" ETA ")[0], human_seconds(elapsed))
        return elapsed
