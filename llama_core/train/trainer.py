"""The fine-tune/train loop: context and data-parallel set-up, model + LoRA, data, AdamW, the step
cell, per-step log lines, periodic eval, checkpoints, resume and the JSON summary.

Output layout (OUTPUT = output_dir):
  OUTPUT/checkpoint/rank_<i>/<prefix>_rank_<i>-<epoch>_<step>.ckpt   every save_checkpoint_steps + at the end
  OUTPUT/train_summary.json                                           rank 0, written atomically at the end
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
from mindspore import nn, ops

from llama_core.atomic import write_json_atomic
from llama_core.config import TrainConfig
from llama_core.errors import ConfigError, InputError
from llama_core.progress import human_seconds
from llama_core.train import checkpointing as ckpt
from llama_core.train.dataset import ShardPlan, check_batch, count_records, epoch_batches, supervised_tokens
from llama_core.train.schedule import lr_array
from llama_core.train.step import TrainStep

logger = logging.getLogger("llama_core.train")

SUMMARY_NAME = "train_summary.json"


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


@dataclass
class Runtime:
    """Rank and world size once the MindSpore context is set."""

    rank: int = 0
    world_size: int = 1


def setup_context(tc: TrainConfig) -> Runtime:
    """Set graph/PyNative mode and device; under msrun initialise communication and DATA_PARALLEL."""
    kwargs: dict[str, Any] = {"mode": tc.mode, "device_target": tc.device_target}
    if tc.max_device_memory and tc.device_target != "CPU":
        kwargs["max_device_memory"] = tc.max_device_memory
    if not tc.use_parallel and tc.device_target != "CPU":
        kwargs["device_id"] = tc.device_id
    ms.set_context(**kwargs)
    if not tc.use_parallel:
        return Runtime()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rt = Runtime(rank=get_rank(), world_size=get_group_size())
    if rt.world_size != tc.data_parallel:
        raise ConfigError(
            f"parallel_config.data_parallel is {tc.data_parallel} but {rt.world_size} ranks were launched "
            f"(set --parallel_config.data_parallel {rt.world_size})"
        )
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(
        parallel_mode=ms.ParallelMode.DATA_PARALLEL,
        gradients_mean=tc.gradients_mean,
        device_num=rt.world_size,
    )
    if tc.parallel_mode != 0:
        logger.info(
            "parallel.parallel_mode %d: running pure data parallel (model_parallel 1)", tc.parallel_mode
        )
    return rt


def build_model(tc: TrainConfig) -> nn.Cell:
    """LlamaForCausalLM with LoRA applied (and base weights frozen) when `pet_config` is set.

    Initial weights come from the global seed, so every rank starts identical.
    """
    from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora

    model_config = {k: v for k, v in tc.model_config.items() if k != "pet_config"}
    model = LlamaForCausalLM(LlamaConfig.from_dict(model_config))
    if tc.pet_config:
        apply_lora(model, LoraConfig.from_pet_config(tc.pet_config))
    return model


def load_base(model: nn.Cell, tc: TrainConfig, rank: int) -> None:
    """`load_checkpoint`: a file, or a folder with rank_<i>/ sub-folders (this rank's file)."""
    from llama_core.model.weights import load_weights

    if tc.load_checkpoint:
        load_weights(model, ckpt.base_checkpoint_file(tc.load_checkpoint, rank))
    elif tc.run_mode == "finetune":
        logger.warning("run_mode finetune without load_checkpoint: starting from random weights")


def evaluate(model: nn.Cell, dataset_dir: str, batch_size: int, seq_length: int) -> tuple[float, float]:
    """Mean loss over the eval batches (section 3 loss per batch) and its perplexity exp(loss)."""
    import mindspore.dataset as ds

    from llama_core.train.dataset import COLUMNS, mindrecord_files

    data = ds.MindDataset(mindrecord_files(dataset_dir), columns_list=COLUMNS, shuffle=False)
    data = data.batch(batch_size, drop_remainder=False)
    model.set_train(False)
    losses = []
    try:
        for i, (ids, labels) in enumerate(data.create_tuple_iterator(output_numpy=True, num_epochs=1)):
            check_batch(ids, labels, seq_length, f"{dataset_dir} (eval batch {i})")
            losses.append(float(model(ms.Tensor(ids), ms.Tensor(labels)).asnumpy()))
    finally:
        model.set_train(True)
    if not losses:
        raise InputError(f"{dataset_dir}: eval dataset is empty")
    loss = float(np.mean(losses))
    return loss, math.exp(min(loss, 700.0))


class _SumOverRanks(nn.Cell):
    """Sum over all ranks as a compiled cell (CPU has neither an eager collective nor MIN/int32)."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = ops.AllReduce()

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.reduce(x)


def _agree_on_resume(found: tuple[Path, dict[str, Any]] | None, tc: TrainConfig, rt: Runtime):
    """All ranks must resume from the same step: take the smallest newest-readable step over ranks."""
    if rt.world_size == 1:
        return found
    mine = ckpt.counters_of(found[1]).global_step if found else -1
    # each rank fills its own slot, the sum gathers them all (float32 is exact for step counts < 2**24)
    slots = np.zeros(rt.world_size, np.float32)
    slots[rt.rank] = mine
    agreed = int(_SumOverRanks()(ms.Tensor(slots)).asnumpy().min())
    if agreed == mine:
        return found
    if agreed < 0:
        return None
    for path in ckpt.list_checkpoints(ckpt.rank_dir(tc.output_dir, rt.rank), tc.ckpt_prefix, rt.rank):
        try:
            params = ms.load_checkpoint(str(path), crc_check=True)
        except Exception:  # unreadable: the other ranks decided on an older step anyway
            continue
        if "global_step" in params and ckpt.counters_of(params).global_step == agreed:
            return path, params
    raise InputError(
        f"rank {rt.rank}: no readable checkpoint at step {agreed}, which the other ranks resume from"
    )


def train(tc: TrainConfig) -> TrainResult:
    """Run training (or fine-tuning) as configured and return what happened."""
    if not tc.train_dataset_dir:
        raise ConfigError(
            "no training data: set train_dataset.data_loader.dataset_dir or --train_dataset_dir"
        )
    if tc.sink_mode:
        logger.info(
            "runner_config.sink_mode: steps are driven from Python (one step per call) on every device"
        )
    rt = setup_context(tc)
    ms.set_seed(tc.seed)
    model = build_model(tc)
    load_base(model, tc, rt.rank)
    model.set_train(True)

    seq = tc.seq_length
    plan = ShardPlan(
        num_records=count_records(tc.train_dataset_dir),
        batch_size=tc.batch_size,
        num_shards=rt.world_size,
        shard_id=rt.rank,
        shuffle=tc.train_shuffle,
        seed=tc.seed,
    )
    accum = tc.gradient_accumulation_steps
    steps_per_epoch = plan.batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise InputError(
            f"{tc.train_dataset_dir}: {plan.num_records} records do not fill one step of "
            f"{plan.global_batch} x {accum} (global batch x gradient accumulation)"
        )
    dropped = plan.num_records - steps_per_epoch * accum * plan.global_batch
    if dropped:
        logger.info(
            "drop_remainder: %d of %d records per epoch do not fill a step and are skipped",
            dropped,
            plan.num_records,
        )
    total = tc.epochs * steps_per_epoch
    schedule_steps = tc.total_steps if tc.total_steps > 0 else total
    lrs = lr_array(tc.lr_schedule_type, schedule_steps, tc.learning_rate, tc.warmup_ratio, tc.lr_end)
    if len(lrs) < total:  # an explicit, shorter total_steps: hold lr_end afterwards
        lrs = np.concatenate([lrs, np.full(total - len(lrs), tc.lr_end, np.float32)])

    trainable = [p for p in model.trainable_params()]
    if not trainable:
        raise ConfigError("the model has no trainable parameter")
    decay = [p for p in trainable if p.ndim > 1]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}]
    rest = [p for p in trainable if p.ndim <= 1]
    if rest:  # norms are not decayed, as usual for AdamW
        groups.append({"params": rest, "weight_decay": 0.0})
    optimizer = nn.AdamWeightDecay(
        groups, learning_rate=ms.Tensor(lrs), beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps
    )
    reducer = None
    if rt.world_size > 1:
        reducer = nn.DistributedGradReducer(
            optimizer.parameters, mean=tc.gradients_mean, degree=rt.world_size
        )
    step_cell = TrainStep(
        model,
        optimizer,
        accumulation_steps=accum,
        loss_scale=tc.scale_sense,
        clip_norm=tc.max_grad_norm if tc.use_clip_grad else None,
        reducer=reducer,
        group_size=rt.world_size,
    )
    step_cell.set_train(True)

    start = ckpt.Counters(epoch=1, step_in_epoch=0, global_step=0)
    resumed_from = None
    if tc.resume_training:
        found = _agree_on_resume(ckpt.load_newest(tc.output_dir, tc.ckpt_prefix, rt.rank), tc, rt)
        if found is None:
            logger.warning(
                "resume_training: no complete checkpoint in %s; starting from step 0",
                ckpt.rank_dir(tc.output_dir, rt.rank),
            )
        else:
            path, params = found
            names = {p.name for p in step_cell.get_parameters()}
            state = {k: v for k, v in params.items() if k in names and not k.startswith(ckpt.TRANSIENT)}
            ms.load_param_into_net(step_cell, state)
            start = ckpt.counters_of(params)
            resumed_from = str(path)
            logger.info("resumed from %s: epoch %d, step %d/%d", path, start.epoch, start.global_step, total)
    if start.step_in_epoch >= steps_per_epoch:
        start = ckpt.Counters(epoch=start.epoch + 1, step_in_epoch=0, global_step=start.global_step)

    trainable_names = {p.name for p in trainable}
    tokens_per_step = tc.batch_size * seq * accum
    series: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    step_times: list[float] = []
    last_ckpt: str | None = None
    global_step = start.global_step
    eval_loss = eval_ppl = None

    def save(epoch: int, in_epoch: int) -> None:
        nonlocal last_ckpt
        path = ckpt.save(
            step_cell,
            tc.output_dir,
            tc.ckpt_prefix,
            rt.rank,
            ckpt.Counters(epoch, in_epoch, global_step),
            trainable_only=tc.save_trainable_params,
            trainable_names=trainable_names,
            keep_max=tc.keep_checkpoint_max,
            loss_scale=tc.scale_sense,
        )
        last_ckpt = str(path)
        logger.info("saved checkpoint %s", path)

    def run_eval() -> None:
        nonlocal eval_loss, eval_ppl
        eval_loss, eval_ppl = evaluate(model, tc.eval_dataset_dir, tc.batch_size, seq)
        evals.append({"step": global_step, "loss": eval_loss, "perplexity": eval_ppl})
        logger.info("eval step=%d/%d loss=%.6f perplexity=%.4f", global_step, total, eval_loss, eval_ppl)

    if tc.do_eval and not tc.eval_dataset_dir:
        raise ConfigError(
            "do_eval needs eval data: set eval_dataset.data_loader.dataset_dir or --eval_dataset_dir"
        )

    pad_id = int(tc.model_config.get("pad_token_id", 0))
    ignore_id = int(tc.model_config.get("ignore_token_id", -100))
    for epoch in range(start.epoch, tc.epochs + 1):
        skip = start.step_in_epoch if epoch == start.epoch else 0
        in_epoch = skip
        micro_losses: list[float] = []
        t0 = time.perf_counter()
        for micro, (ids, labels) in enumerate(
            epoch_batches(tc.train_dataset_dir, plan, epoch - 1, skip * accum)
        ):
            if in_epoch >= steps_per_epoch:
                break
            where = f"{tc.train_dataset_dir} (epoch {epoch}, batch {skip * accum + micro})"
            check_batch(ids, labels, seq, where)
            if supervised_tokens(ids, labels, pad_id, ignore_id) == 0:
                # its loss is 0 and its gradient nothing: say so rather than log a perfect loss
                logger.warning(
                    "%s: no supervised token in this batch (every label masked): it teaches nothing; "
                    "were the answers truncated away? see the preprocess report",
                    where,
                )
            apply = (micro + 1) % accum == 0
            loss_t, norm_t = step_cell(ms.Tensor(ids), ms.Tensor(labels), apply)
            micro_losses.append(float(loss_t.asnumpy()))
            if not apply:
                continue
            lr = float(lrs[global_step])
            global_step += 1
            in_epoch += 1
            loss = float(np.mean(micro_losses))
            norm = float(norm_t.asnumpy())
            micro_losses = []
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            step_times.append(dt)
            # the first step of a process includes graph compilation: keep it out of rates and ETA
            typical = float(np.mean(step_times[1:])) if len(step_times) > 1 else dt
            if not math.isfinite(loss):
                logger.warning("step %d: loss is %s", global_step, loss)
            series.append({"step": global_step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm})
            logger.info(
                "epoch=%d/%d step=%d/%d loss=%.6f lr=%.6e step_time=%.3fs tokens_per_s_device=%.1f "
                "grad_norm=%.6f eta=%s",
                epoch,
                tc.epochs,
                global_step,
                total,
                loss,
                lr,
                dt,
                tokens_per_step / dt,
                norm,
                human_seconds(typical * (total - global_step)),
            )
            if global_step % tc.save_checkpoint_steps == 0:
                save(epoch, in_epoch)
            if tc.do_eval and tc.eval_step_interval > 0 and global_step % tc.eval_step_interval == 0:
                run_eval()
        if global_step == total and (not last_ckpt or not last_ckpt.endswith(f"-{epoch}_{in_epoch}.ckpt")):
            save(epoch, in_epoch)
    if tc.do_eval and (not evals or evals[-1]["step"] != global_step):
        run_eval()

    rates = step_times[1:] or step_times
    result = TrainResult(
        steps=global_step,
        steps_this_run=len(series),
        total_steps=total,
        final_loss=series[-1]["loss"] if series else None,
        eval_loss=eval_loss,
        eval_perplexity=eval_ppl,
        tokens_per_second_per_device=tokens_per_step / float(np.mean(rates)) if rates else None,
        world_size=rt.world_size,
        rank=rt.rank,
        resumed_from=resumed_from,
        last_checkpoint=last_ckpt,
        summary_path=None,
        loss_series=series,
        eval_series=evals,
    )
    if rt.rank == 0:
        path = Path(tc.output_dir) / SUMMARY_NAME
        result.summary_path = str(path)
        summary = asdict(result)
        summary.update(
            run_mode=tc.run_mode,
            global_batch_size=plan.global_batch,
            gradient_accumulation_steps=accum,
            seq_length=seq,
            tokens_per_second_total=(
                result.tokens_per_second_per_device * rt.world_size
                if result.tokens_per_second_per_device
                else None
            ),
        )
        write_json_atomic(path, summary)
        logger.info(
            "done: %d steps (%d this run), final loss %s, eval loss %s; summary %s",
            global_step,
            len(series),
            result.final_loss,
            eval_loss,
            path,
        )
    return result


def finetune(tc: TrainConfig) -> TrainResult:
    """Fine-tune from `load_checkpoint` (run_mode finetune); same loop as `train`."""
    return train(tc)
