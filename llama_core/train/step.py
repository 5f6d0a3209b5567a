"""The compiled training step: forward + backward, gradient accumulation, data-parallel reduction,
global-norm clipping and the optimizer update, in one MindSpore cell (graph mode friendly)."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from llama_core.model.parallel import NO_PARALLEL, TensorParallel

_zero_accum = ops.MultitypeFuncGraph("zero_accum")
_add_accum = ops.MultitypeFuncGraph("add_accum")
_square_sum = ops.MultitypeFuncGraph("square_sum")


@_add_accum.register("Tensor", "Tensor")
def _add(accum: ms.Parameter, grad: ms.Tensor) -> ms.Tensor:
    return ops.assign_add(accum, grad)


@_zero_accum.register("Tensor")
def _zero(accum: ms.Parameter) -> ms.Tensor:
    return ops.assign(accum, ops.zeros_like(accum))


@_square_sum.register("Tensor")
def _sq(grad: ms.Tensor) -> ms.Tensor:
    return ops.reduce_sum(ops.square(grad.astype(ms.float32)))


class _ScaledLoss(nn.Cell):
    """loss x loss-scale, so small bf16/fp16 gradients survive the backward pass."""

    def __init__(self, network: nn.Cell, scale: float) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.scale = ms.Tensor(scale, ms.float32)

    def construct(self, input_ids: ms.Tensor, labels: ms.Tensor, doc_ends: ms.Tensor | None) -> ms.Tensor:
        return self.network(input_ids, labels, doc_ends) * self.scale


class TrainStep(nn.Cell):
    """One micro-batch; with `apply_update` also one optimizer step. Returns (loss, grad_norm).
    `doc_ends`: the packed rows' document ends (see `LlamaForCausalLM`), or None.

    Gradients of `accumulation_steps` micro-batches are averaged, then reduced over data-parallel
    ranks (`reducer`: sum or mean as `parallel.gradients_mean` says), then clipped to `clip_norm`
    (global L2 norm; None = off). The returned loss is this micro-batch's loss, averaged over ranks
    when data parallel; grad_norm is the norm before clipping (0 on steps without an update).

    `data_parallel`: (ranks, group; None = all ranks) the loss is averaged over.
    `tensor_parallel`: (this rank's `TensorParallel`, the names of the parameters it holds a slice
    of): the global norm sums the squares of the slices over the group and counts each
    replicated parameter once (every rank holds the same gradient of it).
    """

    def __init__(
        self,
        network: nn.Cell,
        optimizer: nn.Optimizer,
        *,
        accumulation_steps: int = 1,
        loss_scale: float = 1.0,
        clip_norm: float | None = 1.0,
        reducer: nn.Cell | None = None,
        data_parallel: tuple[int, str | None] = (1, None),
        tensor_parallel: tuple[TensorParallel, set[str]] = (NO_PARALLEL, set()),
    ) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ops.value_and_grad(_ScaledLoss(network, loss_scale), None, self.weights)
        self.accumulation_steps = accumulation_steps
        self.inv_scale = 1.0 / loss_scale
        self.inv_accum = 1.0 / accumulation_steps
        self.clip_norm = clip_norm
        self.reducer = reducer
        self.data_parallel = data_parallel[0]
        self.hyper_map = ops.HyperMap()
        if accumulation_steps > 1:
            self.accum = self.weights.clone(prefix="accu_grads", init="zeros")
        if self.data_parallel > 1:
            group = data_parallel[1]
            self.allreduce = ops.AllReduce() if group is None else ops.AllReduce(group=group)
        tp, split = tensor_parallel
        self.norm_over_ranks = None
        if tp.enabled:
            self.norm_over_ranks = ops.AllReduce(group=tp.group)
            # a replicated gradient's square, summed over the group, counts 1/size per rank
            self.square_weights = tuple(1.0 if p.name in split else 1.0 / tp.size for p in self.weights)

    def construct(
        self,
        input_ids: ms.Tensor,
        labels: ms.Tensor,
        apply_update: bool = True,
        doc_ends: ms.Tensor | None = None,
    ):
        loss, grads = self.grad_fn(input_ids, labels, doc_ends)
        loss = loss * self.inv_scale
        if self.data_parallel > 1:
            loss = self.allreduce(loss) / self.data_parallel
        norm = ops.zeros((), ms.float32)
        if self.accumulation_steps > 1:
            done = self.hyper_map(_add_accum, self.accum, grads)
            if not apply_update:
                return ops.depend(loss, done), norm
            grads = ops.depend(self.accum, done)
        scale = self.inv_scale * self.inv_accum
        grads = self.hyper_map(ops.partial(ops.mul, scale), grads)
        if self.reducer is not None:
            grads = self.reducer(grads)
        squares = self.hyper_map(_square_sum, grads)
        if self.norm_over_ranks is None:
            norm = ops.sqrt(ops.addn(squares))
        else:
            weighted = self.hyper_map(ops.mul, squares, self.square_weights)
            norm = ops.sqrt(self.norm_over_ranks(ops.addn(weighted)))
        if self.clip_norm is not None:
            factor = self.clip_norm / ops.maximum(norm, self.clip_norm)
            grads = self.hyper_map(ops.partial(ops.mul, factor), grads)
        updated = self.optimizer(grads)
        if self.accumulation_steps > 1:
            updated = ops.depend(updated, self.hyper_map(_zero_accum, ops.depend(self.accum, updated)))
        return ops.depend(loss, updated), norm
