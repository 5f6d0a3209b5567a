# ruff: noqa: E501  (verbatim log lines are longer than the line limit)
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from operators.rank_logs import CHATTER_PATTERNS, RankLogRelay, log_rank_summary, tail

# Verbatim lines from the ranks' logs of a 2-rank CPU run of scripts/demo.sh (MindSpore 2.10).
STARTUP_CHATTER = [
    "[WARNING] DISTRIBUTED(2837,7fe123283e40,python):2026-12-01-12:49:12.030.165 [mindspore/ccsrc/cluster/rpc/tcp/tcp_comm.cc:485] Connect] Connection 11 source: 127.0.0.1:50798, destination: 127.0.0.1:8129",
    "[WARNING] DISTRIBUTED(2837,7fe123283e40,python):2026-12-01-12:49:12.040.387 [mindspore/ccsrc/cluster/topology/compute_graph_node.cc:193] Register] Failed to connect to the meta server node url: 127.0.0.1:8129",
    "[WARNING] DISTRIBUTED(2837,7fe123283e40,python):2026-12-01-12:49:12.040.408 [mindspore/ccsrc/cluster/topology/compute_graph_node.cc:392] ReconnectWithTimeoutWindow] Failed to register and try to reconnect to the meta server.",
    "[WARNING] DISTRIBUTED(2837,7fe123283e40,python):2026-12-01-12:49:14.324.925 [mindspore/ccsrc/cluster/topology/cluster_context.cc:316] BuildCluster] Topology build timed out., retry(1/14400).",
    "[WARNING] DISTRIBUTED(2837,7fe123283e40,python):2026-12-01-12:49:14.825.334 [mindspore/ccsrc/cluster/topology/cluster_context.cc:319] BuildCluster] Cluster is successfully initialized.",
    "[WARNING] DISTRIBUTED(2837,7fe123283e40,python):2026-12-01-12:49:14.825.404 [mindspore/ccsrc/cluster/topology/cluster_context.cc:428] PostProcess] This node 1 rank id: 1",
    "[WARNING] DEVICE(2837,7fe123283e40,python):2026-12-01-12:49:14.825.615 [mindspore/ccsrc/plugin/cpu/res_manager/collective/allreduce_impl.cc:54] Initialize] The worker node start sync start!",
    "[WARNING] DEVICE(2837,7fe123283e40,python):2026-12-01-12:49:17.827.617 [mindspore/ccsrc/plugin/cpu/res_manager/collective/ms_collective_comm_lib.cc:58] Initialize] Mindspore collective communication lib for group mccl_world_group has already been initialized.",
    "[WARNING] ME(2837,7fe123283e40,python):2026-12-01-12:49:17.827.706 [mindspore/ccsrc/runtime/hardware_abstract/collective/collective_manager.cc:368] CreateCommunicationGroup] Create collective communication group: mccl_world_group [const vector]{0, 1}, async: 0",
    "[WARNING] DEVICE(2837,7fe123283e40,python):2026-12-01-12:49:17.827.725 [mindspore/ccsrc/plugin/cpu/res_manager/collective/ms_collective_comm_lib.cc:152] CreateCommunicationGroup] The group mccl_world_group has already existed.",
    "[WARNING] DISTRIBUTED(2837,7fe0f4d9b6c0,python):2026-12-01-12:49:20.151.725 [mindspore/ccsrc/include/cluster/rpc/libevent_tcp_server.h:51] TcpConnection] TcpConnection is constructed! fd is 23",
    "[INFO] DISTRIBUTED(2837,7fe0dffff6c0,python):2026-12-01-12:49:22.388.065 [mindspore/ccsrc/cluster/rpc/core/communicator/tcp_client.cc:367] Start] Event base dispatch success!",
]
MS_DEPRECATION = "[WARNING] ME(2837:140604934209088,MainProcess):2026-12-01-12:49:12.900.0 [mindspore/context.py:1343] For 'context.set_context', the parameter 'device_target' will be deprecated and removed in a future version. Please use the api mindspore.set_device() instead."
TRAIN_STEP = "INFO llama_core.train: epoch=1/1 step=10/60 loss=6.117550 lr=4.962019e-03 step_time=0.033s tokens_per_s_device=9809.5 grad_norm=0.409383 eta=2s"
# From a 2-rank msrun job where rank 1 raised and rank 0 was left waiting on it.
PEER_GONE = "[WARNING] DISTRIBUTED(6193,7ff61ffff6c0,python):2026-12-01-12:50:48.430.810 [mindspore/ccsrc/cluster/rpc/core/communicator/tcp_client.cc:346] EventCallbackInner] Client connected end of file! Peer Worker ip: 127.0.0.1, port: 8374"
NODE_TIMED_OUT = "[ERROR] DISTRIBUTED(6192,7f6a2159e6c0,python):2026-12-01-12:51:14.231.370 [mindspore/ccsrc/cluster/topology/meta_server_node.cc:548] UpdateTopoState] The node: 1 is timed out. It may exit with exception, please check this node's log."
CHAINED_TRACEBACK = """\
Traceback (most recent call last):
  File "/tmp/rl_fail/job.py", line 20, in <module>
    load()
  File "/tmp/rl_fail/job.py", line 18, in load
    raise KeyError("missing")
KeyError: 'missing'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/tmp/rl_fail/job.py", line 22, in <module>
    raise ValueError("boom") from e
ValueError: boom""".splitlines()
# A MindSpore exception: its message goes on over several lines, C++ call stack included.
MS_RUNTIME_ERROR = """\
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/mindspore/communication/management.py", line 210, in init
    init_cluster()
RuntimeError: The total number of timed out node is 1. Timed out node list is: [const vector]{1}, worker 1 is the first one timed out, please check its log.

----------------------------------------------------
- C++ Call Stack: (For framework developers)
----------------------------------------------------
mindspore/ccsrc/cluster/topology/meta_server_node.cc:554 UpdateTopoState""".splitlines()


