"""The msrun fine-tune as Airflow tasks: one task per node (mapped over the node rank), each running
that node's ranks with msrun; each rank's log in its node task's log."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Context

from operators.progress import Fanout, ProgressWatch, XComPublisher
from operators.rank_logs import RankLogRelay, log_rank_summary
from operators.stages import StageOperator, resolved_config

if TYPE_CHECKING:
    from llama_core.launch import MsrunJob
    from llama_core.launch.cluster import Member


def api_server_host() -> str | None:
    """The host of the Airflow API server the task reports to: every node reaches it, so the route
    to it leaves from the address other nodes can reach this one at."""
    from urllib.parse import urlparse

    from airflow.configuration import conf

    return urlparse(conf.get("core", "execution_api_server_url", fallback="") or "").hostname


def override_args(overrides: Mapping[str, Any] | None) -> list[str]:
    """`{"runner_config.epochs": 1}` -> `["--runner_config.epochs", "1"]` (values as YAML scalars)."""
    args: list[str] = []
    for key, value in (overrides or {}).items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


class MsrunFinetuneOperator(StageOperator):
    """Launch `python -m llama_core.run` with msrun on as many ranks as the config's layout has.

    Every rank's lines stream live into the task log under the source `msrun.rank_<i>` (filter by
    it in the UI), with their levels and a `[rank i]` prefix. When the launch ends, one collapsible
    group per rank follows under the same source, failed ranks first; a failed rank fails the task
    at once with its rank, exit code and log path. The operator holds the job as BashOperator holds
    its SubprocessHook: stopping the task (marked failed, `execution_timeout`, a worker shutting
    down) stops msrun and every rank through `on_kill`, and ranks stop themselves if this task
    process is killed outright. A retry of the same run resumes from the newest complete checkpoint
    in `output_dir` instead of starting over. Every `progress_interval_s` seconds a `progress:` line
    (step/total, loss, learning rate, real tokens/s, elapsed, ETA) from rank 0's `progress.json`.
    Returns the trainer's summary as the task's XCom. With `tracking` (the pipeline's section), node 0
    sends the run's params, its metrics as they come and, at the end, the trainer's whole series to
    MLflow from a thread of its own (`operators.tracking`): a server that is down warns once.

    With `nodes` > 1 the DAG maps this task over `node_rank`: every node task runs msrun with the
    total rank count, its share of local ranks and its node rank. Node 0 publishes msrun's master
    address (`LLAMA_LORA_NODE_ADDR`, else its address on the route to the Airflow API server) and a
    free port in `output_dir/cluster/` (shared storage, as multi-node checkpoints need); the other
    nodes read it there (`llama_core.launch.cluster`). A node that fails or is stopped makes every
    other node stop within seconds; nodes that do not all start within `node_start_timeout` seconds
    fail saying which are missing. Each node's msrun logs go to `output_dir/msrun_log/node_<k>/`.
    """

    template_fields: Sequence[str] = (
        "config",
        "overrides",
        "train_dataset_dir",
        "eval_dataset_dir",
        "load_checkpoint",
        "output_dir",
        "seq_length",
        "device_target",
        "master_port",
        "length_buckets",
        "nodes",
        "node_rank",
        "node_start_timeout",
    )
    ui_color = "#f6c7b6"

    def __init__(
        self,
        *,
        config: str,
        train_dataset_dir: str,
        output_dir: str,
        load_checkpoint: str | None = None,
        eval_dataset_dir: str | None = None,
        seq_length: int | str | None = None,
        overrides: Mapping[str, Any] | str | None = None,
        device_target: str = "Ascend",
        master_port: int | str | None = None,
        length_buckets: bool | str | None = None,
        nodes: int | str = 1,
        node_rank: int | str = 0,
        node_start_timeout: float | str = 600,
        run_mode: str = "finetune",
        rank_chatter_level: int = logging.DEBUG,
        progress_interval_s: float = 60,
        tracking: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config, self.train_dataset_dir, self.output_dir = config, train_dataset_dir, output_dir
        self.load_checkpoint, self.overrides, self.run_mode = load_checkpoint, overrides, run_mode
        self.seq_length, self.eval_dataset_dir = seq_length, eval_dataset_dir
        self.device_target, self.master_port = device_target, master_port
        self.length_buckets = length_buckets  # None: the config's runner_config.length_buckets
        self.nodes, self.node_rank, self.node_start_timeout = nodes, node_rank, node_start_timeout
        self.rank_chatter_level, self.progress_interval_s = rank_chatter_level, progress_interval_s
        self.tracking = tracking
        self._job: MsrunJob | None = None

    def world_size(self) -> int:
        """Ranks to launch: the config's data_parallel x model_parallel x pipeline_stage."""
        from llama_core.config import layout_from_config

        return layout_from_config(resolved_config(self.config, self.overrides)).world_size

    def run_args(self, world_size: int, resume: bool) -> list[str]:
        """The `llama_core.run` command line for this task."""
        from llama_core.validate import overrides_dict

        args = [
            "--config", self.config,
            "--run_mode", self.run_mode,
            "--train_dataset_dir", self.train_dataset_dir,
            "--output_dir", self.output_dir,
            "--device_target", self.device_target,
            "--use_parallel", str(world_size > 1),
        ]  # fmt: skip
        if self.load_checkpoint:
            args += ["--load_checkpoint", self.load_checkpoint]
        if resume:
            args += ["--resume_training", "True"]
        if self.eval_dataset_dir:  # held-out data: eval loss every eval_step_interval steps and at the end
            args += ["--eval_dataset_dir", self.eval_dataset_dir, "--do_eval", "True"]
        if self.seq_length:  # the model trains on the records' length: one setting, not two
            args += ["--model.model_config.seq_length", str(int(self.seq_length))]
        if self.length_buckets not in (None, ""):
            args += ["--runner_config.length_buckets", str(self.length_buckets)]
        return args + override_args(overrides_dict(self.overrides))

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.errors import ConfigError
        from llama_core.train.outputs import has_checkpoint

        output_dir = Path(self.output_dir)
        nodes, node = int(self.nodes), int(self.node_rank)
        resume = has_checkpoint(output_dir)
        if resume:
            self.log.info("checkpoints from an earlier try found in %s: resuming", output_dir)
        workers = self.world_size()
        if workers % nodes:
            raise ConfigError(f"{nodes} nodes cannot share {workers} ranks evenly")
        port = None if self.master_port in (None, "") else int(self.master_port)
        member, addr = None, "127.0.0.1"
        if nodes > 1:
            member, addr, port = self.rendezvous(output_dir, nodes, node, port)
        self._job = self.msrun_job(output_dir, workers, resume, nodes, node, addr, port)
        tracking = self.start_tracking(context) if node == 0 else None
        try:
            result = self.run_job(self._job, context, member, tracking)
            if member is not None:
                member.finish()
            return self.outputs(output_dir, node, result, tracking)
        finally:
            if tracking is not None:
                tracking.close()

    def start_tracking(self, context: Context) -> XComPublisher | None:
        """MLflow tracking of the run (None: the pipeline has none): a thread taking what it is offered."""
        if not self.tracking:
            return None
        from operators.stages import run_config
        from operators.tracking import run_params, start_finetune_tracking

        ti = context.get("ti")
        data = ti.xcom_pull(task_ids="tokenize_to_mindrecord") if ti is not None else None
        params = run_params(run_config(self.config, self.overrides, self.seq_length), data)
        return start_finetune_tracking(self.tracking, context, self.log, params)

    def msrun_job(
        self, output_dir: Path, workers: int, resume: bool, nodes: int, node: int, addr: str, port: int | None
    ) -> MsrunJob:
        """This node's msrun job: its share of the ranks, their lines relayed into the task log."""
        from llama_core.launch import MsrunJob

        return MsrunJob(
            self.run_args(workers, resume),
            worker_num=workers,
            local_worker_num=workers // nodes,
            master_addr=addr,
            master_port=port,  # None: a free port for this run, so runs on one node never share one
            node_rank=node,
            log_dir=output_dir / "msrun_log" / (f"node_{node}" if nodes > 1 else ""),
            join=True,
            on_line=RankLogRelay(chatter_level=self.rank_chatter_level),
        )

    def run_job(
        self, job: MsrunJob, context: Context, member: Member | None, tracking: XComPublisher | None = None
    ) -> Any:
        """Run `job` to its end while publishing progress (node 0; also to `tracking`) and, at the end,
        every rank's state as XComs; a failure or a stop here fails the other nodes (`member`) at once."""
        from llama_core.launch import LaunchError, LaunchStopped

        ti = context.get("ti")  # None when called outside a task run (tests): nothing to publish to

        def push(key: str, value: Any) -> None:
            if ti is not None:
                ti.xcom_push(key=key, value=value)

        node = job.node_rank
        publisher = XComPublisher(push, self.log)
        publisher.start()
        # one node publishes the run's progress (rank 0's, on shared storage); each its ranks' ends
        watchers = Fanout(publisher, tracking)
        progress = ProgressWatch(
            Path(self.output_dir), self.progress_interval_s, self.log, watchers if node == 0 else None
        )
        job.on_tick = progress

        def ranks_ended(ranks: list[Any], cause: str = "another rank failed") -> None:
            publisher.offer("ranks", log_rank_summary(ranks, stop_cause=cause))

        watch = None
        try:
            job.start()
            if member is not None:
                from llama_core.launch.cluster import ClusterWatch

                watch = ClusterWatch(member, job.stop)
                watch.start()
            result = job.wait()
            ranks_ended(result.ranks)
            return result
        except LaunchError as exc:
            peer = watch.reason if watch is not None else None
            if member is not None and peer is None:
                member.fail(f"node {node}: {str(exc).splitlines()[0]}")
            if exc.result is not None:
                cause = "the task was stopped" if isinstance(exc, LaunchStopped) else "another rank failed"
                ranks_ended(exc.result.ranks, peer or cause)
            if exc.rank is not None and exc.rank >= 0:
                self.log.error("rank %d failed: filter the log by source msrun.rank_%d", exc.rank, exc.rank)
            raise
        except BaseException as exc:  # execution_timeout and the like: the job stopped itself; show the ranks
            if member is not None:
                member.fail(f"node {node}: {type(exc).__name__}: {exc}")
            if job.result is not None:
                ranks_ended(job.result.ranks, "the task was stopped")
            raise
        finally:
            if watch is not None:
                watch.close()
            final = progress.final() if node == 0 else None
            if final is not None:  # the view shows where the job ended, success or not
                watchers.offer("progress", final)
            publisher.close()

    def outputs(
        self, output_dir: Path, node: int, result: Any, tracking: XComPublisher | None = None
    ) -> dict[str, Any]:
        """The task's XCom: where the run is, and on the node with rank 0 the trainer's summary and the
        whole final checkpoint; the summary also goes to `tracking` (its series, in full)."""
        from llama_core.train.outputs import SUMMARY_NAME

        out = {"output_dir": str(output_dir), "node_rank": node, "duration_s": result.duration_s}
        if any(r.rank == 0 for r in result.ranks):  # rank 0 writes the summary: it is on this node
            summary = json.loads((output_dir / SUMMARY_NAME).read_text())
            if tracking is not None:
                tracking.offer("summary", dict(summary))
            summary.pop("loss_series", None)  # thousands of points: it stays in the summary file
            out.update(summary)
            # tensor parallel: the whole final checkpoint, written once here (its first group's
            # ranks are on this node) rather than by the evaluate and export tasks at the same time
            from llama_core.checkpoint.unshard import complete_checkpoint

            out["final_checkpoint"] = str(complete_checkpoint(output_dir, "run folder"))
        return out

    def rendezvous(
        self, output_dir: Path, nodes: int, node: int, port: int | None
    ) -> tuple[Member, str, int]:
        """Node 0 publishes msrun's master address and port in the run folder, the others wait for it
        (`node_start_timeout`); returns this node's cluster membership, the address and the port."""
        from llama_core.launch.cluster import Member, node_address
        from llama_core.launch.preflight import free_port

        member = Member(output_dir / "cluster", nodes, node, start_timeout=float(self.node_start_timeout))
        if node == 0:
            addr = node_address(probe=api_server_host())
            session = member.open(addr, port or free_port(addr))
        else:
            session = member.join()
        self.log.info(
            "node %d of %d: msrun master %s:%d (session %s)",
            node, nodes, session.master_addr, session.master_port, session.id,
        )  # fmt: skip
        return member, session.master_addr, session.master_port

    def on_kill(self) -> None:
        """Airflow stops the task (SIGTERM): stop msrun and every rank, and say so in the task log."""
        if self._job is not None:
            self._job.stop(
                "Airflow stopped the task (marked failed or success, execution_timeout, or the worker "
                "is shutting down)"
            )
