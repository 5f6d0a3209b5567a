"""Launch `llama_core.run` on every local device with MindSpore's `msrun`, and watch the ranks.

`python -m llama_core.launch [msrun flags] -- <llama_core.run args>` runs the real `msrun` with the
reference launcher's defaults (8 workers, master 127.0.0.1:8118, node_rank 0, logs in
`output/msrun_log`, cluster time-out 7200 s). msrun writes `LOG_DIR/worker_<rank>.log` per rank and
`LOG_DIR/scheduler.log`.

What this adds to msrun:

- Per-rank exit codes. msrun starts each process as `python -m llama_core.launch --rank-wrapper
  STATUS_DIR -- <command>`: that thin wrapper records its pid, runs the real command as its child (same
  stdout, i.e. the rank's log), and writes the child's exit status to `LOG_DIR/.rank_status/`. msrun
  itself only reports the first failing pid (and nothing with `--join False`, the reference default,
  where it exits right after spawning), so the status files are the one robust source: they survive
  msrun exiting, work for orphaned processes, and a process that vanishes without one (SIGKILL, OOM
  killer) is detected by its recorded pid and start time.
- Fail fast. A rank (or the scheduler) that exits non-zero or vanishes fails the launch within a poll
  interval: the other ranks and the scheduler are killed (their whole process groups) instead of
  waiting for `cluster_time_out`, and `LaunchError` names the rank, its exit code, its log and the
  log's last lines. The same clean-up runs when the caller is interrupted (Airflow task kill). A rank
  that msrun started but whose wrapper had not registered yet is waited for and stopped too (a stop
  file in the status folder makes a late wrapper exit before running its command).
- Pre-flight: log_dir writable, master port free, and no process left over from an earlier run on
  the same port (the reference's "Maybe the last training process is running"), naming its pids.
- `on_line(rank, line)` streams every rank's log lines live by tailing the files.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from llama_core.atomic import write_json_atomic
from llama_core.cli import run
from llama_core.errors import ConfigError, LlamaCoreError

log = logging.getLogger("llama_core.launch")

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "llama_core.run")
STATUS_DIRNAME = ".rank_status"
# Written by the launcher when it stops the job: a wrapper msrun starts after that runs nothing.
STOP_FILE = "stop.json"
SCHEDULER = "scheduler"
POLL_S = 0.2
# After every worker succeeded the scheduler only has to notice and exit; don't wait for ever.
SCHEDULER_GRACE_S = 60.0
# msrun imports MindSpore before spawning anything; a wrapper that never reports means msrun broke.
SPAWN_TIMEOUT_S = 300.0
# When stopping: how long to wait for a wrapper msrun already started (its log exists) to register.
REGISTER_WAIT_S = 30.0
TAIL_LINES = 20


class LaunchError(LlamaCoreError):
    """The launch failed: pre-flight refused, msrun failed, or a rank exited non-zero or vanished.

    `result` holds every rank's outcome and log path when processes were started (else None);
    `rank` is the failed rank (-1 for the scheduler, None when no rank is at fault).
    """

    def __init__(self, message: str, result: LaunchResult | None = None, rank: int | None = None) -> None:
        super().__init__(message)
        self.result = result
        self.rank = rank


@dataclass
class RankResult:
    """How one rank ended. exit_code: the command's exit code, -N if killed by signal N (-9 when the
    launcher stopped it after another rank failed), None if it vanished without a status."""

    rank: int
    log_path: Path
    exit_code: int | None = None
    killed_by_launcher: bool = False


@dataclass
class LaunchResult:
    """Outcome of a launch; `ranks` is ordered by rank id (only this node's ranks)."""

    ok: bool
    ranks: list[RankResult]
    scheduler: RankResult | None
    log_dir: Path
    msrun_log: Path
    msrun_command: list[str]
    duration_s: float
    failure: str | None = None

    @property
    def exit_codes(self) -> dict[int, int | None]:
        return {r.rank: r.exit_code for r in self.ranks}

    @property
    def log_paths(self) -> dict[int, Path]:
        return {r.rank: r.log_path for r in self.ranks}


# ---------------------------------------------------------------- pre-flight


def _port_owner(port: int) -> str:
    """Who listens on `port`, as 'pid N (cmd)', or '' when the OS does not tell us."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" by pid {conn.pid} ({_describe(conn.pid)})"
    return ""


def _describe(pid: int) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(psutil.Process(pid).cmdline())[:200]
    return "?"


def stale_processes(port: int) -> list[psutil.Process]:
    """Processes of an earlier msrun job on `port` (their environment says MS_SCHED_PORT=port)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            env = proc.environ()
            if env.get("MS_SCHED_PORT") == str(port) and env.get("MS_ROLE"):
                found.append(proc)
    return found


def preflight(log_dir: Path, master_addr: str, master_port: int, is_master: bool) -> None:
    """Refuse to start when the launch could not work: raises LaunchError with the fix."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LaunchError(f"log_dir {log_dir} is not writable: {exc}") from exc
    stale = stale_processes(master_port)
    if stale:
        listing = "; ".join(f"pid {p.pid} ({_describe(p.pid)})" for p in stale[:8])
        raise LaunchError(
            f"{len(stale)} process(es) of an earlier msrun job on port {master_port} are still running "
            f"(maybe the last training process is running): {listing}. Stop them "
            f"(kill {' '.join(str(p.pid) for p in stale[:8])}) or choose another --master_port."
        )
    if not is_master:
        return
    with socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET) as sock:
        # SO_REUSEADDR: a port in TIME_WAIT after a clean exit is usable; a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((master_addr, master_port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise LaunchError(f"cannot bind master {master_addr}:{master_port}: {exc}") from exc
            raise LaunchError(
                f"master_port {master_port} on {master_addr} is already in use{_port_owner(master_port)}. "
                "Maybe the last training process is running; stop it or choose another --master_port."
            ) from exc


# ---------------------------------------------------------------- rank wrapper (runs under msrun)


def _status_name() -> str:
    """`scheduler` or `rank_<RANK_ID>`, from the environment msrun gives each process."""
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return SCHEDULER
    return f"rank_{os.environ.get('RANK_ID', os.environ.get('DEVICE_ID', '0'))}"


def rank_wrapper(status_dir: Path, command: Sequence[str]) -> int:
    """Run `command` as a child, recording our pid first and the child's exit status last."""
    name = _status_name()
    me = psutil.Process()
    write_json_atomic(
        status_dir / f"{name}.pid.json",
        {"pid": me.pid, "pgid": os.getpgid(0), "create_time": me.create_time()},
    )
    # The launcher writes STOP_FILE before it reads the pid files: either it sees ours and kills us,
    # or we see its file here, so no rank it meant to stop starts late and runs on unwatched.
    if (status_dir / STOP_FILE).exists():
        status = {"exit_code": -signal.SIGKILL, "not_started": True}
        write_json_atomic(status_dir / f"{name}.exit.json", status)
        return 128 + signal.SIGKILL
    child = subprocess.Popen(list(command))

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    write_json_atomic(status_dir / f"{name}.exit.json", {"exit_code": code})
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------- monitoring


class _Tail:
    """Yields complete new lines of a growing file (cheap: one read per poll)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self, final: bool = False) -> list[str]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


def _last_lines(path: Path, n: int = TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(empty log)"


@dataclass
class _Proc:
    """One msrun-spawned process as seen through its wrapper's status files."""

    name: str
    result: RankResult
    status_dir: Path
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None
    done: bool = False
    tail: _Tail | None = field(default=None)

    def poll(self) -> bool:
        """Refresh; True once the process has ended (exit code recorded or vanished)."""
        if self.done:
            return True
        if self.pid is None:
            info = _read_json(self.status_dir / f"{self.name}.pid.json")
            if info is None:
                return False
            self.pid, self.pgid, self.create_time = info["pid"], info["pgid"], info["create_time"]
        status = _read_json(self.status_dir / f"{self.name}.exit.json")
        if status is not None:
            self.result.exit_code = status["exit_code"]
            self.result.killed_by_launcher = status.get("not_started", False)
            self.done = True
        elif not self._alive():
            # The wrapper died without writing (SIGKILL, OOM killer); re-check for a late write.
            status = _read_json(self.status_dir / f"{self.name}.exit.json")
            self.result.exit_code = None if status is None else status["exit_code"]
            self.done = True
        return self.done

    def _alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.create_time and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def kill(self) -> None:
        """Refresh, then SIGKILL the process group (wrapper + command + anything they started) while
        the wrapper runs; one that already recorded its exit status keeps it."""
        self.poll()
        if self.pgid is None or not self._alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        if not self.done:
            self.result.exit_code = -signal.SIGKILL
            self.result.killed_by_launcher = True
            self.done = True

    def lingering(self) -> bool:
        """Still to wait for when stopping: a wrapper that runs, or a rank msrun has started (it
        creates the rank's log right before spawning it) that has not registered yet. The
        scheduler, unlike the ranks, stays in msrun's process group and dies with it."""
        if self.pid is None:
            return self.name != SCHEDULER and self.result.log_path.exists()
        return self._alive()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "vanished without an exit status (killed by SIGKILL or the OOM killer?)"
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


# ---------------------------------------------------------------- launch


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


def launch(
    run_args: Sequence[str],
    *,
    worker_num: int = 8,
    local_worker_num: int = 8,
    master_addr: str = "127.0.0.1",
    master_port: int = 8118,
    node_rank: int = 0,
    log_dir: str | os.PathLike[str] = "output/msrun_log",
    join: bool = False,
    cluster_time_out: int = 7200,
    devices: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[int, str], None] | None = None,
    command: Sequence[str] = DEFAULT_COMMAND,
) -> LaunchResult:
    """Run `command + run_args` (default `python -m llama_core.run ...`) on this node's ranks via msrun.

    Blocks until every local rank has exited. Returns a LaunchResult when all exited 0; raises
    LaunchError (with `.result` and `.rank`) as soon as one fails, after killing the others.
    `devices`: physical NPU ids for local ranks 0..n-1 (sets ASCEND_RT_VISIBLE_DEVICES; msrun gives
    each rank DEVICE_ID=<local rank>). `env` is added to the inherited environment, so ASCEND_*/HCCL_*
    settings of the caller reach every rank. `on_line(rank, line)` gets each rank's log lines live.
    """
    if not 0 < local_worker_num <= worker_num:
        raise ConfigError(f"need 0 < local_worker_num ({local_worker_num}) <= worker_num ({worker_num})")
    if local_worker_num < worker_num and node_rank < 0:
        raise ConfigError("node_rank must be >= 0 when the job spans several nodes")
    if devices is not None and len(devices) != local_worker_num:
        raise ConfigError(f"devices has {len(devices)} ids but local_worker_num is {local_worker_num}")
    log_dir = Path(log_dir).resolve()
    is_master = _is_local(master_addr) and (local_worker_num == worker_num or node_rank == 0)
    preflight(log_dir, master_addr, master_port, is_master)

    status_dir = log_dir / STATUS_DIRNAME
    shutil.rmtree(status_dir, ignore_errors=True)
    status_dir.mkdir(parents=True)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if devices is not None:
        child_env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    python = _python_on_path(child_env)
    msrun = shutil.which("msrun", path=child_env["PATH"])
    if msrun is None:
        raise ConfigError("msrun not found on PATH (it is installed with mindspore)")
    first = 0 if local_worker_num == worker_num else node_rank * local_worker_num
    procs = [
        _Proc(f"rank_{r}", RankResult(r, log_dir / f"worker_{r}.log"), status_dir)
        for r in range(first, first + local_worker_num)
    ]
    sched = _Proc(SCHEDULER, RankResult(-1, log_dir / "scheduler.log"), status_dir) if is_master else None
    watched = [*procs, *([sched] if sched else [])]
    for p in watched:  # msrun truncates them anyway; a stale one would pass for a rank being started
        p.result.log_path.unlink(missing_ok=True)
    msrun_cmd = [
        msrun,
        f"--worker_num={worker_num}",
        f"--local_worker_num={local_worker_num}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        f"--node_rank={node_rank}",
        f"--log_dir={log_dir}",
        f"--join={join}",
        f"--cluster_time_out={cluster_time_out}",
        python,
        "-m",
        "llama_core.launch",
        "--rank-wrapper",
        str(status_dir),
        "--",
        *command,
        *run_args,
    ]
    msrun_log = log_dir / "msrun.log"
    log.info("launching %d of %d ranks: %s", local_worker_num, worker_num, " ".join(msrun_cmd))
    start = time.monotonic()
    with msrun_log.open("wb") as out:
        # Own session: the scheduler stays in msrun's process group, so one killpg reaches it.
        msrun_proc = subprocess.Popen(
            msrun_cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )

    def result(failure: str | None) -> LaunchResult:
        return LaunchResult(
            ok=failure is None,
            ranks=[p.result for p in procs],
            scheduler=sched.result if sched else None,
            log_dir=log_dir,
            msrun_log=msrun_log,
            msrun_command=msrun_cmd,
            duration_s=time.monotonic() - start,
            failure=failure,
        )

    def stream(final: bool = False) -> None:
        for p in procs:
            if p.tail is None and (p.pid is not None or final):
                p.tail = _Tail(p.result.log_path)  # msrun truncated the log before starting the wrapper
            if p.tail is not None and on_line is not None:
                for line in p.tail.read(final):
                    on_line(p.result.rank, line)

    finished = False
    try:
        failed, msrun_failure = _watch(procs, sched, msrun_proc, stream, start)
        _kill_all(watched, msrun_proc, status_dir)
        stream(final=True)
        finished = True
    finally:
        if not finished:  # interrupted (Ctrl+C, Airflow task kill): leave nothing running
            _kill_all(watched, msrun_proc, status_dir)
    if failed is not None:
        who = "scheduler" if failed is sched else f"rank {failed.result.rank}"
        msg = (
            f"{who} {_describe_exit(failed.result.exit_code)}; log {failed.result.log_path}; "
            f"the other processes were stopped. Last lines of its log:\n{_last_lines(failed.result.log_path)}"
        )
        raise LaunchError(msg, result(msg), failed.result.rank)
    if msrun_failure is not None:
        msg = f"{msrun_failure}; msrun output ({msrun_log}):\n{_last_lines(msrun_log)}"
        raise LaunchError(msg, result(msg), None)
    res = result(None)
    log.info("all %d ranks exited 0 in %.1f s; logs in %s", len(procs), res.duration_s, log_dir)
    return res


