"""`python -m deploy.stack burst`: many demo runs triggered at once through a running stack's REST API.

The question a platform team asks before opening the UI to a team: when twenty people press "Trigger"
in the same minute, does every run finish, do fine-tunes still take the NPU nodes one at a time, and
does the UI stay usable? This triggers `runs` demo runs concurrently with the pool of the Ascend
nodes cut to one slot, probes the API every `probe_interval` seconds while they run, and reports:
each run's final state, the fine-tunes' intervals (their task instances' start and end, as Airflow
records them) and any overlap, and the API's answer times (p50, p95, max).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import requests

from deploy.demo import rest_session
from deploy.stack import DEMO_DAG, POOL, Stack

TERMINAL = ("success", "failed")


@dataclass
class BurstResult:
    states: dict[str, str]  # run id -> final state
    wall_s: float  # from the first trigger to the last run's end
    finetunes: list[tuple[str, datetime, datetime]]  # (run id, start, end), by start
    answer_s: list[float] = field(default_factory=list)  # each probe's answer time
    probe_errors: list[str] = field(default_factory=list)  # probes that got no 200

    @property
    def overlaps(self) -> list[tuple[str, str]]:
        """Pairs of runs whose fine-tunes ran at the same time."""
        return [
            (a[0], b[0]) for i, a in enumerate(self.finetunes) for b in self.finetunes[i + 1 :] if b[1] < a[2]
        ]

    def percentile(self, q: float) -> float:
        ordered = sorted(self.answer_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def describe(self) -> str:
        ok = sum(state == "success" for state in self.states.values())
        busy = sum((end - start).total_seconds() for _, start, end in self.finetunes)
        median = statistics.median(self.answer_s) if self.answer_s else float("nan")
        return (
            f"{len(self.states)} runs: {ok} succeeded in {self.wall_s:.0f} s (fine-tunes {busy:.0f} s "
            f"of it), {len(self.overlaps)} overlapping fine-tunes; API: {len(self.answer_s)} answers, "
            f"p50 {median:.3f} s, p95 {self.percentile(0.95):.3f} s, "
            f"max {max(self.answer_s, default=float('nan')):.3f} s, {len(self.probe_errors)} errors"
        )


class Prober(threading.Thread):
    """GETs what the UI's grid view asks for (the DAG, its runs, a run's task instances) until stopped,
    recording each answer's time."""

    def __init__(self, http: requests.Session, dag: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.http, self.dag, self.interval = http, dag, interval
        self.answer_s: list[float] = []
        self.errors: list[str] = []
        self.run_id = ""
        self.done = threading.Event()

    def run(self) -> None:
        urls = [self.dag, f"{self.dag}/dagRuns?limit=25&order_by=-run_after"]
        while not self.done.wait(self.interval):
            run_urls = (
                [f"{self.dag}/dagRuns/{quote(self.run_id, safe='')}/taskInstances"] if self.run_id else []
            )
            for url in urls + run_urls:
                t0 = time.monotonic()
                try:
                    status = self.http.get(url, timeout=30).status_code
                except requests.RequestException as exc:
                    status, reason = 0, type(exc).__name__
                else:
                    reason = str(status)
                self.answer_s.append(time.monotonic() - t0)
                if status != 200:
                    self.errors.append(f"{url}: {reason}")

    def stop(self) -> None:
        self.done.set()
        self.join()


def burst(
    stack: Stack,
    conf: Mapping[str, Any],
    runs: int = 20,
    timeout: float = 3600,
    probe_interval: float = 0.5,
    log: Callable[[str], None] = print,
) -> BurstResult:
    """`runs` runs of the demo DAG with `conf`, triggered at once with pool `ascend_nodes` at one slot
    (restored after); waits for all of them and returns what was measured."""
    http, api = rest_session(stack)
    dag = f"{api}/api/v2/dags/{DEMO_DAG}"
    pool_url = f"{api}/api/v2/pools/{POOL}"
    pool = http.get(pool_url, timeout=30).json()

    def set_slots(slots: int) -> None:
        # 3.3's PATCH validates the whole body, include_deferred too, whatever the update mask says
        body = {"name": POOL, "slots": slots, "include_deferred": pool["include_deferred"]}
        http.patch(pool_url, json=body, params={"update_mask": "slots"}, timeout=30).raise_for_status()

    set_slots(1)
    http.patch(dag, json={"is_paused": False}, timeout=30).raise_for_status()
    prober = Prober(http, dag, probe_interval)
    prober.start()
    try:
        t0 = time.monotonic()

        def trigger(_: int) -> str:
            created = http.post(f"{dag}/dagRuns", json={"logical_date": None, "conf": dict(conf)}, timeout=60)
            created.raise_for_status()
            return created.json()["dag_run_id"]

        with ThreadPoolExecutor(max_workers=runs) as triggers:
            run_ids = list(triggers.map(trigger, range(runs)))
        log(f"triggered {runs} runs in {time.monotonic() - t0:.1f} s")
        states: dict[str, str] = {}
        deadline = t0 + timeout
        while len(states) < runs:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{runs - len(states)} of {runs} runs still not ended after {timeout:.0f} s"
                )
            for run_id in run_ids:
                if run_id not in states:
                    state = http.get(f"{dag}/dagRuns/{quote(run_id, safe='')}", timeout=30).json()["state"]
                    if state in TERMINAL:
                        states[run_id] = state
                        log(f"{run_id}: {state} ({len(states)}/{runs}, {time.monotonic() - t0:.0f} s)")
                    elif state == "running":
                        prober.run_id = run_id
            time.sleep(2)
        wall = time.monotonic() - t0
    finally:
        prober.stop()
        set_slots(pool["slots"])
    return BurstResult(states, wall, finetune_intervals(http, dag, run_ids), prober.answer_s, prober.errors)


def finetune_intervals(
    http: requests.Session, dag: str, run_ids: list[str]
) -> list[tuple[str, datetime, datetime]]:
    """Each run's fine-tune task instances as (run id, start, end), by start."""
    out = []
    for run_id in run_ids:
        tis = http.get(
            f"{dag}/dagRuns/{quote(run_id, safe='')}/taskInstances/finetune/listMapped", timeout=30
        )
        tis.raise_for_status()
        for ti in tis.json()["task_instances"]:
            if ti["start_date"] and ti["end_date"]:
                out.append(
                    (run_id, datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]))
                )
    return sorted(out, key=lambda x: x[1])
