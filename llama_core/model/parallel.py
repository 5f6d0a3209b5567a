"""Tensor parallelism inside a node (Megatron style) from collectives every backend has.

`model_parallel` ranks hold one slice each of every large weight (the split table is
`llama_core.checkpoint.names`): q/k/v and gate/up split by output rows ("column parallel"), o and
down by input columns ("row parallel"), the embedding and the output head by vocabulary rows. Two
cells move activations between the replicated and the split world, each the other's transpose:

- `CopyToParallel`: identity forward; the backward sums the ranks' partial input gradients (a
  column-parallel layer's input feeds every rank's slice);
- `ReduceFromParallel`: forward sums the ranks' partial outputs (a row-parallel layer, a vocab
  slice's embedding lookup); the backward is the identity.

Both are written as custom bprops over `ops.AllReduce`, the one collective whose forward and
backward run on CPU ranks (MindSpore 2.10: AllGather's backward needs ReduceScatter, which has no
CPU kernel) as well as on HCCL; graph mode compiles them on both. With model_parallel 1 every cell
here is the identity and the model is exactly the unsplit one.

Ranks are numbered as MindFormers and the shard stage number them:
`rank = stage * dp * mp + dp_index * mp + mp_index`, so a tensor-parallel group is `mp`
consecutive ranks (one node) and a data-parallel group every `mp`-th rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn, ops


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group: `size` ranks, this one `index` among them,
    communicating over the collective group named `group` (None when size is 1)."""

    size: int = 1
    index: int = 0
    group: str | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.index < self.size:
            raise ValueError(f"tensor parallel index {self.index} of size {self.size}")
        if self.size > 1 and not self.group:
            raise ValueError("tensor parallel size > 1 needs a communication group")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def part(self, size: int, what: str) -> int:
        """The local share of a split dimension; ValueError naming `what` when it does not divide."""
        if size % self.size:
            raise ValueError(f"{what} = {size} is not divisible by model_parallel = {self.size}")
        return size // self.size


NO_PARALLEL = TensorParallel()


def group_ranks(dp: int, mp: int, rank: int) -> tuple[list[int], list[int]]:
    """The ranks of this rank's tensor-parallel group and of its data-parallel group (one stage)."""
    stage_base = rank - rank % (dp * mp)
    dp_index, mp_index = (rank % (dp * mp)) // mp, rank % mp
    mp_ranks = [stage_base + dp_index * mp + m for m in range(mp)]
    dp_ranks = [stage_base + d * mp + mp_index for d in range(dp)]
    return mp_ranks, dp_ranks


class CopyToParallel(nn.Cell):
    """Identity forward; backward sums the gradient over the tensor-parallel group."""

    def __init__(self, tp: TensorParallel) -> None:
        super().__init__()
        self.reduce = ops.AllReduce(group=tp.group)

    def construct(self, x: Tensor) -> Tensor:
        return x

    def bprop(self, x: Tensor, out: Tensor, dout: Tensor) -> tuple[Tensor]:
        return (self.reduce(dout),)


class ReduceFromParallel(nn.Cell):
    """Sum over the tensor-parallel group forward; identity backward."""

    def __init__(self, tp: TensorParallel) -> None:
        super().__init__()
        self.reduce = ops.AllReduce(group=tp.group)

    def construct(self, x: Tensor) -> Tensor:
        return self.reduce(x)

    def bprop(self, x: Tensor, out: Tensor, dout: Tensor) -> tuple[Tensor]:
        return (dout,)


class GatherLastAxis(nn.Cell):
    """Concatenate the ranks' slices of the last axis (forward only: the logits of evaluation and
    generation; training never gathers the vocabulary). Each rank places its slice among zeros and
    the sum assembles them: AllGather on CPU works only over the world group."""

    def __init__(self, tp: TensorParallel) -> None:
        super().__init__()
        self.size, self.index = tp.size, tp.index
        self.reduce = ops.AllReduce(group=tp.group)

    def construct(self, x: Tensor) -> Tensor:
        width = x.shape[-1]
        before = ops.zeros((*x.shape[:-1], self.index * width), x.dtype)
        after = ops.zeros((*x.shape[:-1], (self.size - 1 - self.index) * width), x.dtype)
        return self.reduce(ops.concat((before, x, after), -1))


class MaxOverParallel(nn.Cell):
    """Elementwise max over the group, from a sum (MAX reductions are not on every CPU backend):
    each rank fills its own slot of a [size, ...] tensor, the sum gathers them all."""

    def __init__(self, tp: TensorParallel) -> None:
        super().__init__()
        self.size, self.index = tp.size, tp.index
        self.reduce = ops.AllReduce(group=tp.group)
        self.slot_max = ops.ReduceMax()  # functional max/amax fail to compile inside a bprop
        self.slot = Tensor(np.eye(tp.size, dtype=np.float32)[tp.index])

    def construct(self, x: Tensor) -> Tensor:
        slots = self.slot.astype(x.dtype).reshape((self.size,) + (1,) * x.ndim) * x.expand_dims(0)
        return self.slot_max(self.reduce(slots), 0)