def _watch(
    procs: list[_Proc],
    sched: _Proc | None,
    msrun_proc: subprocess.Popen,
    stream: Callable[[], None],
    start: float,
) -> tuple[_Proc | None, str | None]:
    """Poll until all ranks are done or something failed: (failed process, msrun failure message)."""
    watched = [*procs, *([sched] if sched else [])]
    workers_done_at = None
    while True:
        for p in watched:
            p.poll()
        stream()
        failed = [p for p in watched if p.done and p.result.exit_code != 0]
        if failed:
            # A rank with a real exit code is the cause; ranks msrun killed afterwards vanish without
            # one, and the scheduler fails as a consequence of a worker failing.
            failed.sort(key=lambda p: (p is sched, p.result.exit_code is None))
            return failed[0], None
        msrun_code = msrun_proc.poll()
        if msrun_code not in (None, 0):
            return None, f"msrun exited with code {msrun_code}"
        if (
            msrun_code == 0
            and any(p.pid is None for p in watched)
            and time.monotonic() - start > SPAWN_TIMEOUT_S
        ):
            missing = ", ".join(p.name for p in watched if p.pid is None)
            return None, f"msrun finished but {missing} never started within {SPAWN_TIMEOUT_S:.0f} s"
        if all(p.done for p in procs):
            workers_done_at = workers_done_at or time.monotonic()
            if sched is None or sched.done:
                return None, None
            if time.monotonic() - workers_done_at > SCHEDULER_GRACE_S:
                log.warning(
                    "all ranks succeeded; scheduler still running after %.0f s, stopping it",
                    SCHEDULER_GRACE_S,
                )
                return None, None
        time.sleep(POLL_S)


