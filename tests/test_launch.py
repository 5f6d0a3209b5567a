"""The msrun launcher on CPU: real msrun, small stand-in rank programs instead of llama_core.run."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from processes import job_processes, sleeper_with_env, wait_until

from llama_core.launch import LaunchError, LaunchStopped, MsrunJob, launch
from llama_core.launch.preflight import free_port
from llama_core.launch.watch import last_lines

# Stand-in for `python -m llama_core.run`: msrun also starts the scheduler with the same command
# (MS_ROLE=MS_SCHED), which exits at once here since no MindSpore cluster is built.
RANK_PROGRAM = """
import os, signal, sys, time
if os.environ.get("MS_ROLE") == "MS_SCHED":
    sys.exit(0)
rank = int(os.environ["RANK_ID"])
mode = sys.argv[1]
print(f"hello rank={rank} device={os.environ['DEVICE_ID']} size={os.environ['RANK_SIZE']} "
      f"args={sys.argv[1:]} extra={os.environ.get('EXTRA_SETTING')}", flush=True)
if mode == "ok":
    print(f"done rank={rank}")
elif rank == 1 and mode == "fail":
    print("rank 1 gives up", flush=True)
    sys.exit(3)
elif rank == 1 and mode == "vanish":
    os.killpg(0, signal.SIGKILL)
else:
    time.sleep(600)
"""


@pytest.fixture()
def program(tmp_path: Path) -> list[str]:
    path = tmp_path / "rank_program.py"
    path.write_text(RANK_PROGRAM)
    return [sys.executable, str(path)]


def run_two(program: list[str], mode: str, log_dir: Path, **kwargs):
    return launch(
        [mode, "--flag", "x"],
        worker_num=2,
        local_worker_num=2,
        master_port=free_port(),
        log_dir=log_dir,
        command=program,
        **kwargs,
    )


def test_two_ranks_succeed_with_codes_logs_and_live_lines(program: list[str], tmp_path: Path) -> None:
    lines: list[tuple[int, str]] = []
    result = run_two(
        program,
        "ok",
        tmp_path / "logs",
        env={"EXTRA_SETTING": "passed"},
        on_line=lambda rank, line: lines.append((rank, line)),
    )
    assert result.ok and result.failure is None
    assert result.exit_codes == {0: 0, 1: 0}
    assert result.log_paths == {r: (tmp_path / "logs" / f"worker_{r}.log").resolve() for r in (0, 1)}
    for rank in (0, 1):
        text = result.log_paths[rank].read_text()
        # msrun's DEVICE_ID/RANK_ID/RANK_SIZE, our run args and the caller's extra env reach each rank.
        expected = f"hello rank={rank} device={rank} size=2 args=['ok', '--flag', 'x'] extra=passed"
        assert expected in text
        assert (rank, expected) in lines
        assert (rank, f"done rank={rank}") in lines
    assert result.scheduler is not None and result.scheduler.exit_code == 0
    assert (tmp_path / "logs" / "scheduler.log").exists()


def test_a_dying_rank_fails_fast_and_is_named(program: list[str], tmp_path: Path) -> None:
    with pytest.raises(LaunchError) as info:
        run_two(program, "fail", tmp_path / "logs")
    err = info.value
    log1 = (tmp_path / "logs" / "worker_1.log").resolve()
    assert err.rank == 1
    assert "rank 1 exited with code 3" in str(err)
    assert str(log1) in str(err)
    assert "rank 1 gives up" in str(err)  # the last lines of its log
    assert err.result is not None and not err.result.ok
    # Rank 0 would have slept 600 s: the launcher stopped it (SIGKILL) instead of waiting.
    assert err.result.exit_codes == {0: -9, 1: 3}
    assert err.result.ranks[0].killed_by_launcher
    assert not _running(err.result.log_dir)


# Loaded by every Python process of the launch (via PYTHONPATH): holds rank 0's wrapper back so that
# rank 1 fails before rank 0 has registered its pid.
SLOW_RANK_0_START = """
import os, time
worker_0 = os.environ.get("MS_ROLE") == "MS_WORKER" and os.environ.get("RANK_ID") == "0"
if worker_0 and "SLOWED" not in os.environ:
    os.environ["SLOWED"] = "1"
    time.sleep(3)
