"""The model's cross-entropy without a whole batch's fp32 logits, forward and backward.

Llama 3's head has 128,256 outputs: at seq 4096 the fp32 logits of one row take 2.1 GB, and autodiff
keeps several tensors of that size alive (logits, log-softmax, their gradient). `ChunkedCrossEntropy`
computes the same masked mean `chunk_tokens` tokens at a time. Its backward pass is written out (a
custom bprop, as Liger's fused linear cross-entropy): it recomputes each chunk's logits and adds that
chunk's share to the gradients of the hidden states, the head weight (and LoRA B). Only a few
[chunk_tokens, vocab] tensors are ever alive; the price is one more head matmul and softmax per step.

Memory in graph mode is planned by the compiler, so these choices come from measured peaks
(MindSpore 2.10, CPU, seq 4096, vocab 128,256; bench/loss_memory.py has the first):
- per-chunk cells with `recompute()` lower the peak far less than the custom bprop;
- a [chunk, vocab] x [chunk, 1] broadcast multiply held its memory for every chunk at once (9.5 GB
  against 1.5 GB without it), so the mask weights rows on the [chunk, hidden] side of the gradient
  matmuls, and the [chunk, vocab] gradient is scaled only by the scalar dout;
- chained with `ops.depend`, chunks run one after the other (the forward peaked 30% higher without).

Tensor parallel (vocab parallel, as Megatron's cross-entropy): each rank holds a slice of the head's
vocabulary rows and computes its [chunk, vocab/mp] logits; the log-sum-exp is completed from each
rank's maximum and sum of exponentials, the target's logit from the rank holding it (a few
[chunk]-sized all-reduces). No rank ever holds all the vocabulary's logits, and every rank gets the
whole loss. The hidden states (and LoRA's `down`) enter the slices through `CopyToParallel`, whose
backward sums the ranks' partial gradients.
"""

from __future__ import annotations

from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from llama_core.model.parallel import (
    NO_PARALLEL,
    CopyToParallel,
    MaxOverParallel,
    ReduceFromParallel,
    TensorParallel,
)


