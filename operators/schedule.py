"""Scheduled retraining that runs on cron ticks from now on, never on a tick already past.

Airflow's `CronTriggerTimetable` with `catchup=False` runs the latest past tick at once whenever a
tick was missed: after unpausing a DAG that was paused over a tick, and after a backfill (Airflow
counts backfill runs as the newest automated run). A fine-tune holds a node's NPUs for hours, so an
operator who unpauses or backfills must not get a run they did not ask for: this timetable moves a
missed tick to the next future one. A tick that is due now (the scheduler is only a moment late, up
to `LATE_TOLERANCE`) still runs; one further past was missed, even when it follows the last run (a
backfill's newest date is then days old). It is registered with Airflow by the plugin in
operators/plugin.py, so the dag-processor and the scheduler of any deployment that installs this
project know it.
"""

from __future__ import annotations

import pendulum
from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction
from airflow.timetables.trigger import CronTriggerTimetable

# How late the scheduler may take up a tick and still run it: its loop runs every few seconds.
LATE_TOLERANCE = pendulum.duration(minutes=5)


class FutureTicksTimetable(CronTriggerTimetable):
    """`CronTriggerTimetable` whose missed ticks are skipped, not run (with `catchup=False`)."""

    def next_dagrun_info(
        self, *, last_automated_data_interval: DataInterval | None, restriction: TimeRestriction
    ) -> DagRunInfo | None:
        info = super().next_dagrun_info(
            last_automated_data_interval=last_automated_data_interval, restriction=restriction
        )
        if info is None or restriction.catchup:
            return info
        now = pendulum.now("UTC")
        if info.run_after >= now - LATE_TOLERANCE:  # ahead, or due a moment ago
            return info
        future = self._align_to_next(now)  # a missed tick (or a first run on a past one): the next one
        return DagRunInfo.interval(future - self._interval, future)