def _kill_all(watched: Sequence[_Proc], msrun_proc: subprocess.Popen, status_dir: Path) -> None:
    """Stop msrun and every process it started, including wrappers that have not registered yet:
    they register and are killed, or see STOP_FILE and exit without running their command."""
    write_json_atomic(status_dir / STOP_FILE, {"stopped_at": time.time()})
    for p in watched:
        p.kill()
    # After the ranks: msrun, when still running, reaps the ones it started. Its process group holds
    # the scheduler and outlives msrun, so it is signalled even after msrun exited (msrun is not yet
    # reaped, so its pid, the group id, cannot have been reused).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(msrun_proc.pid, signal.SIGKILL)
    msrun_proc.wait()
    deadline = time.monotonic() + REGISTER_WAIT_S
    while any(p.lingering() for p in watched) and time.monotonic() < deadline:  # SIGKILL is not instant
        time.sleep(POLL_S)
        for p in watched:
            p.kill()


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_core.launch",
        description="Run `python -m llama_core.run ARGS` on every rank with msrun; fail fast if a rank dies.",
        usage="%(prog)s [msrun flags] -- <llama_core.run args>",
    )
    parser.add_argument("--worker_num", type=int, default=8, help="total ranks (default 8)")
    parser.add_argument("--local_worker_num", type=int, default=8, help="ranks on this node (default 8)")
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument("--master_port", type=int, default=8118)
    parser.add_argument("--node_rank", type=int, default=0)
    parser.add_argument("--log_dir", default="output/msrun_log")
    parser.add_argument("--join", type=lambda s: s.lower() == "true", default=False, help="passed to msrun")
    parser.add_argument("--cluster_time_out", type=int, default=7200, help="seconds (passed to msrun)")
    parser.add_argument("--devices", help="comma-separated physical NPU ids for local ranks 0..n-1")
    parser.add_argument("--quiet", action="store_true", help="don't echo rank logs to stdout")
    parser.add_argument("--rank-wrapper", metavar="STATUS_DIR", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    if args.rank_wrapper:
        return rank_wrapper(Path(args.rank_wrapper), rest)

    def echo(rank: int, line: str) -> None:
        print(f"[rank {rank}] {line}", flush=True)

    result = launch(
        rest,
        worker_num=args.worker_num,
        local_worker_num=args.local_worker_num,
        master_addr=args.master_addr,
        master_port=args.master_port,
        node_rank=args.node_rank,
        log_dir=args.log_dir,
        join=args.join,
        cluster_time_out=args.cluster_time_out,
        devices=[int(d) for d in args.devices.split(",")] if args.devices else None,
        on_line=None if args.quiet else echo,
    )
    for r in result.ranks:
        print(f"rank {r.rank}: exit {r.exit_code}, log {r.log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