def relayed(
    caplog: pytest.LogCaptureFixture, lines: list[tuple[int, str]], relay: RankLogRelay | None = None
):
    """(logger name, level, message) of each record the relay logs for `lines`, at every level."""
    relay = relay or RankLogRelay()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        for rank, line in lines:
            relay(rank, line + "\n")
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records]


def levels(
    caplog: pytest.LogCaptureFixture, lines: list[str], relay: RankLogRelay | None = None
) -> list[int]:
    return [level for _, level, _ in relayed(caplog, [(0, line) for line in lines], relay)]


def test_each_line_under_its_rank_logger_with_a_rank_prefix(caplog: pytest.LogCaptureFixture) -> None:
    assert relayed(caplog, [(0, TRAIN_STEP), (1, "plain print from rank 1")]) == [
        ("msrun.rank_0", logging.INFO, f"[rank 0] {TRAIN_STEP}"),
        ("msrun.rank_1", logging.INFO, "[rank 1] plain print from rank 1"),
    ]


@pytest.mark.parametrize(
    ("line", "level"),
    [
        (MS_DEPRECATION, logging.WARNING),
        (PEER_GONE, logging.WARNING),
        (NODE_TIMED_OUT, logging.ERROR),
        (
            "[CRITICAL] ME(6193,7ff662c09e40,python):2026-12-01-12:50:45.1 [x.cc:1] F] out of memory",
            logging.CRITICAL,
        ),
        ("[INFO] ME(6193,7ff662c09e40,python):2026-12-01-12:50:45.1 [x.cc:1] F] compile graph", logging.INFO),
        ("[DEBUG] GE(6193,7ff662c09e40,python):2026-12-01-12:50:45.1 [x.cc:1] F] node added", logging.DEBUG),
        (TRAIN_STEP, logging.INFO),
        ("WARNING llama_core.data: only 3 samples", logging.WARNING),
        ("ERROR llama_core.checkpoint.convert: missing tensor model.norm.weight", logging.ERROR),
        ("CRITICAL llama_core.run: giving up", logging.CRITICAL),
        ("DEBUG llama_core.train: batch shapes (4, 160)", logging.DEBUG),
        ("plain print from rank 0", logging.INFO),
        ("", logging.INFO),
        # level names that are not a line's own prefix leave it at INFO
        ("loss went UP: ERROR budget exceeded", logging.INFO),
        ("Warning: something printed by a library", logging.INFO),
    ],
)
def test_a_line_keeps_its_level(caplog: pytest.LogCaptureFixture, line: str, level: int) -> None:
    assert levels(caplog, [line]) == [level]


