"""Node rendezvous through the shared run folder (`llama_core.launch.cluster`): nodes join node 0's
live session, fail together, notice a dead node, and give up in bounded time when not all start."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from llama_core.launch.cluster import ClusterError, ClusterWatch, Member, node_address


class Clock:
    """A settable wall clock, so ages and deadlines are tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_nodes_join_node_0s_session_and_a_failure_reaches_every_node(tmp_path: Path) -> None:
    clock = Clock()
    nodes = [Member(tmp_path, 3, k, clock=clock) for k in range(3)]
    session = nodes[0].open("10.0.0.1", 8118)
    assert [n.join() for n in nodes[1:]] == [session, session]
    assert all(n.problem() is None for n in nodes)
    nodes[2].fail("rank 5 exited with code 1")
    assert nodes[0].problem() == nodes[1].problem() == "node 2 failed: rank 5 exited with code 1"
    assert nodes[2].problem() is None  # its own failure is not news to it
    nodes[1].fail("a later failure")  # the first one stays
    assert nodes[0].problem() == "node 2 failed: rank 5 exited with code 1"


def test_a_node_that_stops_beating_is_noticed_but_a_finished_one_is_not(tmp_path: Path) -> None:
    clock = Clock()
    a, b, c = (Member(tmp_path, 3, k, clock=clock, stale_after=20) for k in range(3))
    a.open("10.0.0.1", 8118)
    b.join()
    c.join()
    c.finish()
    clock.now += 15
    a.beat()
    assert b.problem() is None
    clock.now += 10  # b last beat 25 s ago, c is done
    assert a.problem() == "node 1 stopped beating 25 s ago (its task or host died)"


def test_missing_nodes_fail_the_ones_that_started_after_the_start_timeout(tmp_path: Path) -> None:
    clock = Clock()
    a = Member(tmp_path, 2, 0, clock=clock, start_timeout=60)
    a.open("10.0.0.1", 8118)
    clock.now += 59
    assert a.problem() is None
    clock.now += 2
    assert a.problem() == "nodes [1] of 2 did not join within 60 s (fewer free hosts than nodes?)"


def test_joining_waits_for_a_live_session_within_the_start_timeout(tmp_path: Path) -> None:
    late = Member(tmp_path, 2, 1, start_timeout=0.6)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="node 0 opened no live session within 1 s"):
        late.join(poll=0.05)
    assert time.monotonic() - t0 < 5


def test_an_earlier_tries_dead_session_is_waited_past_a_new_failure_is_not(tmp_path: Path) -> None:
    clock = Clock()
    old = Member(tmp_path, 2, 0, clock=clock, stale_after=20)
    old.open("10.0.0.1", 8118)
    old.fail("try 1 failed")
    clock.now += 600  # try 2 of node 1 starts long after
    node1 = Member(tmp_path, 2, 1, clock=clock, start_timeout=30, stale_after=20)
    joined: list[object] = []
    worker = threading.Thread(target=lambda: joined.append(_join(node1)))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()  # still waiting: that failure is from before it started
    new = Member(tmp_path, 2, 0, clock=clock)
    session = new.open("10.0.0.2", 9000)
    worker.join(5)
    assert joined == [session]
    # a failure of the session it waits for, after it started, fails it at once
    node1b = Member(tmp_path, 2, 1, clock=clock)
    new.fail("rank 0 exited with code 1")
    with pytest.raises(ClusterError, match="failed before node 1 joined: node 0 failed: rank 0 exited"):
        node1b.join()


def _join(member: Member) -> object:
    try:
        return member.join(poll=0.05)
    except ClusterError as exc:
        return exc


def test_a_new_session_ends_the_old_one(tmp_path: Path) -> None:
    a, b = Member(tmp_path, 2, 0), Member(tmp_path, 2, 1)
    old = a.open("10.0.0.1", 8118)
    b.join()
    Member(tmp_path, 2, 0).open("10.0.0.1", 8119)
    assert b.problem() == f"node 0 opened a new session ({a._read_session().id}): session {old.id} is over"


def test_the_watch_beats_and_stops_the_job_once(tmp_path: Path) -> None:
    a, b = Member(tmp_path, 2, 0), Member(tmp_path, 2, 1)
    a.open("10.0.0.1", 8118)
    b.join()
    stops: list[str] = []
    watch = ClusterWatch(a, stops.append, interval=0.05)
    watch.start()
    time.sleep(0.3)
    assert stops == [] and watch.is_alive()
    b.fail("stopped by Airflow")
    watch.join(5)
    assert stops == ["node 1 failed: stopped by Airflow"] and watch.reason == stops[0]
    watch.close()


def test_node_address_prefers_the_setting_then_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_LORA_NODE_ADDR", "10.9.8.7")
    assert node_address("127.0.0.1") == "10.9.8.7"
    monkeypatch.delenv("LLAMA_LORA_NODE_ADDR")
    assert node_address("127.0.0.1") == "127.0.0.1"  # the route to loopback leaves from loopback