"""


def test_a_rank_still_starting_when_another_fails_is_stopped_too(program: list[str], tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_RANK_0_START)
    with pytest.raises(LaunchError) as info:
        run_two(program, "fail", tmp_path / "logs", env={"PYTHONPATH": str(site)})
    err = info.value
    assert err.rank == 1 and "rank 1 exited with code 3" in str(err)
    assert err.result.exit_codes == {0: -9, 1: 3}
    assert err.result.ranks[0].killed_by_launcher
    assert "hello rank=0" not in err.result.log_paths[0].read_text()  # its command never started
    assert not _running(err.result.log_dir)


def test_stopping_waits_for_an_unregistered_rank_but_not_the_scheduler(tmp_path: Path) -> None:
    """msrun creates a log right before it spawns: an unregistered rank with a log is still coming
    (it is set apart in its own session), the scheduler dies with msrun's process group."""
    from llama_core.launch import RankResult
    from llama_core.launch.status import SCHEDULER
    from llama_core.launch.watch import WatchedProcess

    rank = WatchedProcess("rank_0", RankResult(0, tmp_path / "worker_0.log"), tmp_path)
    sched = WatchedProcess(SCHEDULER, RankResult(-1, tmp_path / "scheduler.log"), tmp_path)
    assert not rank.lingering() and not sched.lingering()
    rank.result.log_path.touch()
    sched.result.log_path.touch()
    assert rank.lingering() and not sched.lingering()


# A stand-in rank wrapper: registers, runs a child for argv[2] s, records the child's code 0.5 s after.
SLOW_RECORDER = """
import json, os, subprocess, sys, time
from llama_core.launch.status import start_time
status_dir, child_s = sys.argv[1], sys.argv[2]
os.setsid()
child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({child_s}); raise SystemExit(3)"])
me = {"pid": os.getpid(), "pgid": os.getpgid(0), "start_time": start_time(os.getpid())}
with open(os.path.join(status_dir, "rank_0.pid.json"), "w") as fh:
    json.dump(me, fh)
code = child.wait()
time.sleep(0.5)
with open(os.path.join(status_dir, "rank_0.exit.json"), "w") as fh:
    json.dump({"exit_code": code}, fh)
"""


@pytest.mark.parametrize(("child_s", "ended"), [(0.2, True), (30, False)], ids=["ended", "running"])
def test_a_stop_keeps_the_own_exit_of_a_rank_whose_command_just_ended(
    tmp_path: Path, child_s: float, ended: bool
) -> None:
    """A rank that ended on its own (crashed, killed from outside) is reported failed with its code,
    not "stopped by the launcher", when the stop reaches it before its wrapper recorded the code."""
    import psutil

    from llama_core.launch import RankResult
    from llama_core.launch.watch import WatchedProcess

    proc = subprocess.Popen([sys.executable, "-c", SLOW_RECORDER, str(tmp_path), str(child_s)])
    rank = WatchedProcess("rank_0", RankResult(0, tmp_path / "worker_0.log"), tmp_path)
    assert wait_until(lambda: rank.poll() or rank.pid is not None, 10)
    if ended:  # the command is gone, its code not yet recorded
        assert wait_until(lambda: not psutil.Process(proc.pid).children(), 10)
        assert not rank.poll()
    rank.kill()
    proc.wait(10)
    assert rank.result.killed_by_launcher is not ended
    assert rank.result.exit_code == (3 if ended else -9)


