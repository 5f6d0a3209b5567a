"""The training components the recipe (`trainer.TrainRecipe`) and `predict` share: the MindSpore
context and the ranks' communication groups, the model with LoRA and its base weights, evaluation, the
learning-rate array and AdamW, and the small collectives the recipe agrees on across ranks with."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from llama_core.config import TrainConfig
from llama_core.errors import ConfigError, InputError
from llama_core.model.parallel import NO_PARALLEL, TensorParallel, group_ranks
from llama_core.train import state as train_state
from llama_core.train.dataset import DatasetInfo, check_batch, read_batches
from llama_core.train.schedule import lr_array

logger = logging.getLogger("llama_core.train")


@dataclass
class Runtime:
    """Rank and world size once the MindSpore context is set; with model_parallel > 1 the rank's
    tensor-parallel group (`tp`) and the data-parallel group of the ranks holding the same slices."""

    rank: int = 0
    world_size: int = 1
    dp: int = 1
    dp_index: int = 0
    dp_group: str | None = None  # None: every rank (model_parallel 1)
    tp: TensorParallel = NO_PARALLEL


def create_groups(rt: Runtime, dp: int, mp: int) -> Runtime:
    """This rank's tensor-parallel and data-parallel communication groups (`parallel.group_ranks`)."""
    from mindspore.communication import create_group

    mp_ranks, dp_ranks = group_ranks(dp, mp, rt.rank)
    tp_group = f"tp_{mp_ranks[0]}"
    create_group(tp_group, mp_ranks)
    dp_group = None
    if dp > 1:
        dp_group = f"dp_{dp_ranks[0]}"
        create_group(dp_group, dp_ranks)
    tp = TensorParallel(size=mp, index=mp_ranks.index(rt.rank), group=tp_group)
    logger.info(
        "rank %d: tensor parallel with ranks %s, data parallel with ranks %s", rt.rank, mp_ranks, dp_ranks
    )
    return Runtime(rt.rank, rt.world_size, dp, dp_ranks.index(rt.rank), dp_group, tp)


def setup_context(tc: TrainConfig) -> Runtime:
    """Set graph/PyNative mode and device; under msrun initialise communication, data parallel and
    the tensor-parallel groups."""
    kwargs: dict[str, Any] = {"mode": tc.mode, "device_target": tc.device_target}
    if tc.max_device_memory and tc.device_target != "CPU":
        kwargs["max_device_memory"] = tc.max_device_memory
    if not tc.use_parallel and tc.device_target != "CPU":
        kwargs["device_id"] = tc.device_id
    ms.set_context(**kwargs)
    if not tc.use_parallel:
        if tc.model_parallel > 1:
            raise ConfigError(
                f"parallel_config.model_parallel = {tc.model_parallel} runs on ranks launched with msrun "
                "(llama-lora launch, or --use_parallel True under msrun)"
            )
        return Runtime()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rt = Runtime(rank=get_rank(), world_size=get_group_size(), dp=get_group_size(), dp_index=get_rank())
    if rt.world_size != tc.layout.world_size:
        raise ConfigError(
            f"parallel_config.data_parallel x model_parallel is {tc.data_parallel} x {tc.model_parallel} "
            f"but {rt.world_size} ranks were launched (set --parallel_config.data_parallel "
            f"{max(rt.world_size // tc.model_parallel, 1)})"
        )
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(
        parallel_mode=ms.ParallelMode.DATA_PARALLEL,
        gradients_mean=tc.gradients_mean,
        device_num=rt.world_size,
    )
    if tc.parallel_mode != 0:
        logger.info(
            "parallel.parallel_mode %d: running data parallel x %d-way tensor parallel as written in "
            "llama_core.model.parallel",
            tc.parallel_mode,
            tc.model_parallel,
        )
    if tc.model_parallel > 1:
        rt = create_groups(rt, tc.data_parallel, tc.model_parallel)
    return rt


def build_model(tc: TrainConfig, tp: TensorParallel = NO_PARALLEL) -> nn.Cell:
    """LlamaForCausalLM (this rank's slices under tensor parallelism `tp`) with LoRA applied (and
    base weights frozen) when `pet_config` is set, and `recompute_config`'s recomputation.

    Initial weights come from the global seed, so every rank starts identical.
    """
    from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora
    from llama_core.model.llama import apply_recompute

    model = LlamaForCausalLM(LlamaConfig.from_dict(tc.model_config), tp)  # it leaves pet_config to LoRA
    if tc.pet_config:
        apply_lora(model, LoraConfig.from_pet_config(tc.pet_config))
    apply_recompute(model, tc.recompute, tc.select_recompute)
    return model


