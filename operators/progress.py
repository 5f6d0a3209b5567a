"""A running fine-tune's progress, from rank 0's `progress.json` (llama_core.train.live) to where users
look: a `progress:` line in the task log every `interval_s` seconds, and the XCom `progress` of the
finetune task (node 0's), updated while it runs, which the "Fine-tune" view of the Airflow UI reads
through the REST API (so it works where the api-server cannot see the workers' disks); at the end
each node task's XCom `ranks` says how its ranks ended.

All of it is for watching: none of it may slow or fail the fine-tune. XComs are pushed from a thread
of their own, because a push waits for the api-server (restarting, or its database down) and the
job's watch loop must not; a push that fails warns once and the next one tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PUBLISH_EVERY_S = 5.0  # the view refreshes every few seconds; a push is one api-server call


class XComPublisher(threading.Thread):
    """Pushes the newest value `offer`ed under each key, one push at a time: values offered for a key
    meanwhile replace each other (only the newest matters). `push(key, value)` is the task
    instance's `xcom_push`."""

    def __init__(
        self, push: Callable[[str, Any], None], log: logging.Logger | Any, name: str = "xcom-publisher"
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.push, self.log = push, log
        self.cond = threading.Condition()
        self.pending: dict[str, Any] = {}
        self.closed = self.warned = False

    def offer(self, key: str, value: Any) -> None:
        with self.cond:
            self.pending[key] = value
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: bool(self.pending) or self.closed)
                if not self.pending:
                    return
                key = next(iter(self.pending))
                value = self.pending.pop(key)
            try:
                self.push(key, value)
            except Exception as exc:  # an api-server outage: the fine-tune goes on, so does this
                if not self.warned:
                    self.log.warning(
                        "XCom %s not pushed (%s: %s); will try again", key, type(exc).__name__, exc
                    )
                self.warned = True

    def close(self, timeout: float = 10.0) -> None:
        """Push what is pending, then stop; waits at most `timeout` s (a push may hang on an outage)."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.join(timeout)


class Fanout:
    """Offers each value to every publisher given (the XComs, MLflow); None ones are left out."""

    def __init__(self, *publishers: XComPublisher | None) -> None:
        self.publishers = [p for p in publishers if p is not None]

    def offer(self, key: str, value: Any) -> None:
        for publisher in self.publishers:
            publisher.offer(key, value)


class ProgressWatch:
    """`on_tick` of the fine-tune's job: reads the progress rank 0 last wrote in `run_dir` (shared
    storage: every node's task sees it) and, when it is new, logs it every `interval_s` seconds and
    offers it to `publisher` every PUBLISH_EVERY_S. An earlier try's file is ignored; a file that
    cannot be read (not written yet, a storage hiccup) is skipped."""

    def __init__(
        self,
        run_dir: Path,
        interval_s: float,
        log: logging.Logger | Any,
        publisher: XComPublisher | Fanout | None = None,
    ) -> None:
        from llama_core.train.live import read_progress

        self.read, self.run_dir, self.log, self.publisher = read_progress, run_dir, log, publisher
        self.interval_s = float(interval_s)
        self.since = time.time()  # progress written before this job started is not its own
        now = time.monotonic()
        self.log_due, self.publish_due = now + self.interval_s, now
        self.logged_at = self.offered_at = 0.0  # the `updated_at` of the last progress logged / offered

    def __call__(self) -> None:
        now = time.monotonic()
        log_now = now >= self.log_due
        publish_now = self.publisher is not None and now >= self.publish_due
        if not (log_now or publish_now):
            return
        progress = self.read(self.run_dir)
        if progress is None or progress.updated_at < self.since:
            return
        if log_now:
            self.log_due = now + self.interval_s
            if progress.updated_at != self.logged_at:
                self.logged_at = progress.updated_at
                self.log.info("progress: %s", progress.line())
        if publish_now and self.publisher is not None:
            self.publish_due = now + PUBLISH_EVERY_S
            if progress.updated_at != self.offered_at:
                self.offered_at = progress.updated_at
                self.publisher.offer("progress", progress.to_json())

    def final(self) -> dict[str, Any] | None:
        """The progress as the job left it (None: rank 0 wrote none in this job)."""
        progress = self.read(self.run_dir)
        return progress.to_json() if progress is not None and progress.updated_at >= self.since else None