def test_a_chained_traceback_is_error_throughout_until_a_line_with_its_own_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    after = [STARTUP_CHATTER[-1], "plain print after the event loop stopped", TRAIN_STEP, "plain again"]
    got = levels(caplog, [TRAIN_STEP, *CHAINED_TRACEBACK, *after])
    assert got == [
        logging.INFO,
        *[logging.ERROR] * len(CHAINED_TRACEBACK),
        logging.DEBUG,  # MindSpore's own tag ends the block (this one is chatter)
        logging.INFO,
        logging.INFO,
        logging.INFO,
    ]


def test_during_handling_chain_and_mindspore_multiline_exception_stay_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    during = [
        "Traceback (most recent call last):",
        '  File "a.py", line 1, in <module>',
        "KeyError: 'x'",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        *MS_RUNTIME_ERROR,
    ]
    assert levels(caplog, [*during, "WARNING llama_core.train: next"]) == [logging.ERROR] * len(during) + [
        logging.WARNING
    ]


def test_traceback_state_is_per_rank(caplog: pytest.LogCaptureFixture) -> None:
    got = relayed(
        caplog, [(1, CHAINED_TRACEBACK[0]), (0, "plain print from rank 0"), (1, CHAINED_TRACEBACK[1])]
    )
    assert [(name, level) for name, level, _ in got] == [
        ("msrun.rank_1", logging.ERROR),
        ("msrun.rank_0", logging.INFO),
        ("msrun.rank_1", logging.ERROR),
    ]


def test_every_chatter_pattern_matches_a_real_line_and_no_useful_one() -> None:
    for pattern in CHATTER_PATTERNS:
        assert any(pattern.search(line) for line in STARTUP_CHATTER), pattern.pattern
    for line in (MS_DEPRECATION, PEER_GONE, NODE_TIMED_OUT, TRAIN_STEP):
        assert not any(p.search(line) for p in CHATTER_PATTERNS), line


def test_startup_chatter_is_demoted_to_debug_and_hidden_at_info(caplog: pytest.LogCaptureFixture) -> None:
    assert levels(caplog, STARTUP_CHATTER) == [logging.DEBUG] * len(STARTUP_CHATTER)

    caplog.clear()
    relay = RankLogRelay()
    with caplog.at_level(logging.INFO):  # Airflow's default task log level
        for line in [*STARTUP_CHATTER, MS_DEPRECATION, TRAIN_STEP]:
            relay(0, line)
    assert [r.getMessage() for r in caplog.records] == [
        f"[rank 0] {MS_DEPRECATION}",
        f"[rank 0] {TRAIN_STEP}",
    ]


def test_chatter_level_is_configurable(caplog: pytest.LogCaptureFixture) -> None:
    got = levels(caplog, STARTUP_CHATTER, RankLogRelay(chatter_level=logging.INFO))
    assert got == [logging.INFO] * len(STARTUP_CHATTER)