def load_base(model: nn.Cell, tc: TrainConfig, rank: int) -> None:
    """`load_checkpoint`: a file, or a folder with rank_<i>/ sub-folders (this rank's file). Under
    tensor parallelism it must be the shard stage's folder: each rank reads only its own slices."""
    from llama_core.model.weights import load_weights

    if tc.load_checkpoint and tc.model_parallel > 1 and not Path(tc.load_checkpoint).is_dir():
        raise ConfigError(
            f"load_checkpoint {tc.load_checkpoint} is one file, but parallel_config.model_parallel = "
            f"{tc.model_parallel} loads each rank's slices: shard it first (llama-lora shard)"
        )
    if tc.load_checkpoint:
        load_weights(model, train_state.base_checkpoint_file(tc.load_checkpoint, rank))
    elif tc.run_mode == "finetune":
        logger.warning("run_mode finetune without load_checkpoint: starting from random weights")


def model_inputs(batch: tuple[np.ndarray, ...]) -> tuple[ms.Tensor | None, ...]:
    """A batch from `read_batches` as the model's (input_ids, labels, doc_ends) tensors."""
    doc_ends = ms.Tensor(batch[2]) if len(batch) > 2 else None
    return ms.Tensor(batch[0]), ms.Tensor(batch[1]), doc_ends


def evaluate(model: nn.Cell, data: DatasetInfo, batch_size: int, seq_length: int) -> tuple[float, float]:
    """Mean loss over the eval batches (docs/REFERENCE.md's loss, per batch) and its perplexity exp(loss)."""
    model.set_train(False)
    losses = []
    try:
        for i, batch in enumerate(read_batches(data, batch_size, None, drop_remainder=False)):
            check_batch(batch[0], batch[1], seq_length, f"{data.path} (eval batch {i})")
            losses.append(float(model(*model_inputs(batch)).asnumpy()))
    finally:
        model.set_train(True)
    if not losses:
        raise InputError(f"{data.path}: eval dataset is empty")
    loss = float(np.mean(losses))
    return loss, math.exp(min(loss, 700.0))


def learning_rates(tc: TrainConfig, total: int) -> np.ndarray:
    """One learning rate per optimizer step of the run; past an explicit, shorter `total_steps`
    the schedule holds lr_end."""
    schedule_steps = tc.total_steps if tc.total_steps > 0 else total
    lrs = lr_array(tc.lr_schedule_type, schedule_steps, tc.learning_rate, tc.warmup_ratio, tc.lr_end)
    if len(lrs) < total:
        lrs = np.concatenate([lrs, np.full(total - len(lrs), tc.lr_end, np.float32)])
    return lrs


def adamw(trainable: list[ms.Parameter], tc: TrainConfig, lrs: np.ndarray) -> nn.Optimizer:
    """AdamW over the trainable parameters; norms (1-D) are not decayed, as usual for AdamW."""
    groups = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": tc.weight_decay}]
    rest = [p for p in trainable if p.ndim <= 1]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return nn.AdamWeightDecay(
        groups, learning_rate=ms.Tensor(lrs), beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps
    )


class SumOverRanks(nn.Cell):
    """Sum over all ranks as a compiled cell (CPU has neither an eager collective nor MIN/int32)."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = ops.AllReduce()

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.reduce(x)


def gather_over_ranks(value: int, rt: Runtime, cell: nn.Cell | None = None) -> np.ndarray:
    """Every rank's `value`, in rank order; every rank must call it. Pass one `SumOverRanks` cell
    to reuse its compiled graph across calls."""
    # each rank fills its own slot, the sum gathers them all (float32 is exact for counts < 2**24)
    slots = np.zeros(rt.world_size, np.float32)
    slots[rt.rank] = value
    return (SumOverRanks() if cell is None else cell)(ms.Tensor(slots)).asnumpy().astype(np.int64)


def min_over_ranks(value: int, rt: Runtime) -> int:
    """The smallest of every rank's `value`; every rank must call it."""
    return int(gather_over_ranks(value, rt).min())
