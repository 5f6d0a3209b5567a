"""Launch `llama_core.run` on every local device with MindSpore's `msrun`, and watch the ranks.

`python -m llama_core.launch [msrun flags] -- <llama_core.run args>` runs the real `msrun` with the
reference launcher's defaults (8 workers, master 127.0.0.1:8118, node_rank 0, logs in
`output/msrun_log`, cluster time-out 7200 s). msrun writes `LOG_DIR/worker_<rank>.log` per rank and
`LOG_DIR/scheduler.log`.

What this adds to msrun, module by module:

- `wrapper`: msrun starts each process under a thin wrapper that records its pid and its command's
  exit status in `LOG_DIR/.rank_status/` (`status`), so every rank's outcome is known even when msrun
  exited or a process vanished (SIGKILL, OOM killer); the wrapper also stops its rank when the
  launcher is gone, so no rank outlives a killed launcher.
- `preflight`: log_dir writable, master port free, and no process left over from an earlier job on
  the same port or log folder (the reference's "Maybe the last training process is running"),
  naming its pids; orphans of a job that is stopping are waited for.
- `lock`: the run-folder lock on the shared disk, so no two jobs train in one run folder even from
  different hosts (a task delivered twice, a clear while the last try's ranks still run).
- `job`: `MsrunJob` with start / wait / stop. A rank (or the scheduler) that exits non-zero or
  vanishes fails the job within a poll interval: the others are killed (whole process groups) instead
  of waiting for `cluster_time_out`, and `LaunchError` names the rank, its exit code, its log and the
  log's last lines. `stop()` (an Airflow `on_kill`) ends everything and `wait()` raises
  `LaunchStopped`. `on_line(rank, line)` streams every rank's log lines live (`watch`).
"""

from llama_core.launch.job import DEFAULT_COMMAND, MsrunJob, launch
from llama_core.launch.preflight import preflight, stale_processes
from llama_core.launch.results import LaunchError, LaunchResult, LaunchStopped, RankResult

__all__ = [
    "DEFAULT_COMMAND",
    "LaunchError",
    "LaunchResult",
    "LaunchStopped",
    "MsrunJob",
    "RankResult",
    "launch",
    "preflight",
    "stale_processes",
]
