"""The training recipe: one run as named phases, in the order `TrainRecipe.run` calls them.

  check config  what would fail later fails before any work
  setup         MindSpore context; the msrun ranks as data_parallel x model_parallel groups; seed
  model         Llama (+ LoRA, base frozen), this rank's tensor-parallel slices, base weights
                from `load_checkpoint` (a sharded folder: each rank reads only its own file)
  data          this data-parallel group's share of every global batch (the ranks of one
                tensor-parallel group read the same rows), steps per epoch; packed rows carry
                their document ends to the model
  optimizer     lr schedule, AdamW, gradient reduction over data-parallel ranks, the step cell
  resume        the newest checkpoint every rank can read
  loop          epochs of steps: a log line per step, checkpoints and evals when due; each global
                batch trimmed to its length bucket (one compiled graph per bucket, counted)
  evaluate      eval loss and perplexity, periodically and at the end
  save          one checkpoint per rank (names and folders: `outputs`)
  summary       the TrainResult; rank 0 writes it to OUTPUT/train_summary.json

The components it shares with `predict` (context, model, base weights, evaluation) are in
`components`; the run's state lives in the recipe.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn

from llama_core.atomic import disk_full, write_json_atomic
from llama_core.config import TrainConfig
from llama_core.errors import ConfigError, InputError
from llama_core.progress import human_seconds
from llama_core.train import state as train_state
from llama_core.train.components import (
    Runtime,
    SumOverRanks,
    adamw,
    build_model,
    evaluate,
    gather_over_ranks,
    learning_rates,
    load_base,
    min_over_ranks,
    model_inputs,
    setup_context,
)
from llama_core.train.dataset import (
    DatasetInfo,
    ShardPlan,
    bucket_sizes,
    check_batch,
    choose_bucket,
    content_length,
    epoch_batches,
    inspect_dataset,
    supervised_tokens,
    trim_to_bucket,
)
from llama_core.train.live import ProgressWriter
from llama_core.train.outputs import (
    SUMMARY_NAME,
    TRAINED_LAYOUT_FORMAT,
    TRAINED_LAYOUT_NAME,
    checkpoint_path,
    rank_dir,
)
from llama_core.train.step import TrainStep

logger = logging.getLogger("llama_core.train")


@dataclass
class TrainResult:
    """What a training run did. `steps` counts optimizer steps since the start (resumes included)."""

    steps: int
    steps_this_run: int
    total_steps: int
    final_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    tokens_per_second_per_device: float | None
    world_size: int
    rank: int
    resumed_from: str | None
    last_checkpoint: str | None
    summary_path: str | None
    loss_series: list[dict[str, float]] = field(default_factory=list)
    eval_series: list[dict[str, float]] = field(default_factory=list)
    # runner_config.length_buckets: the sizes, micro-batches per size, the graphs compiled and the time
    # of each one's first call (compile + one step)
    length_buckets: dict[str, Any] = field(default_factory=dict)


class TrainRecipe:
    """One training run. The phases fill in the state below in `run`'s order; the loop updates
    the progress fields."""

    rt: Runtime
    model: nn.Cell
    data: DatasetInfo
    plan: ShardPlan
    steps_per_epoch: int
    total: int
    tokens_per_step: int
    lrs: np.ndarray
    trainable_names: set[str]
    step_cell: TrainStep
    start: train_state.Counters
    resumed_from: str | None

    def __init__(self, tc: TrainConfig) -> None:
        self.tc = tc
        self.global_step = 0
        self.series: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self.last_checkpoint: str | None = None
        self.eval_loss: float | None = None
        self.eval_data: DatasetInfo | None = None
        self.eval_ppl: float | None = None
        self.buckets: list[int] = []  # empty: length buckets off, every batch runs at seq_length
        self.bucket_counts: dict[int, int] = {}
        self.graphs: list[dict[str, Any]] = []  # one per (sequence length, apply_update) compiled
        self.lengths_cell: nn.Cell | None = None
        self.live: ProgressWriter | None = None  # rank 0's progress.json

    def run(self) -> TrainResult:
        """Run training (or fine-tuning) as configured and return what happened."""
        self.check_config()
        self.setup()
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        self.resume()
        self.loop()
        self.evaluate_at_end()
        if self.live is not None:
            self.live.set_state("done")
        return self.summary()

    # -- set-up
    def check_config(self) -> None:
        tc = self.tc
        if not tc.train_dataset_dir:
            raise ConfigError(
                "no training data: set train_dataset.data_loader.dataset_dir or --train_dataset_dir"
            )
        if tc.do_eval and not tc.eval_dataset_dir:
            raise ConfigError(
                "do_eval needs eval data: set eval_dataset.data_loader.dataset_dir or --eval_dataset_dir"
            )
        if tc.sink_mode:
            logger.info(
                "runner_config.sink_mode: steps are driven from Python (one step per call) on every device"
            )

    def setup(self) -> None:
        self.rt = setup_context(self.tc)
        ms.set_seed(self.tc.seed)

    def setup_model(self) -> None:
        self.model = build_model(self.tc, self.rt.tp)
        load_base(self.model, self.tc, self.rt.rank)
        self.model.set_train(True)
        if self.rt.tp.enabled and self.rt.rank == 0:
            self.write_parallel_layout()

    def write_parallel_layout(self) -> None:
        """OUTPUT/checkpoint/parallel.json: the layout and model the ranks' checkpoints are slices
        of, so unshard (and evaluate, export) can rebuild the whole tensors."""
        doc = {
            "format": TRAINED_LAYOUT_FORMAT,
            "layout": self.tc.layout.as_dict(),
            "model": self.model.config.dims.describe(),
        }
        write_json_atomic(rank_dir(self.tc.output_dir, 0).parent / TRAINED_LAYOUT_NAME, doc)

    def setup_data(self) -> None:
        tc, accum = self.tc, self.tc.gradient_accumulation_steps
        self.data = inspect_dataset(tc.train_dataset_dir)
        if self.data.packed:
            logger.info(
                "%s is packed: up to %d documents per row, each attending only to itself",
                tc.train_dataset_dir,
                self.data.max_documents,
            )
        plan = ShardPlan(
            num_records=self.data.num_records,
            batch_size=tc.batch_size,
            num_shards=self.rt.dp,
            shard_id=self.rt.dp_index,
            shuffle=tc.train_shuffle,
            seed=tc.seed,
        )
        self.steps_per_epoch = plan.batches_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise InputError(
                f"{tc.train_dataset_dir}: {plan.num_records} records do not fill one step of "
                f"{plan.global_batch} x {accum} (global batch x gradient accumulation)"
            )
        dropped = plan.num_records - self.steps_per_epoch * accum * plan.global_batch
        if dropped:
            logger.info(
                "drop_remainder: %d of %d records per epoch do not fill a step and are skipped",
                dropped,
                plan.num_records,
            )
        self.plan = plan
        self.total = tc.epochs * self.steps_per_epoch
        self.tokens_per_step = tc.batch_size * tc.seq_length * accum
        if self.rt.rank == 0:
            self.live = ProgressWriter(Path(tc.output_dir), self.total, tc.epochs)
        if tc.length_buckets:
            self.buckets = bucket_sizes(tc.seq_length, tc.length_bucket_sizes)
            if self.rt.world_size > 1:
                self.lengths_cell = SumOverRanks()
            logger.info(
                "length buckets %s: each global batch runs at the smallest that holds its longest record",
                self.buckets,
            )

    def setup_optimizer(self) -> None:
        tc, rt = self.tc, self.rt
        self.lrs = learning_rates(tc, self.total)
        trainable = list(self.model.trainable_params())
        if not trainable:
            raise ConfigError("the model has no trainable parameter")
        self.trainable_names = {p.name for p in trainable}
        optimizer = adamw(trainable, tc, self.lrs)
        reducer = None
        if rt.dp > 1:
            group = {} if rt.dp_group is None else {"group": rt.dp_group}
            reducer = nn.DistributedGradReducer(
                optimizer.parameters, mean=tc.gradients_mean, degree=rt.dp, **group
            )
        self.step_cell = TrainStep(
            self.model,
            optimizer,
            accumulation_steps=tc.gradient_accumulation_steps,
            loss_scale=tc.scale_sense,
            clip_norm=tc.max_grad_norm if tc.use_clip_grad else None,
            reducer=reducer,
            data_parallel=(rt.dp, rt.dp_group),
            tensor_parallel=(rt.tp, self.model.split_parameter_names()),
        )
        self.step_cell.set_train(True)

    # -- resume
    def resume(self) -> None:
        """Continue from the newest checkpoint every rank can read (with `resume_training`), or
        start at step 0."""
        start = train_state.Counters(epoch=1, step_in_epoch=0, global_step=0)
        self.resumed_from = None
        if self.tc.resume_training:
            found = self.resume_point()
            if found is None:
                logger.warning(
                    "resume_training: no complete checkpoint in %s; starting from step 0",
                    rank_dir(self.tc.output_dir, self.rt.rank),
                )
            else:
                path, params = found
                start = train_state.restore(self.step_cell, params)
                self.resumed_from = str(path)
                logger.info(
                    "resumed from %s: epoch %d, step %d/%d", path, start.epoch, start.global_step, self.total
                )
        if start.step_in_epoch >= self.steps_per_epoch:  # saved at the end of an epoch
            start = train_state.Counters(
                epoch=start.epoch + 1, step_in_epoch=0, global_step=start.global_step
            )
        self.start = start
        self.global_step = start.global_step
        if self.live is not None and self.resumed_from is not None:
            self.live.resume(start.global_step)  # the curve so far, from the earlier try's file

    def resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """This rank's checkpoint to resume from. Ranks must resume from the same step: the
        smallest over ranks of each one's newest readable step."""
        tc, rt = self.tc, self.rt
        found = train_state.load_newest(tc.output_dir, tc.ckpt_prefix, rt.rank)
        if rt.world_size == 1:
            return found
        mine = train_state.counters_of(found[1]).global_step if found else -1
        agreed = min_over_ranks(mine, rt)
        if agreed == mine:
            return found
        if agreed < 0:
            return None
        found = train_state.load_at_step(tc.output_dir, tc.ckpt_prefix, rt.rank, agreed)
        if found is None:
            raise InputError(
                f"rank {rt.rank}: no readable checkpoint at step {agreed}, which the other ranks resume from"
            )
        return found

    # -- the loop
    def loop(self) -> None:
        for epoch in range(self.start.epoch, self.tc.epochs + 1):
            in_epoch = self.train_epoch(epoch)
            # the last step is always saved, unless its periodic save just did
            if self.global_step == self.total and not self.saved_at(epoch, in_epoch):
                self.save(epoch, in_epoch)

    def train_epoch(self, epoch: int) -> int:
        """The epoch's steps not done yet (a resumed run skips the consumed batches); returns the
        steps done in it."""
        tc, accum = self.tc, self.tc.gradient_accumulation_steps
        skip = self.start.step_in_epoch if epoch == self.start.epoch else 0
        in_epoch = skip
        micro_losses: list[float] = []
        micro_seqs: list[int] = []
        real_tokens = 0  # this rank's non-pad input tokens in the step
        t0 = time.perf_counter()
        for micro, batch in enumerate(epoch_batches(self.data, self.plan, epoch - 1, skip * accum)):
            if in_epoch >= self.steps_per_epoch:
                break
            ids, labels = batch[0], batch[1]
            self.check_micro_batch(
                ids, labels, f"{tc.train_dataset_dir} (epoch {epoch}, batch {skip * accum + micro})"
            )
            apply = (micro + 1) % accum == 0
            real_tokens += int(np.count_nonzero(ids[:, :-1] != self.pad_id))
            ids, labels = self.to_bucket(ids, labels)
            ids_t, labels_t, doc_ends = model_inputs((ids, labels, *batch[2:]))
            t_call = time.perf_counter()
            loss_t, norm_t = self.step_cell(ids_t, labels_t, apply, doc_ends)
            micro_losses.append(float(loss_t.asnumpy()))
            micro_seqs.append(ids.shape[1] - 1)
            self.count_graph(ids.shape[1] - 1, apply, time.perf_counter() - t_call)
            if not apply:
                continue
            in_epoch += 1
            loss, norm = float(np.mean(micro_losses)), float(norm_t.asnumpy())
            seqs, micro_losses, micro_seqs = micro_seqs, [], []
            now = time.perf_counter()
            dt, t0 = now - t0, now  # saves and evals below stay out of the next step's time
            self.end_step(epoch, in_epoch, loss, norm, dt, seqs, real_tokens)
            real_tokens = 0
        return in_epoch

    @property
    def pad_id(self) -> int:
        return int(self.tc.model_config.get("pad_token_id", 0))

    def check_micro_batch(self, ids: np.ndarray, labels: np.ndarray, where: str) -> None:
        check_batch(ids, labels, self.tc.seq_length, where)
        ignore_id = int(self.tc.model_config.get("ignore_token_id", -100))
        if supervised_tokens(ids, labels, self.pad_id, ignore_id) == 0:
            # its loss is 0 and its gradient nothing: say so rather than log a perfect loss
            logger.warning(
                "%s: no supervised token in this batch (every label masked): it teaches nothing; "
                "were the answers truncated away? see the preprocess report",
                where,
            )

    def to_bucket(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows trimmed to the global batch's bucket: the smallest that holds the longest
        record of every rank's rows, so all ranks run one shape. A pure function of the global
        batch's content: a resumed run trims exactly as the first did."""
        if not self.buckets:
            return ids, labels
        length = content_length(ids, self.pad_id)
        if self.lengths_cell is None:
            lengths = [length]
        else:
            lengths = gather_over_ranks(length, self.rt, self.lengths_cell)
        bucket = choose_bucket(lengths, self.buckets)
        self.bucket_counts[bucket] = self.bucket_counts.get(bucket, 0) + 1
        return trim_to_bucket(ids, labels, bucket)

    def count_graph(self, seq: int, apply: bool, seconds: float) -> None:
        """Note the first call of each step shape: graph mode compiles one graph for it."""
        if any(g["seq"] == seq and g["apply_update"] == apply for g in self.graphs):
            return
        self.graphs.append({"seq": seq, "apply_update": apply, "first_call_seconds": seconds})
        logger.info(
            "graph %d: seq %d (apply_update=%s) compiled, first call %.2fs (compile + one step)",
            len(self.graphs),
            seq,
            apply,
            seconds,
        )

    def end_step(
        self,
        epoch: int,
        in_epoch: int,
        loss: float,
        norm: float,
        dt: float,
        seqs: list[int],
        real_tokens: int,
    ) -> None:
        """Count an optimizer step and log it (`seq`: its micro-batches' sequence lengths, the
        length buckets; `real_tokens`: this rank's non-pad input tokens); save and evaluate when due."""
        tc = self.tc
        lr = float(self.lrs[self.global_step])
        self.global_step += 1
        self.step_times.append(dt)
        if not math.isfinite(loss):
            logger.warning("step %d: loss is %s", self.global_step, loss)
        self.series.append(
            {"step": self.global_step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm}
        )
        eta_s = (self.typical_step_time() or dt) * (self.total - self.global_step)
        logger.info(
            "epoch=%d/%d step=%d/%d loss=%.6f lr=%.6e step_time=%.3fs tokens_per_s_device=%.1f "
            "grad_norm=%.6f seq=%s eta=%s",
            epoch,
            tc.epochs,
            self.global_step,
            self.total,
            loss,
            lr,
            dt,
            self.tokens_per_step / dt,
            norm,
            ",".join(map(str, seqs)),
            human_seconds(eta_s),
        )
        if self.live is not None:
            self.live.step(self.global_step, epoch, loss, lr, real_tokens / dt, eta_s)
        if self.global_step % tc.save_checkpoint_steps == 0:
            self.save(epoch, in_epoch)
        if tc.do_eval and tc.eval_step_interval > 0 and self.global_step % tc.eval_step_interval == 0:
            self.evaluate_and_record()

    def typical_step_time(self) -> float | None:
        """Mean step time so far; None before the first step."""
        # the first step of a process includes graph compilation: it counts only while alone
        times = self.step_times[1:] or self.step_times
        return float(np.mean(times)) if times else None

    # -- evaluate and save
    def evaluate_and_record(self) -> None:
        tc = self.tc
        if self.eval_data is None:  # looked at once: periodic evals read the same files
            self.eval_data = inspect_dataset(tc.eval_dataset_dir)
        self.eval_loss, self.eval_ppl = evaluate(self.model, self.eval_data, tc.batch_size, tc.seq_length)
        self.evals.append({"step": self.global_step, "loss": self.eval_loss, "perplexity": self.eval_ppl})
        if self.live is not None:
            self.live.eval(self.global_step, self.eval_loss)
        logger.info(
            "eval step=%d/%d loss=%.6f perplexity=%.4f",
            self.global_step,
            self.total,
            self.eval_loss,
            self.eval_ppl,
        )

    def evaluate_at_end(self) -> None:
        """With `do_eval`, the final weights are evaluated, unless the last periodic eval did."""
        if self.tc.do_eval and (not self.evals or self.evals[-1]["step"] != self.global_step):
            self.evaluate_and_record()

    def save(self, epoch: int, in_epoch: int) -> None:
        tc = self.tc
        path = train_state.save(
            self.step_cell,
            tc.output_dir,
            tc.ckpt_prefix,
            self.rt.rank,
            train_state.Counters(epoch, in_epoch, self.global_step),
            trainable_only=tc.save_trainable_params,
            trainable_names=self.trainable_names,
            keep_max=tc.keep_checkpoint_max,
            loss_scale=tc.scale_sense,
        )
        self.last_checkpoint = str(path)
        logger.info("saved checkpoint %s", path)

    def saved_at(self, epoch: int, in_epoch: int) -> bool:
        """Whether this run's last save was at step `in_epoch` of `epoch`."""
        here = checkpoint_path(self.tc.output_dir, self.tc.ckpt_prefix, self.rt.rank, epoch, in_epoch)
        return self.last_checkpoint == str(here)

    # -- summary
    def summary(self) -> TrainResult:
        step_time = self.typical_step_time()
        result = TrainResult(
            steps=self.global_step,
            steps_this_run=len(self.series),
            total_steps=self.total,
            final_loss=self.series[-1]["loss"] if self.series else None,
            eval_loss=self.eval_loss,
            eval_perplexity=self.eval_ppl,
            tokens_per_second_per_device=self.tokens_per_step / step_time if step_time is not None else None,
            world_size=self.rt.world_size,
            rank=self.rt.rank,
            resumed_from=self.resumed_from,
            last_checkpoint=self.last_checkpoint,
            summary_path=None,
            loss_series=self.series,
            eval_series=self.evals,
            length_buckets={
                "enabled": bool(self.buckets),
                "sizes": self.buckets or [self.tc.seq_length],
                "micro_batches_per_bucket": {str(b): n for b, n in sorted(self.bucket_counts.items())},
                "compiles": len(self.graphs),
                "compile_seconds": sum(g["first_call_seconds"] for g in self.graphs),
                "graphs": self.graphs,
            },
        )
        if self.graphs:
            logger.info(
                "%d step graph(s) compiled this run, first calls %.2fs in all (compile + one step each)",
                len(self.graphs),
                result.length_buckets["compile_seconds"],
            )
        if self.rt.rank == 0:
            self.write_summary(result)
        return result

    def write_summary(self, result: TrainResult) -> None:
        """OUTPUT/train_summary.json: the result and the run's shape, written atomically."""
        tc = self.tc
        path = Path(tc.output_dir) / SUMMARY_NAME
        result.summary_path = str(path)
        summary = asdict(result)
        summary.update(
            run_mode=tc.run_mode,
            global_batch_size=self.plan.global_batch,
            gradient_accumulation_steps=tc.gradient_accumulation_steps,
            seq_length=tc.seq_length,
            tokens_per_second_total=(
                result.tokens_per_second_per_device * self.rt.world_size
                if result.tokens_per_second_per_device
                else None
            ),
        )
        write_json_atomic(path, summary)
        logger.info(
            "done: %d steps (%d this run), final loss %s, eval loss %s; summary %s",
            self.global_step,
            len(self.series),
            result.final_loss,
            self.eval_loss,
            path,
        )


def train(tc: TrainConfig) -> TrainResult:
    """Run training (or fine-tuning from `load_checkpoint`) as configured; return what happened."""
    with disk_full("finetune", tc.output_dir):
        return TrainRecipe(tc).run()