class _ChunkedNll(nn.Cell):
    """sum_i mask_i * nll_i of the fp32 logits x W^T (+ down B^T when LoRA), chunk by chunk; W and
    B are this rank's vocabulary slice under tensor parallelism."""

    def __init__(self, chunk: int, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        self.chunk = chunk
        self.vocab_parallel = tp.enabled
        if tp.enabled:
            self.tp_index = tp.index
            # primitives: functional max/amax/sum fail to compile inside a bprop (MindSpore 2.10)
            self.row_max = ops.ReduceMax()
            self.row_sum = ops.ReduceSum()
            self.max_over_ranks = MaxOverParallel(tp)
            self.sum_over_ranks = ReduceFromParallel(tp)
        self.matmul_bt = ops.MatMul(transpose_b=True)
        # g^T x without materialising the transpose of a [chunk, vocab] tensor
        self.matmul_at = ops.MatMul(transpose_a=True)

    def logits(self, x: Tensor, weight: Tensor, down: Tensor | None, lora_b: Tensor | None) -> Tensor:
        y = self.matmul_bt(x, weight)
        if down is not None:
            y = y + self.matmul_bt(down, lora_b)
        return y.astype(mstype.float32)

    def local_targets(self, targets: Tensor, vocab_rows: int) -> tuple[Tensor, Tensor]:
        """The targets as row indices of this rank's vocabulary slice (0 where another rank holds
        them) and a 0/1 float of whether this rank holds them."""
        local = targets - self.tp_index * vocab_rows
        # plain arithmetic: functional ops with default arguments fail to compile inside a bprop
        held = (local >= 0).astype(local.dtype) * (local < vocab_rows).astype(local.dtype)
        return local * held, held.astype(mstype.float32)

    def log_normalizer(self, logits: Tensor) -> Tensor:
        """log sum_v exp(logits[:, v]) over the whole vocabulary, from every rank's slice."""
        top = self.max_over_ranks(self.row_max(logits, -1))
        total = self.sum_over_ranks(self.row_sum(ops.exp(logits - top.expand_dims(1)), -1))
        return ops.log(total) + top

    def nll_parallel(self, logits: Tensor, targets: Tensor) -> Tensor:
        index, held = self.local_targets(targets, logits.shape[1])
        picked = ops.gather_elements(logits, 1, index.expand_dims(1)).squeeze(1) * held
        return self.log_normalizer(logits) - self.sum_over_ranks(picked)

    def nll(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.vocab_parallel:
            return self.nll_parallel(logits, targets)
        log_probs = ops.log_softmax(logits, -1)
        return -ops.gather_elements(log_probs, 1, targets.expand_dims(1)).squeeze(1)

    def nll_gradient(self, logits: Tensor, targets: Tensor) -> Tensor:
        """d nll / d logits = softmax - one_hot(target), on this rank's slice."""
        if self.vocab_parallel:
            index, held = self.local_targets(targets, logits.shape[1])
            g = ops.exp(logits - self.log_normalizer(logits).expand_dims(1))
            return ops.tensor_scatter_elements(g, index.expand_dims(1), -held.expand_dims(1), 1, "add")
        g = ops.softmax(logits, -1)
        t = targets.expand_dims(1)
        return ops.tensor_scatter_elements(g, t, -ops.ones(t.shape, g.dtype), 1, "add")

    def construct(
        self,
        hidden: Tensor,
        weight: Tensor,
        down: Tensor | None,
        lora_b: Tensor | None,
        targets: Tensor,
        mask: Tensor,
    ) -> Tensor:
        total = ops.zeros((), mstype.float32)
        for start in range(0, hidden.shape[0], self.chunk):
            end = start + self.chunk  # slicing clips the last chunk
            # chained to the previous chunk, else graph mode may run the chunks side by side
            x = ops.depend(hidden[start:end], total)
            d = None if down is None else down[start:end]
            nll = self.nll(self.logits(x, weight, d, lora_b), targets[start:end])
            total = total + ops.sum(nll * mask[start:end])
        return total

    def bprop(
        self,
        hidden: Tensor,
        weight: Tensor,
        down: Tensor | None,
        lora_b: Tensor | None,
        targets: Tensor,
        mask: Tensor,
        out: Tensor,
        dout: Tensor,
    ) -> tuple:
        d_hidden, d_down = [], []
        # accumulated in fp32 (a half-precision matmul of the whole batch accumulates in fp32 too)
        d_weight = ops.zeros(weight.shape, mstype.float32)
        d_lora_b = None if lora_b is None else ops.zeros(lora_b.shape, mstype.float32)
        for start in range(0, hidden.shape[0], self.chunk):
            end = start + self.chunk
            # chained through d_hidden, not d_weight: a frozen head's weight gradient can then be pruned
            x = hidden[start:end] if not d_hidden else ops.depend(hidden[start:end], d_hidden[-1])
            d = None if down is None else down[start:end]
            # scaled by dout in fp32 as autodiff would, so a loss-scaled fp16 gradient keeps its
            # precision through the cast
            g = self.nll_gradient(self.logits(x, weight, d, lora_b), targets[start:end])
            g = (g * dout).astype(hidden.dtype)
            rows = mask[start:end].expand_dims(1).astype(hidden.dtype)
            d_hidden.append(ops.matmul(g, weight) * rows)
            d_weight = d_weight + self.matmul_at(g, x * rows).astype(mstype.float32)
            if down is not None:
                d_down.append(ops.matmul(g, lora_b) * rows)
                d_lora_b = d_lora_b + self.matmul_at(g, d * rows).astype(mstype.float32)
        return (
            ops.concat(d_hidden, 0),
            d_weight.astype(weight.dtype),
            None if down is None else ops.concat(d_down, 0),
            None if lora_b is None else d_lora_b.astype(lora_b.dtype),
            ops.zeros_like(targets),
            ops.zeros_like(mask),
        )


class ChunkedCrossEntropy(nn.Cell):
    """The masked mean cross-entropy of `LlamaForCausalLM`, `chunk_tokens` tokens at a time.

    `construct(hidden, head, targets, mask)`:
    - hidden [..., hidden_size]: the final norm's output (compute dtype);
    - head: the `lm_head` cell, a `Linear` or a `LoraLinear` (its dropout included), or for a tied
      head the `Embedding` whose table it is; a head bias is not supported (no Llama or Qwen head has one);
    - targets [...] integer ids; where mask is 0 any value (the ignore id) is fine;
    - mask [...] float, 1 for supervised tokens.
    Returns sum(nll * mask) / (sum(mask) + 1e-8) with nll from fp32 logits, as the model's loss.
    A chunk size that does not divide the token count is fine (the last chunk is shorter).
    """

    def __init__(self, chunk_tokens: int, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.nll = _ChunkedNll(chunk_tokens, tp)
        self.copy = CopyToParallel(tp) if tp.enabled else None

    def scatter(self, x: Tensor) -> Tensor:
        return x if self.copy is None else self.copy(x)

    def construct(self, hidden: Tensor, head: nn.Cell, targets: Tensor, mask: Tensor) -> Tensor:
        dtype = head.compute_dtype
        x = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)
        mask = mask.reshape(-1).astype(mstype.float32)
        targets = targets.reshape(-1).astype(mstype.int32)
        # ignored targets (-100) are out of range for the gather and scatter; their rows weigh 0
        targets = ops.where(mask > 0, targets, ops.zeros_like(targets))
        weight = (head.embedding_weight if hasattr(head, "embedding_weight") else head.weight).astype(dtype)
        if hasattr(head, "mindpet_delta_lora_b"):
            # LoraLinear's adapter input, [tokens, rank]: autodiff takes it from here to A and x
            down = head.project(head.dropout(x), head.mindpet_delta_lora_a) * head.scaling
            lora_b = head.mindpet_delta_lora_b.astype(dtype)
            total = self.nll(self.scatter(x), weight, self.scatter(down), lora_b, targets, mask)
        else:
            total = self.nll(self.scatter(x), weight, None, None, targets, mask)
        return total / (ops.sum(mask) + 1e-8)