def test_a_process_is_still_recognised_after_the_wall_clock_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher and the wrappers tell a live process from a later one with the same pid by its start
    time. psutil's create_time is the boot time (from the wall clock) plus the start: once a clock step
    or slew moves the boot time past a whole second, every process recorded before would look gone
    (CI saw a healthy rank 0 reported "vanished" and the job stopped)."""
    import psutil

    from llama_core.launch.status import is_running, start_time

    # a command name with the separators of /proc/<pid>/stat in it
    name = "open('/proc/self/comm', 'w').write('r) (1 2'); print(flush=True); import time; time.sleep(60)"
    sleeper = subprocess.Popen([sys.executable, "-c", name], stdout=subprocess.PIPE)
    try:
        sleeper.stdout.readline()
        assert psutil.Process(sleeper.pid).name() == "r) (1 2"
        started = start_time(sleeper.pid)
        before = psutil.Process(sleeper.pid).create_time()
        assert started == pytest.approx(before - psutil.boot_time(), abs=0.02)
        boot = psutil.boot_time()
        monkeypatch.setattr(psutil._psplatform, "boot_time", lambda: boot + 1.0)
        assert psutil.Process(sleeper.pid).create_time() == before + 1.0  # the clock did move for psutil
        assert is_running(sleeper.pid, started)
        assert not is_running(sleeper.pid, started + 0.01)  # another process given the same pid
    finally:
        sleeper.kill()
        sleeper.wait(10)
    assert not is_running(sleeper.pid, started)


def test_a_rank_that_vanishes_while_the_job_is_stopped_was_stopped_by_it(tmp_path: Path) -> None:
    """Once the launcher stops the job, msrun may SIGKILL a rank's wrapper (when the launcher killed
    another rank first) before the launcher reaches it: that rank went down with the stop, it did not
    fail."""
    from llama_core.launch import RankResult
    from llama_core.launch.status import start_time
    from llama_core.launch.watch import WatchedProcess

    def vanished(stopping: bool) -> RankResult:
        wrapper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        rank = WatchedProcess("rank_1", RankResult(1, tmp_path / "worker_1.log"), tmp_path)
        (tmp_path / "rank_1.pid.json").write_text(json.dumps({
            "pid": wrapper.pid, "pgid": os.getpgid(wrapper.pid),
            "start_time": start_time(wrapper.pid),
        }))  # fmt: skip
        assert not rank.poll()
        rank.stopping = stopping
        wrapper.kill()  # as msrun does, without a status
        wrapper.wait(10)
        rank.kill()
        assert rank.done
        return rank.result

    assert vanished(stopping=True) == RankResult(1, tmp_path / "worker_1.log", None, True)
    assert vanished(stopping=False) == RankResult(1, tmp_path / "worker_1.log", None, False)


def test_a_rank_killed_without_status_is_reported(program: list[str], tmp_path: Path) -> None:
    with pytest.raises(LaunchError) as info:
        run_two(program, "vanish", tmp_path / "logs")
    assert info.value.rank == 1
    assert "rank 1 vanished without an exit status" in str(info.value)
    assert info.value.result.exit_codes == {0: -9, 1: None}


def _running(log_dir: Path) -> list[int]:
    """Pids from the status files that are still alive (should be none after a launch)."""
    alive = []
    for pid_file in (log_dir / ".rank_status").glob("*.pid.json"):
        pid = json.loads(pid_file.read_text())["pid"]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{pid}/stat") as fh:  # a zombie awaiting its reaper is not running
            if fh.read().split(") ")[1].startswith("Z"):
                continue
        alive.append(pid)
    return alive


def test_port_in_use_is_refused_naming_the_owner(program: list[str], tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(LaunchError, match=rf"master_port {port} on 127.0.0.1 is already in use") as info:
            launch(
                ["ok"], worker_num=2, local_worker_num=2, master_port=port, log_dir=tmp_path, command=program
            )
    assert f"pid {os.getpid()}" in str(info.value)
    assert not (tmp_path / "worker_0.log").exists()


def test_stale_process_of_an_earlier_job_is_refused(program: list[str], tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MS_SCHED_PORT": str(port), "MS_ROLE": "MS_WORKER"}
    stale = sleeper_with_env(env, 120)
    try:
        with pytest.raises(LaunchError, match="maybe the last training process is running") as info:
            launch(
                ["ok"], worker_num=2, local_worker_num=2, master_port=port, log_dir=tmp_path, command=program
            )
        assert f"pid {stale.pid}" in str(info.value)
    finally:
        stale.kill()
        stale.wait()


def test_unwritable_log_dir_is_refused(program: list[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LaunchError, match="is not writable"):
        launch(["ok"], worker_num=2, local_worker_num=2, master_port=free_port(), log_dir=blocker / "logs")


def test_rank_wrapper_records_the_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK_ID", "5")
    monkeypatch.delenv("MS_ROLE", raising=False)
    from llama_core.launch import wrapper

    code = wrapper.main([str(tmp_path), "--", sys.executable, "-c", "raise SystemExit(7)"])
    assert code == 7
    assert json.loads((tmp_path / "rank_5.exit.json").read_text()) == {"exit_code": 7}
    assert json.loads((tmp_path / "rank_5.pid.json").read_text())["pid"] == os.getpid()


def test_cli_help_shows_msrun_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llama_core.launch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--master_port" in out and "-- <llama_core.run args>" in out


def test_an_interrupted_launch_leaves_no_rank_running(program: list[str], tmp_path: Path) -> None:
    """An exception in the caller (here from on_line; in Airflow a task kill) stops every process."""

    def interrupt(rank: int, line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_two(program, "hang", tmp_path / "logs", on_line=interrupt)
    pid_files = list((tmp_path / "logs" / ".rank_status").glob("rank_*.pid.json"))
    assert pid_files  # the ranks did start
    assert not _running(tmp_path / "logs")


def test_stop_from_another_thread_ends_every_process(program: list[str], tmp_path: Path) -> None:
    import threading

    job = MsrunJob(
        ["hang"],
        worker_num=2,
        local_worker_num=2,
        master_port=None,
        log_dir=tmp_path / "logs",
        command=program,
    )
    job.start()
    status = tmp_path / "logs" / ".rank_status"
    stopper = threading.Thread(
        target=lambda: (
            wait_until(lambda: len(list(status.glob("rank_*.pid.json"))) == 2, 60)
            and job.stop("the test stopped it")
        )
    )
    stopper.start()
    with pytest.raises(LaunchStopped, match="the test stopped it") as info:
        job.wait()
    stopper.join()
    result = info.value.result
    assert result.stop_reason == "the test stopped it" and info.value.rank is None
    assert result.exit_codes == {0: -9, 1: -9}
    assert all(r.killed_by_launcher for r in result.ranks)
    assert result.master_port > 0  # None picked a free port
    assert job_processes(os.getpid()) == []
    job.stop("again")  # idempotent: the first reason stays
    assert job.result.stop_reason == "the test stopped it"


def test_ranks_do_not_outlive_a_killed_launcher(program: list[str], tmp_path: Path) -> None:
    """SIGKILL of the launching process (an Airflow task process that is killed) leaves no rank."""
    import signal

    log_dir = tmp_path / "logs"
    launcher = (
        "import sys; from llama_core.launch import launch; "
        "launch(['hang'], worker_num=2, local_worker_num=2, master_port=None, log_dir=sys.argv[1], "
        "command=sys.argv[2:])"
    )
    cli = subprocess.Popen([sys.executable, "-c", launcher, str(log_dir), *program])
    try:
        started = log_dir / ".rank_status"
        assert wait_until(lambda: len(list(started.glob("rank_*.pid.json"))) == 2, 60), "ranks never started"
        assert len(job_processes(cli.pid)) >= 5  # msrun, 2 wrappers, 2 ranks (+ scheduler)
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        assert wait_until(lambda: job_processes(cli.pid) == [], 10), job_processes(cli.pid)
        for rank in (0, 1):  # the rank's own log says what stopped it
            assert f"launcher pid {cli.pid} is gone" in (log_dir / f"worker_{rank}.log").read_text()
    finally:
        cli.kill()


def test_a_retry_waits_for_the_orphans_of_a_stopped_job(program: list[str], tmp_path: Path) -> None:
    """Leftovers whose launcher is gone are stopping themselves: preflight waits instead of refusing."""
    port = free_port()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    env = {
        **os.environ,
        "MS_SCHED_PORT": str(port),
        "MS_ROLE": "MS_WORKER",
        "LLAMA_LAUNCHER_PID": str(gone.pid),
        "LLAMA_LAUNCHER_START": "0.0",
    }
    orphan = sleeper_with_env(env, 2)
    try:
        result = launch(
            ["ok"], worker_num=2, local_worker_num=2, master_port=port, log_dir=tmp_path, command=program
        )
        assert result.ok and orphan.poll() is not None
    finally:
        orphan.kill()
        orphan.wait()


def test_a_leftover_in_the_same_log_dir_is_refused_whatever_its_port(
    program: list[str], tmp_path: Path
) -> None:
    log_dir = (tmp_path / "logs").resolve()
    env = {**os.environ, "MS_SCHED_PORT": "1", "MS_ROLE": "MS_WORKER", "LLAMA_LAUNCH_LOG_DIR": str(log_dir)}
    stale = sleeper_with_env(env, 120)
    try:
        with pytest.raises(LaunchError, match=rf"in {log_dir} are still running") as info:
            launch(
                ["ok"], worker_num=2, local_worker_num=2, master_port=None, log_dir=log_dir, command=program
            )
        assert f"pid {stale.pid}" in str(info.value)
    finally:
        stale.kill()
        stale.wait()


def test_a_second_job_in_the_same_run_folder_is_refused_naming_the_first(
    program: list[str], tmp_path: Path
) -> None:
    """The run-folder lock: a task delivered twice (even from another host sharing the disk, which the
    process table cannot see) never trains beside the first; once the first is gone, a new job runs."""
    from llama_core.launch.lock import RunFolderLock

    log_dir = (tmp_path / "logs").resolve()
    first = MsrunJob(
        ["hang"], worker_num=2, local_worker_num=2, master_port=None, log_dir=log_dir, command=program
    )
    first.start()
    try:
        started = log_dir / ".rank_status"
        assert wait_until(lambda: len(list(started.glob("rank_*.pid.json"))) == 2, 60), "ranks never started"
        second = RunFolderLock(log_dir, wait_s=1.0)  # what a second launcher takes first, from any host
        with pytest.raises(LaunchError, match=rf"another msrun job is training in {log_dir}") as info:
            second.acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(info.value)
        with open(log_dir / ".ranks.lock") as ranks, pytest.raises(BlockingIOError):  # each rank holds it
            fcntl.flock(ranks, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        first.stop("the test stopped it")
    assert first.result is None or not first.result.ok
    result = launch(
        ["ok"], worker_num=2, local_worker_num=2, master_port=None, log_dir=log_dir, command=program
    )
    assert result.ok


def test_ranks_of_a_dead_launcher_hold_the_folder_until_they_exit(tmp_path: Path) -> None:
    """A rank that outlived its launcher (stuck in a save) still holds the ranks lock: a new job
    waits for it, and refuses naming the lock when it never exits."""
    from llama_core.launch.lock import RANKS_LOCK, RunFolderLock

    (tmp_path / RANKS_LOCK).touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_SH); "
         "print('held', flush=True); time.sleep(float(sys.argv[2]))", str(tmp_path / RANKS_LOCK), "1.5"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    lock = RunFolderLock(tmp_path, wait_s=10)
    lock.acquire()  # waits the 1.5 s the rank takes to exit
    assert holder.poll() is not None
    lock.release()

    stuck = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_SH); "
         "print('held', flush=True); time.sleep(60)", str(tmp_path / RANKS_LOCK)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert stuck.stdout is not None and stuck.stdout.readline().strip() == "held"
        with pytest.raises(LaunchError, match="ranks of an earlier msrun job still run"):
            RunFolderLock(tmp_path, wait_s=0.5).acquire()
        # the refusal released the job lock: nothing is left held by the refused launcher
        with open(tmp_path / ".job.lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        stuck.kill()
        stuck.wait()


def test_a_ranks_error_line_leads_the_log_tail_when_teardown_pushed_it_out(tmp_path: Path) -> None:
    log = tmp_path / "worker_0.log"
    error = "error: finetune: no space left on /w/ckpt (needs about 1.0 MiB, 0 B free)"
    log.write_text("\n".join(["step 1", error, *(f"teardown {i}" for i in range(30))]) + "\n")
    tail = last_lines(log).splitlines()
    assert tail[:2] == [error, "..."] and tail[-1] == "teardown 29" and len(tail) == 22
    log.write_text(f"step 1\n{error}\n")
    assert last_lines(log) == f"step 1\n{error}"  # in the tail already: once
