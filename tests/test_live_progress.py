"""A running fine-tune's progress: rank 0's progress.json (llama_core.train.live), the finetune task's
`progress:` log lines and its `progress` XCom pushed from a thread of its own (operators.progress)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

import operators.progress
from llama_core.train.live import CURVE_POINTS, PROGRESS_NAME, ProgressWriter, downsample, read_progress
from operators.progress import ProgressWatch, XComPublisher


def test_downsample_keeps_the_ends_and_at_most_the_limit() -> None:
    points = [[i, float(i)] for i in range(1000)]
    kept = downsample(points, 50)
    assert len(kept) == 50 and kept[0] == [0, 0.0] and kept[-1] == [999, 999.0]
    assert [p[0] for p in kept] == sorted({p[0] for p in kept})  # in order, no repeats
    assert downsample(points[:7], 50) == points[:7]


def test_a_long_run_writes_a_small_file_with_its_last_state(tmp_path: Path) -> None:
    writer = ProgressWriter(tmp_path, total_steps=20000, epochs=2, every_s=3600)  # writes: the evals
    for step in range(1, 20001):
        writer.step(step, 1 + step // 10000, 2.0 + 1 / step, 1e-4, 4321.0, 20000.0 - step)
        if step % 500 == 0:
            writer.eval(step, 1.5 + 1 / step)
    size = (tmp_path / PROGRESS_NAME).stat().st_size
    assert size < 64 * 1024, size
    progress = read_progress(tmp_path)
    assert progress is not None and progress.step == 20000 and progress.epoch == 3
    assert len(progress.curve) == CURVE_POINTS and progress.curve[-1][0] == 20000
    assert len(progress.eval_curve) == 40 and progress.eval_loss == pytest.approx(1.5 + 1 / 20000)
    # the smoothed loss trails the raw one (an exponential moving average of a falling curve)
    assert progress.loss < progress.loss_smoothed < progress.curve[0][1]
    line = progress.line()
    assert line.startswith("step 20000/20000 (100.0 %) epoch 3/2 loss 2.0000") and "tokens/s 4,321" in line


def test_writes_are_throttled_but_evals_and_the_end_are_not(tmp_path: Path) -> None:
    writer = ProgressWriter(tmp_path, total_steps=10, epochs=1, every_s=3600)
    writer.step(1, 1, 3.0, 1e-3, 100.0, 9.0)  # the first write is due at once
    writer.step(2, 1, 2.5, 1e-3, 100.0, 8.0)
    progress = read_progress(tmp_path)
    assert progress is not None and progress.step == 1 and progress.state == "training"
    writer.eval(2, 2.2)
    assert read_progress(tmp_path).step == 2  # type: ignore[union-attr]
    writer.set_state("done")
    done = read_progress(tmp_path)
    assert done is not None and done.state == "done" and "ETA" not in done.line()
    assert done.line().endswith("[done]") and "eval loss 2.2000" in done.line()


def test_a_write_that_fails_warns_once_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder should be")
    writer = ProgressWriter(blocker, total_steps=3, epochs=1, every_s=0)
    with caplog.at_level(logging.WARNING, logger="llama_core.train"):
        for step in (1, 2, 3):
            writer.step(step, 1, 1.0, 1e-3, 1.0, 0.0)
    assert [r.message for r in caplog.records if "progress not written" in r.message] == [
        caplog.records[0].message
    ]
    assert read_progress(blocker) is None


def test_unreadable_progress_is_none(tmp_path: Path) -> None:
    assert read_progress(tmp_path) is None
    (tmp_path / PROGRESS_NAME).write_text("{half a file")
    assert read_progress(tmp_path) is None
    (tmp_path / PROGRESS_NAME).write_text(json.dumps({"step": 1, "no_such_field": 2}))
    assert read_progress(tmp_path) is None


def test_the_task_logs_each_new_write_once_and_not_an_earlier_tries_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = ProgressWriter(tmp_path, total_steps=100, epochs=1, every_s=0)
    writer.step(7, 1, 2.0, 1e-3, 50.0, 93.0)  # an earlier try's file
    path = tmp_path / PROGRESS_NAME
    os.utime(path)
    log = logging.getLogger("test.progress")
    reporter = ProgressWatch(tmp_path, interval_s=0, log=log)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        reporter()  # the old file: not this job's progress
        writer.step(8, 1, 1.9, 1e-3, 50.0, 92.0)
        reporter()
        reporter()  # nothing new
        writer.step(9, 1, 1.8, 1e-3, 50.0, 91.0)
        reporter()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[2] for line in lines] == ["8/100", "9/100"], lines
    assert all(line.startswith("progress: step ") and " ETA " in line for line in lines)


def test_the_task_logs_no_more_often_than_its_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = ProgressWriter(tmp_path, total_steps=100, epochs=1, every_s=0)
    reporter = ProgressWatch(tmp_path, interval_s=3600, log=logging.getLogger("test.progress"))
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for step in range(1, 50):
            writer.step(step, 1, 2.0, 1e-3, 50.0, 10.0)
            reporter()
    assert not caplog.records  # the first line is due an interval after the job started


class Pushes:
    """A push function that records (key, value), fails its first `fail` calls and can be held
    blocked."""

    def __init__(self, fail: int = 0) -> None:
        self.pushed: list[tuple[str, dict]] = []
        self.fail = fail
        self.open = threading.Event()
        self.open.set()

    def __call__(self, key: str, value: dict) -> None:
        self.open.wait(30)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("api-server unreachable")
        self.pushed.append((key, value))

    @property
    def values(self) -> list[dict]:
        return [value for _, value in self.pushed]


def test_a_blocked_push_never_blocks_the_watch_and_only_the_newest_value_waits() -> None:
    pushes = Pushes()
    pushes.open.clear()  # the api-server hangs
    publisher = XComPublisher(pushes, logging.getLogger("test.progress"))
    publisher.start()
    t0 = time.monotonic()
    for step in range(1, 101):
        publisher.offer("progress", {"step": step})
    publisher.offer("ranks", {"ranks": 2})
    publisher.offer("progress", {"step": 101, "state": "done"})
    assert time.monotonic() - t0 < 1.0
    pushes.open.set()
    publisher.close()
    assert not publisher.is_alive() and ("ranks", {"ranks": 2}) in pushes.pushed
    # at most the push under way when the api-server hung, then only the newest of each key
    progress = [value for key, value in pushes.pushed if key == "progress"]
    assert len(progress) <= 2 and progress[-1] == {"step": 101, "state": "done"}, pushes.pushed


def test_a_failing_push_warns_once_and_the_next_one_goes_through(caplog: pytest.LogCaptureFixture) -> None:
    pushes = Pushes(fail=3)
    publisher = XComPublisher(pushes, logging.getLogger("test.progress"))
    publisher.start()
    with caplog.at_level(logging.WARNING, logger="test.progress"):
        for step in range(1, 5):
            publisher.offer("progress", {"step": step})
            time.sleep(0.05)  # each offer its own push
        publisher.close()
    assert pushes.values == [{"step": 4}]
    warnings = [r.getMessage() for r in caplog.records]
    assert (
        len(warnings) == 1 and "progress not pushed (ConnectionError: api-server unreachable" in warnings[0]
    )


def test_the_watch_offers_each_new_write_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operators.progress, "PUBLISH_EVERY_S", 0.0)
    offered: list[dict] = []

    class Recorder:
        def offer(self, key: str, value: dict) -> None:
            assert key == "progress"
            offered.append(value)

    writer = ProgressWriter(tmp_path, total_steps=10, epochs=1, every_s=0)
    watch = ProgressWatch(
        tmp_path, interval_s=3600, log=logging.getLogger("test.progress"), publisher=Recorder()
    )  # type: ignore[arg-type]
    watch()  # nothing written yet
    writer.step(1, 1, 2.0, 1e-3, 10.0, 9.0)
    watch()
    watch()
    writer.step(2, 1, 1.9, 1e-3, 10.0, 8.0)
    watch()
    assert [v["step"] for v in offered] == [1, 2]
    assert len(json.dumps(offered[-1])) < 64 * 1024 and watch.final() == offered[-1]


def test_a_resumed_run_keeps_the_curve_up_to_its_checkpoint(tmp_path: Path) -> None:
    first = ProgressWriter(tmp_path, total_steps=30, epochs=1, every_s=0)
    for step in range(1, 16):
        first.step(step, 1, 3.0 - step / 10, 1e-3, 10.0, 1.0)
        if step % 5 == 0:
            first.eval(step, 2.5 - step / 10)
    second = ProgressWriter(tmp_path, total_steps=30, epochs=1, every_s=0)
    second.resume(10)  # the newest checkpoint was at step 10; steps 11-15 are trained again
    second.step(11, 1, 1.95, 1e-3, 10.0, 1.0)
    progress = read_progress(tmp_path)
    assert progress is not None and [p[0] for p in progress.curve] == list(range(1, 12))
    assert [e[0] for e in progress.eval_curve] == [5, 10]
    assert progress.loss_smoothed == pytest.approx(0.9 * first.points[9][2] + 0.1 * 1.95)
