"""The retraining schedule runs on cron ticks from now on: a missed tick is never run late."""

from __future__ import annotations

import datetime

import pendulum
import pytest
from airflow.timetables.base import DataInterval, TimeRestriction
from airflow.timetables.trigger import CronTriggerTimetable

from operators.schedule import FutureTicksTimetable

HOURLY = "0 * * * *"
NO_CATCHUP = TimeRestriction(earliest=None, latest=None, catchup=False)


def _next(timetable: CronTriggerTimetable, last: pendulum.DateTime | None) -> pendulum.DateTime:
    interval = None if last is None else DataInterval(last, last)
    info = timetable.next_dagrun_info(last_automated_data_interval=interval, restriction=NO_CATCHUP)
    assert info is not None
    return info.run_after


@pytest.fixture()
def ticks() -> tuple[pendulum.DateTime, pendulum.DateTime]:
    """The hourly tick just past and the next one (skips the test's last second of an hour)."""
    now = pendulum.now("UTC")
    if now.minute == 59 and now.second >= 58:
        pytest.skip("too close to the next tick to tell past from future")
    past = now.start_of("hour")
    return past, past + datetime.timedelta(hours=1)


def test_a_missed_tick_waits_for_the_next_where_airflows_own_would_run_it_at_once(ticks) -> None:
    past, future = ticks
    backfilled = pendulum.datetime(2026, 1, 19, tz="UTC")  # a backfill's newest run, or a long pause
    assert _next(CronTriggerTimetable(HOURLY, timezone="UTC"), backfilled) == past  # Airflow: at once
    assert _next(FutureTicksTimetable(HOURLY, timezone="UTC"), backfilled) == future


def test_the_first_run_is_the_next_tick(ticks) -> None:
    _past, future = ticks
    assert _next(FutureTicksTimetable(HOURLY, timezone="UTC"), None) == future


def test_a_tick_due_a_moment_ago_still_runs() -> None:
    now = pendulum.now("UTC")
    tick = now.start_of("minute")  # at most a minute ago: the scheduler is only a moment late
    every_minute = FutureTicksTimetable("* * * * *", timezone="UTC")
    assert _next(every_minute, tick - datetime.timedelta(minutes=1)) == tick


def test_the_tick_after_the_last_run_is_skipped_when_long_past(ticks) -> None:
    """A backfill's newest date is the last automated run: the tick after it is days old, and not run."""
    past, future = ticks
    timetable = FutureTicksTimetable(HOURLY, timezone="UTC")
    assert _next(timetable, past - datetime.timedelta(hours=2)) == future
    assert _next(timetable, past) == future


def test_it_is_registered_with_airflow_and_survives_serialization() -> None:
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable

    timetable = decode_timetable(encode_timetable(FutureTicksTimetable("0 3 * * 1", timezone="UTC")))
    assert isinstance(timetable, FutureTicksTimetable)
    assert timetable.serialize()["expression"] == "0 3 * * 1"
