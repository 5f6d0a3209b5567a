import logging
from pathlib import Path

import pytest

from operators.rank_logs import RankLogRelay, summary_lines, tail


def test_relay_logs_each_rank_under_its_own_logger(caplog: pytest.LogCaptureFixture) -> None:
    relay = RankLogRelay()
    with caplog.at_level(logging.INFO):
        relay(0, "step 1 loss 2.0\n")
        relay(1, "Traceback (most recent call last):\n")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("msrun.rank_0", "step 1 loss 2.0"),
        ("msrun.rank_1", "Traceback (most recent call last):"),
    ]


def test_summary_puts_failed_ranks_first_with_their_tail(tmp_path: Path) -> None:
    from llama_core.launch import RankResult

    logs = {}
    for rank in range(4):
        logs[rank] = tmp_path / f"worker_{rank}.log"
        logs[rank].write_text("".join(f"rank {rank} line {i}\n" for i in range(100)))
    ranks = [
        RankResult(0, logs[0], exit_code=0),
        RankResult(1, logs[1], exit_code=-9, killed_by_launcher=True),
        RankResult(2, logs[2], exit_code=1),
        RankResult(3, logs[3], exit_code=None),
    ]
    lines = list(summary_lines(ranks))
    headers = [line for line in lines if line.startswith("::group::")]
    assert headers == [
        f"::group::rank 2: FAILED (exit 1) - {logs[2]}",
        f"::group::rank 3: FAILED (vanished without an exit status: killed from outside?) - {logs[3]}",
        f"::group::rank 1: stopped after another rank failed - {logs[1]}",
        f"::group::rank 0: ok - {logs[0]}",
    ]
    assert lines.count("::endgroup::") == 4
    rank2 = lines[lines.index(headers[0]) + 1 : lines.index(headers[1]) - 1]
    assert rank2 == [f"rank 2 line {i}" for i in range(40, 100)]


def test_tail_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail(tmp_path / "nope.log") == []
