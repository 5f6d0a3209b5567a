"""The msrun fine-tune as Airflow tasks: one task per node (mapped over the node rank), each running
that node's ranks with msrun; each rank's log in its node task's log."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Context

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
    in `output_dir` instead of starting over. Returns the trainer's summary as the task's XCom.

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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config, self.train_dataset_dir, self.output_dir = config, train_dataset_dir, output_dir
        self.load_checkpoint, self.overrides, self.run_mode = load_checkpoint, overrides, run_mode
        self.seq_length, self.eval_dataset_dir = seq_length, eval_dataset_dir
        self.device_target, self.master_port = device_target, master_port
        self.length_buckets = length_buckets  # None: the config's runner_config.length_buckets
        self.nodes, self.node_rank, self.node_start_timeout = nodes, node_rank, node_start_timeout
        self.rank_chatter_level = rank_chatter_level
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
        from llama_core.launch import LaunchError, LaunchStopped, MsrunJob
        from llama_core.train.outputs import SUMMARY_NAME, has_checkpoint

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
        self._job = MsrunJob(
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
        watch = None
        try:
            self._job.start()
            if member is not None:
                from llama_core.launch.cluster import ClusterWatch

                watch = ClusterWatch(member, self._job.stop)
                watch.start()
            result = self._job.wait()
        except LaunchError as exc:
            peer = watch.reason if watch is not None else None
            if member is not None and peer is None:
                member.fail(f"node {node}: {str(exc).splitlines()[0]}")
            if exc.result is not None:
                cause = "the task was stopped" if isinstance(exc, LaunchStopped) else "another rank failed"
                log_rank_summary(exc.result.ranks, stop_cause=peer or cause)
            if exc.rank is not None and exc.rank >= 0:
                self.log.error("rank %d failed: filter the log by source msrun.rank_%d", exc.rank, exc.rank)
            raise
        except BaseException as exc:  # execution_timeout and the like: the job stopped itself; show the ranks
            if member is not None:
                member.fail(f"node {node}: {type(exc).__name__}: {exc}")
            if self._job.result is not None:
                log_rank_summary(self._job.result.ranks, stop_cause="the task was stopped")
            raise
        finally:
            if watch is not None:
                watch.close()
        if member is not None:
            member.finish()
        log_rank_summary(result.ranks)
        out = {"output_dir": str(output_dir), "node_rank": node, "duration_s": result.duration_s}
        summary_path = output_dir / SUMMARY_NAME
        if any(r.rank == 0 for r in result.ranks):  # rank 0 writes the summary: it is on this node
            summary = json.loads(summary_path.read_text())
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