def test_chatter_text_at_error_level_and_lookalike_failures_are_not_demoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = STARTUP_CHATTER[1].replace("[WARNING]", "[ERROR]", 1)
    # the scheduler is gone mid-run: not the start-up "node url" retry
    exited = (
        "[WARNING] DISTRIBUTED(2837,7fe123283e40,python):2026-12-01-12:49:12.040.387 [mindspore/ccsrc/"
        "cluster/topology/compute_graph_node.cc:200] Heartbeat] Failed to connect to the meta server. "
        "Maybe it has exited. Please check scheduler's log."
    )
    # chatter text in a Python logging line or a plain line is not MindSpore's chatter
    python = "WARNING llama_core.launch: Topology build timed out., retry(3/3)"
    assert levels(caplog, [error, exited, python]) == [logging.ERROR, logging.WARNING, logging.WARNING]


@dataclass
class Outcome:
    rank: int
    log_path: Path
    exit_code: int | None = None
    killed_by_launcher: bool = False


def _outcomes(tmp_path: Path) -> tuple[list[Outcome], dict[int, Path]]:
    logs = {}
    for rank in range(4):
        logs[rank] = tmp_path / f"worker_{rank}.log"
        logs[rank].write_text("".join(f"rank {rank} line {i}\n" for i in range(100)))
    return [
        Outcome(0, logs[0], exit_code=0),
        Outcome(1, logs[1], exit_code=-9, killed_by_launcher=True),
        Outcome(2, logs[2], exit_code=1),
        Outcome(3, logs[3], exit_code=None),
    ], logs


def test_summary_groups_under_each_rank_logger_failed_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ranks, logs = _outcomes(tmp_path)
    with caplog.at_level(logging.INFO):
        states = log_rank_summary(ranks)
    # the same as data, by rank (the finetune task's `ranks` XCom): a failed rank's last 20 lines
    assert [(s["rank"], s["state"], s["exit_code"]) for s in states] == [
        (0, "ok", 0), (1, "stopped", -9), (2, "failed", 1), (3, "failed", None)
    ]  # fmt: skip
    assert states[2]["last_lines"] == [f"rank 2 line {i}" for i in range(80, 100)]
    assert states[0]["last_lines"] == states[1]["last_lines"] == [] and states[2]["log_path"] == str(logs[2])
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    headers = [record for record in records if "::group::" in record[2]]
    assert headers == [
        ("msrun.rank_2", logging.ERROR, f"::group::rank 2: FAILED (exit 1) - {logs[2]}"),
        (
            "msrun.rank_3",
            logging.ERROR,
            f"::group::rank 3: FAILED (vanished without an exit status: killed from outside?) - {logs[3]}",
        ),
        (
            "msrun.rank_1",
            logging.WARNING,
            f"::group::rank 1: stopped by the launcher: another rank failed - {logs[1]}",
        ),
        ("msrun.rank_0", logging.INFO, f"::group::rank 0: ok - {logs[0]}"),
    ]
    # each group: header, its last 60 lines at INFO with the rank prefix, an end at the header's level
    start = records.index(headers[0])
    assert records[start + 1 : start + 61] == [
        ("msrun.rank_2", logging.INFO, f"[rank 2] rank 2 line {i}") for i in range(40, 100)
    ]
    assert records[start + 61] == ("msrun.rank_2", logging.ERROR, "::endgroup::")
    assert records[start + 62] == headers[1]
    assert [(name, level) for name, level, message in records if message == "::endgroup::"] == [
        (name, level) for name, level, _ in headers
    ]
    assert len(records) == 4 * 62


def test_summary_names_the_stop_cause(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ranks, logs = _outcomes(tmp_path)
    with caplog.at_level(logging.INFO):
        log_rank_summary([ranks[1]], stop_cause="the task was stopped")
    assert caplog.records[0].getMessage() == (
        f"::group::rank 1: stopped by the launcher: the task was stopped - {logs[1]}"
    )


def test_summary_of_a_rank_without_log_file_is_an_empty_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        log_rank_summary([Outcome(5, tmp_path / "worker_5.log", exit_code=0)])
    assert [r.getMessage() for r in caplog.records] == [
        f"::group::rank 5: ok - {tmp_path / 'worker_5.log'}",
        "::endgroup::",
    ]


def test_tail_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail(tmp_path / "nope.log") == []
