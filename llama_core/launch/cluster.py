"""The nodes of one multi-node msrun job finding each other and failing together, through a folder
they all see (the run's output folder: multi-node fine-tunes need shared storage for checkpoints
anyway, as MindFormers requires).

- Node 0 opens a session: `session.json` names a fresh id, msrun's master address and port, the node
  count and when it opened.
- Every node (0 too) beats: `<id>/node_<k>.json` every HEARTBEAT_S, with its state (running, done).
- A node whose job ends badly writes `<id>/failed.json` (the first one stays) naming itself and why.
- `Member.problem()` is what should stop a node's job: another node failed; a node's heartbeat is
  older than `stale_after` (its task process or host died without a word); not every node joined
  within `start_timeout` (fewer free hosts than nodes); node 0 opened a newer session.

Nodes other than 0 wait for a live session (bounded by `start_timeout`): one whose node 0 beats and
that has not failed. A session that failed after this node started fails it at once; an older dead
one (an earlier try) is waited past. `ClusterWatch` beats and checks on a thread and stops the job
when `problem()` says so: every node of a failed job stops within seconds, none waits for msrun's
`cluster_time_out`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_core.atomic import write_json_atomic
from llama_core.errors import LlamaCoreError
from llama_core.launch.status import read_json

log = logging.getLogger("llama_core.launch")

HEARTBEAT_S = 2.0
STALE_AFTER_S = 20.0
NODE_ADDR_ENV = "LLAMA_LORA_NODE_ADDR"


class ClusterError(LlamaCoreError):
    """The nodes could not run together (never all started, or another node failed)."""


def node_address(probe: str | None = None) -> str:
    """The address other nodes reach this one at: `LLAMA_LORA_NODE_ADDR` when set, else the local
    address of the route to `probe` (a host every node reaches, e.g. the Airflow API server), else
    this host name's address."""
    if os.environ.get(NODE_ADDR_ENV):
        return os.environ[NODE_ADDR_ENV]
    if probe:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((probe, 9))  # UDP connect sends nothing: it only picks the route
                return s.getsockname()[0]
            except OSError:
                pass
    return socket.gethostbyname(socket.gethostname())


@dataclass(frozen=True)
class Session:
    """What node 0 published: the rendezvous of one try of the job."""

    id: str
    master_addr: str
    master_port: int
    nodes: int
    opened_at: float

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Session:
        return cls(
            doc["id"], doc["master_addr"], int(doc["master_port"]), int(doc["nodes"]), float(doc["opened_at"])
        )


