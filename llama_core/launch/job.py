"""One msrun job on this node: start it, wait for it, stop it from outside, leave nothing behind.

`MsrunJob` is to an Airflow operator what Airflow's SubprocessHook is to BashOperator: the operator
holds it, `execute` calls `start()` and `wait()`, `on_kill` calls `stop()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from llama_core.atomic import write_json_atomic
from llama_core.errors import ConfigError
from llama_core.launch.lock import RunFolderLock
from llama_core.launch.preflight import free_port, preflight
from llama_core.launch.results import LaunchError, LaunchResult, LaunchStopped, RankResult
from llama_core.launch.status import (
    LAUNCHER_PID_ENV,
    LAUNCHER_START_ENV,
    LOG_DIR_ENV,
    SCHEDULER,
    STATUS_DIRNAME,
    STOP_FILE,
    parent_death_signal,
    start_time,
)
from llama_core.launch.watch import LogTail, WatchedProcess, describe_exit, last_lines

log = logging.getLogger("llama_core.launch")

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "llama_core.run")
POLL_S = 0.2
# After every worker succeeded the scheduler only has to notice and exit; don't wait for ever.
SCHEDULER_GRACE_S = 60.0
# msrun imports MindSpore before spawning anything; a wrapper that never reports means msrun broke.
SPAWN_TIMEOUT_S = 300.0
# When stopping: how long to wait for a wrapper msrun already started (its log exists) to register.
REGISTER_WAIT_S = 30.0


def _python_on_path(env: dict[str, str]) -> str:
    """msrun runs `python <args>` found on PATH: make that this interpreter."""
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    for name in ("python3", "python"):
        if os.path.exists(os.path.join(bindir, name)):
            return name
    raise ConfigError(f"no 'python' or 'python3' beside {sys.executable}; msrun needs one on PATH")


def _is_local(addr: str) -> bool:
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(addr, None)}
    except socket.gaierror as exc:
        raise ConfigError(f"master_addr {addr!r} does not resolve: {exc}") from exc
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(ips & (local | {"127.0.0.1", "::1"}))


class MsrunJob:
    """`command + run_args` (default `python -m llama_core.run ...`) on this node's ranks via msrun.

    `start()` runs the pre-flight checks and spawns msrun; `wait()` blocks until every local rank has
    exited and returns a LaunchResult, or raises LaunchError (with `.result` and `.rank`) as soon as
    one fails, after stopping the others; `stop(reason)` ends the job from another thread or a signal
    handler (Airflow's `on_kill`), and `wait()` then raises LaunchStopped. Whatever ends the caller
    (an exception in `wait()`, even SIGKILL of this process), no process of the job outlives it: msrun
    gets the kernel's parent-death signal and every rank wrapper watches this process.

    `master_port=None` picks a port that is free now, so concurrent jobs on one node never share one.
    `devices`: physical NPU ids for local ranks 0..n-1 (sets ASCEND_RT_VISIBLE_DEVICES; msrun gives each
    rank DEVICE_ID=<local rank>). `env` is added to the inherited environment, so ASCEND_*/HCCL_*
    settings of the caller reach every rank. `on_line(rank, line)` gets each rank's log lines live;
    `on_tick()` is called at every poll of `wait()` (about every POLL_S seconds) and must not raise.
    Call `start()` and `wait()` from one thread that lives as long as the job (the parent-death signal
    follows the thread that started msrun).
    """

    def __init__(
        self,
        run_args: Sequence[str],
        *,
        worker_num: int = 8,
        local_worker_num: int = 8,
        master_addr: str = "127.0.0.1",
        master_port: int | None = 8118,
        node_rank: int = 0,
        log_dir: str | os.PathLike[str] = "output/msrun_log",
        join: bool = False,
        cluster_time_out: int = 7200,
        devices: Sequence[int] | None = None,
        env: Mapping[str, str] | None = None,
        on_line: Callable[[int, str], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        command: Sequence[str] = DEFAULT_COMMAND,
    ) -> None:
        if not 0 < local_worker_num <= worker_num:
            raise ConfigError(f"need 0 < local_worker_num ({local_worker_num}) <= worker_num ({worker_num})")
        if local_worker_num < worker_num and node_rank < 0:
            raise ConfigError("node_rank must be >= 0 when the job spans several nodes")
        if devices is not None and len(devices) != local_worker_num:
            raise ConfigError(f"devices has {len(devices)} ids but local_worker_num is {local_worker_num}")
        self.run_args, self.command = list(run_args), list(command)
        self.worker_num, self.local_worker_num, self.node_rank = worker_num, local_worker_num, node_rank
        self.master_addr, self.master_port = master_addr, master_port
        self.join, self.cluster_time_out = join, cluster_time_out
        self.devices, self.env, self.on_line, self.on_tick = devices, dict(env or {}), on_line, on_tick
        self.log_dir = Path(log_dir).resolve()
        self.status_dir = self.log_dir / STATUS_DIRNAME
        self.msrun_log = self.log_dir / "msrun.log"
        self.result: LaunchResult | None = None  # set when wait() ends, whichever way
        self._msrun: subprocess.Popen | None = None
        self._procs: list[WatchedProcess] = []
        self._sched: WatchedProcess | None = None
        self._cmd: list[str] = []
        self._start = 0.0
        self._stop_reason: str | None = None
        self._waiting = False
        self._lock = RunFolderLock(self.log_dir)

    # ------------------------------------------------------------ start

    def start(self) -> None:
        """Pre-flight checks, then spawn msrun; returns once msrun runs (ranks start in the background)."""
        is_master = _is_local(self.master_addr) and (
            self.local_worker_num == self.worker_num or self.node_rank == 0
        )
        if self.master_port is None:
            self.master_port = free_port(self.master_addr)
        preflight(self.log_dir, self.master_addr, self.master_port, is_master)
        self._lock.acquire()
        try:
            self._spawn(is_master)
        except BaseException:
            self._lock.release()
            raise

    def _spawn(self, is_master: bool) -> None:
        shutil.rmtree(self.status_dir, ignore_errors=True)
        self.status_dir.mkdir(parents=True)
        me = os.getpid()
        child_env = {
            **os.environ,
            **self.env,
            "PYTHONUNBUFFERED": "1",
            LAUNCHER_PID_ENV: str(me),
            LAUNCHER_START_ENV: repr(start_time(me)),
            LOG_DIR_ENV: str(self.log_dir),
        }
        if self.devices is not None:
            child_env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.devices)
        python = _python_on_path(child_env)
        msrun = shutil.which("msrun", path=child_env["PATH"])
        if msrun is None:
            raise ConfigError("msrun not found on PATH (it is installed with mindspore)")
        first = 0 if self.local_worker_num == self.worker_num else self.node_rank * self.local_worker_num
        self._procs = [
            WatchedProcess(f"rank_{r}", RankResult(r, self.log_dir / f"worker_{r}.log"), self.status_dir)
            for r in range(first, first + self.local_worker_num)
        ]
        if is_master:
            self._sched = WatchedProcess(
                SCHEDULER, RankResult(-1, self.log_dir / "scheduler.log"), self.status_dir
            )
        for p in self._watched:  # msrun truncates them anyway; a stale one would pass for a rank starting
            p.result.log_path.unlink(missing_ok=True)
        self._cmd = [
            msrun,
            f"--worker_num={self.worker_num}",
            f"--local_worker_num={self.local_worker_num}",
            f"--master_addr={self.master_addr}",
            f"--master_port={self.master_port}",
            f"--node_rank={self.node_rank}",
            f"--log_dir={self.log_dir}",
            f"--join={self.join}",
            f"--cluster_time_out={self.cluster_time_out}",
            python,
            "-m",
            "llama_core.launch.wrapper",
            str(self.status_dir),
            "--",
            *self.command,
            *self.run_args,
        ]
        log.info("launching %d of %d ranks: %s", self.local_worker_num, self.worker_num, " ".join(self._cmd))
        self._start = time.monotonic()
        with self.msrun_log.open("wb") as out:
            # Own session: the scheduler stays in msrun's process group, so one killpg reaches it.
            self._msrun = subprocess.Popen(
                self._cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
                preexec_fn=parent_death_signal(),
                pass_fds=(self._lock.fd,),  # msrun holds the run-folder lock too, until it is gone
            )

    @property
    def _watched(self) -> list[WatchedProcess]:
        return [*self._procs, *([self._sched] if self._sched else [])]

    # ------------------------------------------------------------ wait

    def wait(self) -> LaunchResult:
        """Watch the job to its end; see the class docstring for what it returns and raises."""
        if self._msrun is None:
            raise RuntimeError("MsrunJob.wait() before start()")
        self._waiting = True
        try:
            failed, msrun_failure = self._watch()
            self._stop_all()
            self._stream(final=True)
        except BaseException as exc:  # interrupted (Ctrl+C, Airflow's execution_timeout): leave nothing
            if self._stop_reason is None:
                self._stop_reason = f"the launcher was interrupted ({type(exc).__name__})"
                log.warning("stopping the msrun job: %s", self._stop_reason)
            self._stop_all()
            self.result = self._result(self._stop_reason)
            raise
        finally:
            self._waiting = False
            self._lock.release()
        if self._stop_reason is not None:
            msg = f"the msrun job was stopped: {self._stop_reason}; every rank was stopped"
            self.result = self._result(msg)
            raise LaunchStopped(msg, self.result, None)
        if failed is not None:
            who = "scheduler" if failed is self._sched else f"rank {failed.result.rank}"
            msg = (
                f"{who} {describe_exit(failed.result.exit_code)}; log {failed.result.log_path}; the other "
                f"processes were stopped. Last lines of its log:\n{last_lines(failed.result.log_path)}"
            )
            self.result = self._result(msg)
            raise LaunchError(msg, self.result, failed.result.rank)
        if msrun_failure is not None:
            msg = f"{msrun_failure}; msrun output ({self.msrun_log}):\n{last_lines(self.msrun_log)}"
            self.result = self._result(msg)
            raise LaunchError(msg, self.result, None)
        self.result = self._result(None)
        done = len(self._procs), self.result.duration_s, self.log_dir
        log.info("all %d ranks exited 0 in %.1f s; logs in %s", *done)
        return self.result

    def _result(self, failure: str | None) -> LaunchResult:
        return LaunchResult(
            ok=failure is None,
            ranks=[p.result for p in self._procs],
            scheduler=self._sched.result if self._sched else None,
            log_dir=self.log_dir,
            msrun_log=self.msrun_log,
            msrun_command=self._cmd,
            duration_s=time.monotonic() - self._start,
            master_port=int(self.master_port or 0),
            failure=failure,
            stop_reason=self._stop_reason,
        )

    def _stream(self, final: bool = False) -> None:
        for p in self._procs:
            if p.tail is None and (p.pid is not None or final):
                # msrun truncated the log before starting the wrapper: tail from its start.
                p.tail = LogTail(p.result.log_path)
            if p.tail is not None and self.on_line is not None:
                for line in p.tail.read(final):
                    self.on_line(p.result.rank, line)

    def _watch(self) -> tuple[WatchedProcess | None, str | None]:
        """Poll until all ranks are done, something failed, or stop() was called:
        (failed process, msrun failure message)."""
        assert self._msrun is not None
        workers_done_at = None
        while True:
            if self._stop_reason is not None:
                return None, None
            for p in self._watched:
                p.poll()
            self._stream()
            if self.on_tick is not None:
                self.on_tick()
            failed = [p for p in self._watched if p.done and p.result.exit_code != 0]
            if failed and self._stop_reason is None:  # ranks a stop() just killed are not failures
                # A rank with a real exit code is the cause; ranks msrun killed afterwards vanish without
                # one, and the scheduler fails as a consequence of a worker failing.
                failed.sort(key=lambda p: (p is self._sched, p.result.exit_code is None))
                return failed[0], None
            msrun_code = self._msrun.poll()
            if msrun_code not in (None, 0):
                return None, f"msrun exited with code {msrun_code}"
            if (
                msrun_code == 0
                and any(p.pid is None for p in self._watched)
                and time.monotonic() - self._start > SPAWN_TIMEOUT_S
            ):
                missing = ", ".join(p.name for p in self._watched if p.pid is None)
                return None, f"msrun finished but {missing} never started within {SPAWN_TIMEOUT_S:.0f} s"
            if all(p.done for p in self._procs):
                workers_done_at = workers_done_at or time.monotonic()
                if self._sched is None or self._sched.done:
                    return None, None
                if time.monotonic() - workers_done_at > SCHEDULER_GRACE_S:
                    log.warning(
                        "all ranks succeeded; scheduler still running after %.0f s, stopping it",
                        SCHEDULER_GRACE_S,
                    )
                    return None, None
            time.sleep(POLL_S)

    # ------------------------------------------------------------ stop

    def stop(self, reason: str = "stopped by the caller") -> None:
        """Stop every process of the job. Safe from another thread or a signal handler, and more than
        once: the first reason is kept. While `wait()` runs, this only signals (SIGKILL) and `wait()`
        reaps and raises LaunchStopped; otherwise it also waits until every process is gone."""
        if self._msrun is None or self._stop_reason is not None:
            return
        self._stop_reason = reason
        log.warning("stopping the msrun job (%d ranks, log %s): %s", len(self._procs), self.log_dir, reason)
        if self._waiting:
            self._signal_all()
        else:
            self._stop_all()
            self._lock.release()

    def _signal_all(self) -> None:
        """SIGKILL msrun and every process it started; no waiting, so it is fit for a signal handler.
        Wrappers that have not registered yet see STOP_FILE and exit without running their command."""
        assert self._msrun is not None
        write_json_atomic(self.status_dir / STOP_FILE, {"stopped_at": time.time()})
        for p in self._watched:
            p.poll()  # a process that ended before the stop keeps its own outcome
            p.stopping = True
        for p in self._watched:
            p.kill()
        # After the ranks: msrun, when still running, reaps the ones it started. Its process group
        # holds the scheduler and outlives msrun, so it is signalled even after msrun exited (msrun is
        # not yet reaped, so its pid, the group id, cannot have been reused).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._msrun.pid, signal.SIGKILL)

    def _stop_all(self) -> None:
        """`_signal_all`, then wait until msrun is reaped and every wrapper, registered or about to
        register, is gone (SIGKILL is not instant)."""
        assert self._msrun is not None
        self._signal_all()
        self._msrun.wait()
        deadline = time.monotonic() + REGISTER_WAIT_S
        while any(p.lingering() for p in self._watched) and time.monotonic() < deadline:
            time.sleep(POLL_S)
            for p in self._watched:
                p.kill()


def launch(run_args: Sequence[str], **kwargs: Any) -> LaunchResult:
    """Start an `MsrunJob(run_args, **kwargs)` and wait for it (see MsrunJob)."""
    job = MsrunJob(run_args, **kwargs)
    job.start()
    return job.wait()
