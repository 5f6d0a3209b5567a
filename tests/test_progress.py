import logging

import pytest

from llama_core.progress import Progress, human_bytes, human_seconds


def test_human_units() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(13 * 1024**3) == "13.0 GiB"
    assert human_seconds(5) == "5s"
    assert human_seconds(65) == "1m05s"
    assert human_seconds(3725) == "1h02m05s"


def test_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.progress")
    progress = Progress("tok", total=1000, interval=3600, logger=log)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for _ in range(1000):
            progress.update()
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1  # the final line only: the interval never elapsed
    assert lines[0].startswith("tok: 1,000 / 1,000 records (100.0%)")


def test_line_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.progress2")
    progress = Progress("dl", total=10, unit="bytes", interval=0, logger=log)
    with caplog.at_level(logging.INFO, logger="test.progress2"):
        progress.update(5)
    assert "5 B / 10 B (50.0%)" in caplog.records[0].getMessage()
    assert "ETA" in caplog.records[0].getMessage()