class Member:
    """This node in the job's session folder `root`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        nodes: int,
        node_rank: int,
        *,
        start_timeout: float = 600.0,
        stale_after: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= node_rank < nodes:
            raise ClusterError(f"node_rank {node_rank} is not in 0..{nodes - 1}")
        self.root, self.nodes, self.node_rank = Path(root), nodes, node_rank
        self.start_timeout, self.stale_after, self.clock = start_timeout, stale_after, clock
        self.session: Session | None = None
        self.started_at = clock()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ files

    @property
    def session_file(self) -> Path:
        return self.root / "session.json"

    def _dir(self, session: Session) -> Path:
        return self.root / session.id

    def _read_session(self) -> Session | None:
        doc = read_json(self.session_file)
        try:
            return Session.from_dict(doc) if doc else None
        except (KeyError, TypeError, ValueError):
            return None

    def _failure(self, session: Session) -> dict[str, Any] | None:
        return read_json(self._dir(session) / "failed.json")

    def _beat_of(self, session: Session, node: int) -> dict[str, Any] | None:
        return read_json(self._dir(session) / f"node_{node}.json")

    # ------------------------------------------------------------ joining

    def open(self, master_addr: str, master_port: int) -> Session:
        """Node 0: publish a new session for this try and join it."""
        if self.node_rank != 0:
            raise ClusterError("only node 0 opens a session")
        session = Session(uuid.uuid4().hex[:12], master_addr, master_port, self.nodes, self.clock())
        self._dir(session).mkdir(parents=True, exist_ok=True)
        self.session = session
        self.beat()
        write_json_atomic(self.session_file, session.__dict__)
        log.info("node 0 opened session %s: msrun master %s:%d", session.id, master_addr, master_port)
        return session

    def join(self, poll: float = 0.5) -> Session:
        """Nodes 1..N-1: wait for node 0's live session and join it; ClusterError after `start_timeout`
        or when node 0's session fails while waiting."""
        deadline = self.started_at + self.start_timeout
        seen = None
        while True:
            session = self._read_session()
            if session is not None and session.nodes != self.nodes:
                raise ClusterError(
                    f"node 0's session {session.id} has {session.nodes} nodes; node {self.node_rank} was "
                    f"told {self.nodes}"
                )
            if session is not None:
                failure = self._failure(session)
                if failure is not None and session.opened_at >= self.started_at - self.stale_after:
                    raise ClusterError(f"node 0's session {session.id} failed before node {self.node_rank} "
                                       f"joined: {describe_failure(failure)}")  # fmt: skip
                beat = self._beat_of(session, 0)
                if failure is None and beat is not None and not self._stale(beat):
                    self.session = session
                    self.beat()
                    log.info(
                        "node %d joined session %s: msrun master %s:%d",
                        self.node_rank, session.id, session.master_addr, session.master_port,
                    )  # fmt: skip
                    return session
                if session.id != seen:
                    log.info(
                        "session %s of node 0 is not live (an earlier try?): waiting for a new one",
                        session.id,
                    )
                    seen = session.id
            if self.clock() >= deadline:
                raise ClusterError(
                    f"node {self.node_rank}: node 0 opened no live session within {self.start_timeout:.0f} s "
                    f"(is node 0 running? every node needs a free worker at the same time)"
                )
            time.sleep(poll)

    # ------------------------------------------------------------ running

    def beat(self, state: str = "running") -> None:
        """Write this node's heartbeat (its state: running, done, failed)."""
        assert self.session is not None
        with self._lock:
            write_json_atomic(
                self._dir(self.session) / f"node_{self.node_rank}.json",
                {"node": self.node_rank, "state": state, "at": self.clock(), "pid": os.getpid()},
            )

    def fail(self, reason: str) -> None:
        """Tell every node this one failed (the first failure recorded stays)."""
        if self.session is None:
            return
        path = self._dir(self.session) / "failed.json"
        if read_json(path) is None:
            write_json_atomic(path, {"node": self.node_rank, "reason": reason, "at": self.clock()})
        self.beat("failed")

    def finish(self) -> None:
        """This node's ranks all succeeded: its heartbeat stops being checked for age."""
        self.beat("done")

    def _stale(self, beat: dict[str, Any]) -> bool:
        return beat.get("state") == "running" and self.clock() - float(beat.get("at", 0)) > self.stale_after

    def problem(self) -> str | None:
        """Why this node's job should stop now, or None."""
        session = self.session
        assert session is not None
        current = self._read_session()
        if current is not None and current.id != session.id:
            return f"node 0 opened a new session ({current.id}): session {session.id} is over"
        failure = self._failure(session)
        if failure is not None and failure.get("node") != self.node_rank:
            return describe_failure(failure)
        missing = []
        for node in range(self.nodes):
            if node == self.node_rank:
                continue
            beat = self._beat_of(session, node)
            if beat is None:
                missing.append(node)
            elif self._stale(beat):
                age = self.clock() - float(beat["at"])
                return f"node {node} stopped beating {age:.0f} s ago (its task or host died)"
        waited = self.clock() - max(session.opened_at, self.started_at)
        if missing and waited > self.start_timeout:
            return (
                f"nodes {missing} of {self.nodes} did not join within {self.start_timeout:.0f} s "
                "(fewer free hosts than nodes?)"
            )
        return None


def describe_failure(failure: dict[str, Any]) -> str:
    return f"node {failure.get('node')} failed: {failure.get('reason')}"


class ClusterWatch(threading.Thread):
    """Beats for `member` and calls `stop(reason)` once when `member.problem()` gives one."""

    def __init__(
        self, member: Member, stop: Callable[[str], None], interval: float = HEARTBEAT_S / 2
    ) -> None:
        super().__init__(name=f"cluster-node-{member.node_rank}", daemon=True)
        self.member, self.stop_job, self.interval = member, stop, interval
        self.reason: str | None = None
        self._done = threading.Event()

    def run(self) -> None:
        last_beat = 0.0
        while not self._done.wait(self.interval):
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                self.member.beat()
                last_beat = now
            reason = self.member.problem()
            if reason is not None:
                self.reason = reason
                log.error("node %d: %s; stopping this node's ranks", self.member.node_rank, reason)
                self.stop_job(reason)
                return

    def close(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()
