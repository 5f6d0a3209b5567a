"""The Llama-family decoder (Llama 2, Llama 3.x, Qwen2/2.5, Qwen3 dense) in MindSpore, readable top to bottom.

Parameter names follow MindFormers 1.3 (docs/REFERENCE.md, parameter names) so checkpoints interchange:
`model.tok_embeddings.embedding_weight`, `model.layers.<i>.attention.wq|wk|wv|wo.weight`,
`model.layers.<i>.feed_forward.w1|w2|w3.weight`, `model.layers.<i>.attention_norm|ffn_norm.weight`,
`model.norm_out.weight`, `lm_head.weight`. The families' switches (`LlamaConfig`) add
`attention.wq|wk|wv.bias` (Qwen2), `attention.q_norm|k_norm.weight` (Qwen3), Llama 3.1's RoPE
frequency scaling, and a tied head (`lm_head` reuses the embedding table: no `lm_head.weight`).

Precision: parameters are stored in `param_init_type`; matmuls run in `compute_dtype`; RMSNorm in
`layernorm_compute_type`, softmax in `softmax_compute_type`, RoPE in `rotary_dtype`; logits are fp32.
On Ascend `use_flash_attention` switches attention to MindSpore's fused `flash_attention_score`.
The sizes and settings come from `LlamaConfig` (`llama_core.model.config`).

Packed rows: `doc_ends` [batch, K] gives the cumulative end of each document of a row (the
`actual_seq_len` column of a packed MindRecord; entries >= the row's input length are ignored, so a
batch pads its rows' lists with any value past the row). Each document then attends only to itself and its
positions restart at 0: its logits are those of the document run alone. Without `doc_ends` a row
is one sequence (the reference layout).
"""

from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype
from mindspore.common.initializer import Normal, One, Zero, initializer

from llama_core.model.config import DTYPE_NAMES, LlamaConfig
from llama_core.model.loss import ChunkedCrossEntropy
from llama_core.model.parallel import (
    NO_PARALLEL,
    CopyToParallel,
    GatherLastAxis,
    ReduceFromParallel,
    TensorParallel,
)

DTYPES = {name: getattr(mstype, name) for name in DTYPE_NAMES}

# Llama's standard deviation for the normal init of linear and embedding weights (MindFormers default).
INIT_STD = 0.02
# Added to the scores of future positions, per softmax dtype: exp() of the sum is exactly 0.
_MASK_VALUE = {mstype.float32: -1.0e9, mstype.float16: -6.0e4, mstype.bfloat16: -1.0e9}
# flash_attention_score's compressed causal mask (sparse_mode 2) is always 2048 x 2048.
_FLASH_MASK_SIZE = 2048
# Tokens per chunk of the loss: a 128k-vocab head's fp32 logits are never held for a whole batch
# (at seq 4096: 2.5 GB peak instead of 6.6 GB, docs/BENCHMARKS.md "loss memory").
LOSS_CHUNK_TOKENS = 1024


class Linear(nn.Cell):
    """y = x W^T (+ b) with W [out, in] stored in param_init_type and multiplied in compute_dtype.

    `weight` / `bias` given: reuse those Parameters (a tied head, a LoRA wrapper over loaded weights);
    `has_bias` without `bias`: a fresh zero bias. Under tensor parallelism (`tp`) `split` says which
    dimension this rank holds a slice of: "out" (column parallel: the input is replicated, the
    output split) or "in" (row parallel: the input split, the partial outputs summed over ranks).
    `in_features` / `out_features` are then this rank's sizes, `full_features` the whole layer's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LlamaConfig,
        weight: Parameter | None = None,
        *,
        has_bias: bool = False,
        bias: Parameter | None = None,
        tp: TensorParallel = NO_PARALLEL,
        split: str | None = None,
    ) -> None:
        super().__init__()
        self.full_features = (in_features, out_features)
        self.tp, self.split = tp, split
        if split == "out":
            out_features = tp.part(out_features, "output features")
        elif split == "in":
            in_features = tp.part(in_features, "input features")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = DTYPES[config.compute_dtype]
        param_dtype = DTYPES[config.param_init_type]
        if weight is None:
            weight = Parameter(
                initializer(Normal(INIT_STD), (out_features, in_features), param_dtype), name="weight"
            )
        self.weight = weight
        if bias is None and has_bias:
            bias = Parameter(initializer(Zero(), (out_features,), param_dtype), name="bias")
        self.bias = bias
        self.matmul = ops.MatMul(transpose_b=True)
        parallel = tp.enabled and split is not None
        self.copy_input = CopyToParallel(tp) if parallel and split == "out" else None
        self.reduce_output = ReduceFromParallel(tp) if parallel and split == "in" else None

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        """x [..., in] @ weight[out, in]^T, flattened to 2-D for the matmul kernel."""
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]), weight.astype(self.compute_dtype))
        return y.reshape((*lead, weight.shape[0]))

    def scatter_input(self, x: Tensor) -> Tensor:
        """A replicated input entering this rank's output slice (column parallel)."""
        return x if self.copy_input is None else self.copy_input(x)

    def gather_output(self, y: Tensor) -> Tensor:
        """This rank's partial sum completed over the ranks (row parallel)."""
        return y if self.reduce_output is None else self.reduce_output(y)

    def add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.astype(self.compute_dtype)

    def construct(self, x: Tensor) -> Tensor:
        x = self.scatter_input(x.astype(self.compute_dtype))
        return self.add_bias(self.gather_output(self.project(x, self.weight)))


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, computed in layernorm_compute_type."""

    def __init__(self, dim: int, config: LlamaConfig) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.norm_dtype = DTYPES[config.layernorm_compute_type]
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.weight = Parameter(initializer(One(), (dim,), DTYPES[config.param_init_type]), name="weight")

    def construct(self, x: Tensor) -> Tensor:
        x = x.astype(self.norm_dtype)
        variance = ops.mean(x * x, axis=-1, keep_dims=True)
        x = x * ops.rsqrt(variance + self.eps)
        return (x * self.weight.astype(self.norm_dtype)).astype(self.compute_dtype)


def llama3_scaled_frequencies(inv_freq: np.ndarray, rope: dict) -> np.ndarray:
    """Llama 3.1's RoPE scaling: wavelengths longer than original_max / low_freq_factor are
    stretched by `factor`, those shorter than original_max / high_freq_factor are kept, and the
    band between is interpolated smoothly (Meta's reference `apply_scaling`)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rotary_tables(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [max_position_embedding, head_dim] for rotate-half RoPE (frequencies repeated)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, config.rope_scaling)
    angles = np.outer(np.arange(config.max_position_embedding, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class RotaryEmbedding(nn.Cell):
    """Rotate-half RoPE (as in HF Llama): x * cos + rotate_half(x) * sin, for positions 0..S-1."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.rotary_dtype = DTYPES[config.rotary_dtype]
        cos, sin = rotary_tables(config)
        self.cos = Tensor(cos, self.rotary_dtype)
        self.sin = Tensor(sin, self.rotary_dtype)
        # rotate_half(x) = cat(-x2, x1) as x @ a signed permutation: one exact matmul instead of two
        # slices, a negation and a concat (and their gradients), measurably cheaper on CPU
        dim, half = config.head_dim, config.head_dim // 2
        rotate = np.zeros((dim, dim), np.float32)
        rotate[np.arange(half) + half, np.arange(half)] = -1.0
        rotate[np.arange(half), np.arange(half) + half] = 1.0
        self.rotate_half = Tensor(rotate, self.rotary_dtype)
        self.matmul = ops.MatMul()

    def construct(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x [batch, heads, seq, head_dim] -> same shape and dtype; `positions` [batch, seq] (default
        0..seq-1 in every row)."""
        batch, heads, seq, dim = x.shape
        if positions is None:
            cos, sin = self.cos[:seq], self.sin[:seq]
        else:  # [batch, 1, seq, dim]: one table row per token, shared by the heads
            cos = ops.gather(self.cos, positions, 0).expand_dims(1)
            sin = ops.gather(self.sin, positions, 0).expand_dims(1)
        xr = x.astype(self.rotary_dtype)
        rotated = self.matmul(xr.reshape(-1, dim), self.rotate_half).reshape(batch, heads, seq, dim)
        return (xr * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Cell):
    """Causal self-attention with grouped-query KV heads (each KV head serves num_heads/n_kv_heads heads);
    q/k/v biases (Qwen2) and a per-head RMSNorm of q and k before RoPE (Qwen3) when the config says so.
    Under tensor parallelism each rank computes its share of the heads and of the kv heads; the output
    projection sums the ranks' parts. With fewer kv heads than ranks, k and v are computed whole on
    every rank (they are small) and each rank keeps the one kv head its query heads read; their
    gradient is summed over the ranks, so the k/v weights (and their LoRA) get the whole gradient."""

    def __init__(self, config: LlamaConfig, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        self.num_heads = tp.part(config.num_heads, "model.model_config.num_heads")
        kv_split = config.num_kv_heads % tp.size == 0
        self.num_kv_heads = config.num_kv_heads // tp.size if kv_split else 1
        # replicated kv: the kv head of this rank's first query head (mp is a multiple of the kv heads)
        self.kv_head = tp.index * self.num_heads // (config.num_heads // config.num_kv_heads)
        self.kv_grad_sum = None if kv_split else CopyToParallel(tp)
        kv_tp, kv_role = (tp, "out") if kv_split else (NO_PARALLEL, None)
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)  # the fused kernel's; AttentionProbabilities has its own
        self.use_flash_attention = config.use_flash_attention
        hidden, bias = config.hidden_size, config.qkv_has_bias
        q_dim, kv_dim = config.num_heads * self.head_dim, config.num_kv_heads * self.head_dim
        self.wq = Linear(hidden, q_dim, config, has_bias=bias, tp=tp, split="out")
        self.wk = Linear(hidden, kv_dim, config, has_bias=bias, tp=kv_tp, split=kv_role)
        self.wv = Linear(hidden, kv_dim, config, has_bias=bias, tp=kv_tp, split=kv_role)
        self.wo = Linear(q_dim, hidden, config, tp=tp, split="in")
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config)
            self.k_norm = RMSNorm(self.head_dim, config)
        self.rotary = RotaryEmbedding(config)
        self.probabilities = AttentionProbabilities(config)
        self.weighted_sum = ops.BatchMatMul()
        if self.use_flash_attention:
            # 1 marks a discarded (future) position; sparse_mode 2 reads this compressed causal mask.
            self.flash_mask = Tensor(np.triu(np.ones((_FLASH_MASK_SIZE, _FLASH_MASK_SIZE), np.uint8), 1))

    def split_heads(self, x: Tensor, heads: int) -> Tensor:
        """[batch, seq, heads*head_dim] -> [batch, heads, seq, head_dim]."""
        batch, seq = x.shape[0], x.shape[1]
        return x.reshape(batch, seq, heads, self.head_dim).transpose(0, 2, 1, 3)

    def local_kv(self, y: Tensor) -> Tensor:
        """k or v [batch, seq, kv_dim] as this rank's kv heads [batch, heads, seq, head_dim]."""
        if self.kv_grad_sum is not None:
            start = self.kv_head * self.head_dim
            y = self.kv_grad_sum(y)[:, :, start : start + self.head_dim]
        return self.split_heads(y, self.num_kv_heads)

    def construct(self, x: Tensor, docs: Documents | None = None) -> Tensor:
        batch, seq = x.shape[0], x.shape[1]
        positions, blocked, cumulative_lengths = (None, None, None) if docs is None else docs
        q = self.split_heads(self.wq(x), self.num_heads)
        k = self.local_kv(self.wk(x))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        v = self.local_kv(self.wv(x))
        if self.use_flash_attention and docs is not None:
            out = self.flash_attention_packed(q, k, v, cumulative_lengths)
        elif self.use_flash_attention:
            out = self.flash_attention(q, k, v)
        else:
            out = self.dot_product_attention(q, k, v, blocked)
        out = out.transpose(0, 2, 1, 3).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.wo(out)

    def flash_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Ascend fused kernel; takes grouped KV heads natively and applies the causal mask itself."""
        return ops.flash_attention_score(
            q,
            k,
            v,
            self.num_heads,
            attn_mask=self.flash_mask,
            scalar_value=self.scale,
            input_layout="BNSD",
            sparse_mode=2,
        )

    def flash_attention_packed(self, q: Tensor, k: Tensor, v: Tensor, cumulative_lengths: Tensor) -> Tensor:
        """Ascend fused kernel over documents: the batch flattened to tokens (TND layout), each
        document a sequence of its own given by the cumulative lengths, causal inside it."""
        batch, heads, seq, dim = q.shape
        tokens = [t.transpose(0, 2, 1, 3).reshape(batch * seq, t.shape[1], dim) for t in (q, k, v)]
        out = ops.flash_attention_score(
            tokens[0],
            tokens[1],
            tokens[2],
            self.num_heads,
            attn_mask=self.flash_mask,
            scalar_value=self.scale,
            input_layout="TND",
            actual_seq_qlen=cumulative_lengths,
            actual_seq_kvlen=cumulative_lengths,
            sparse_mode=3,
        )
        return out.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3)

    def dot_product_attention(self, q: Tensor, k: Tensor, v: Tensor, blocked: Tensor | None = None) -> Tensor:
        """softmax(q k^T / sqrt(d) + mask) v; `blocked` [batch, 1, seq, seq] (1 = may not attend)
        replaces the causal mask when given."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # query head j reads KV head j // groups
            k = ops.repeat_interleave(k, groups, 1)
            v = ops.repeat_interleave(v, groups, 1)
        return self.weighted_sum(self.probabilities(q, k, blocked), v)


class AttentionProbabilities(nn.Cell):
    """softmax(q k^T / sqrt(d) + mask) in softmax_compute_type, cast to compute_dtype. A cell of its
    own so that `select_recompute` recomputes the [batch, heads, seq, seq] tensors instead of keeping
    them for the backward pass."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.softmax_dtype = DTYPES[config.softmax_compute_type]
        self.mask_value = _MASK_VALUE[self.softmax_dtype]
        # a primitive with a transpose flag: its gradient needs no explicit Transpose of [S, S] tensors
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)

    def construct(self, q: Tensor, k: Tensor, blocked: Tensor | None = None) -> Tensor:
        seq = q.shape[2]
        scores = self.scores_matmul(q * self.scale, k).astype(self.softmax_dtype)
        if blocked is None:
            # additive [seq, seq] bias broadcast over batch and heads: 0 on and below the diagonal
            blocked = ops.triu(ops.ones((seq, seq), self.softmax_dtype), 1)
        scores = scores + blocked.astype(self.softmax_dtype) * self.mask_value
        # softmax as exp(log_softmax): the same values, but MindSpore's LogSoftmaxGrad is one fused
        # kernel where Softmax's gradient runs as four unfused passes over the [S, S] scores
        return ops.exp(ops.log_softmax(scores, axis=-1)).astype(self.compute_dtype)


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 gate, w3 up, w2 down (each rank a slice of the FFN width
    under tensor parallelism)."""

    def __init__(self, config: LlamaConfig, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.w1 = Linear(hidden, ffn, config, tp=tp, split="out")
        self.w2 = Linear(ffn, hidden, config, tp=tp, split="in")
        self.w3 = Linear(hidden, ffn, config, tp=tp, split="out")
        self.activation = SiLU()

    def construct(self, x: Tensor) -> Tensor:
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class SiLU(nn.Cell):
    """silu(x), a cell so that `select_recompute` recomputes it rather than keeping its output."""

    def construct(self, x: Tensor) -> Tensor:
        return ops.silu(x)


class DecoderLayer(nn.Cell):
    """Pre-norm block: h = x + attention(norm(x)); y = h + feed_forward(norm(h))."""

    def __init__(self, config: LlamaConfig, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config)
        self.attention = Attention(config, tp)
        self.ffn_norm = RMSNorm(config.hidden_size, config)
        self.feed_forward = FeedForward(config, tp)

    def construct(self, x: Tensor, docs: Documents | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), docs)
        return h + self.feed_forward(self.ffn_norm(h))


class Embedding(nn.Cell):
    """Token lookup; the table is `embedding_weight` [vocab, hidden] as in MindFormers.

    Under tensor parallelism a rank holds the vocabulary rows [index * V/mp, (index + 1) * V/mp):
    it looks up the ids it holds, zeros the others, and the ranks' rows are summed."""

    def __init__(self, config: LlamaConfig, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        self.compute_dtype = DTYPES[config.compute_dtype]
        rows = tp.part(config.vocab_size, "model.model_config.vocab_size")
        self.embedding_weight = Parameter(
            initializer(Normal(INIT_STD), (rows, config.hidden_size), DTYPES[config.param_init_type]),
            name="embedding_weight",
        )
        self.first_row = tp.index * rows
        self.reduce = ReduceFromParallel(tp) if tp.enabled else None
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, input_ids: Tensor) -> Tensor:
        if self.reduce is None:
            return ops.gather(self.embedding_weight, input_ids, 0).astype(self.compute_dtype)
        local = input_ids - self.first_row
        held = ops.logical_and(local >= 0, local < self.embedding_weight.shape[0])
        rows = ops.gather(self.embedding_weight, ops.where(held, local, ops.zeros_like(local)), 0)
        return self.reduce((rows * held.expand_dims(-1).astype(rows.dtype)).astype(self.compute_dtype))

    def attend(self, h: Tensor) -> Tensor:
        """h [..., hidden] against every row of the table: the tied output head's logits (this
        rank's vocabulary slice under tensor parallelism)."""
        lead = h.shape[:-1]
        table = self.embedding_weight.astype(self.compute_dtype)
        return self.matmul(h.reshape(-1, h.shape[-1]), table).reshape((*lead, table.shape[0]))


def apply_recompute(model: LlamaForCausalLM, recompute: bool, select_recompute: bool) -> None:
    """Activation recomputation (MindFormers' `recompute_config`): `recompute` keeps only each
    decoder layer's input and recomputes the layer in the backward pass; `select_recompute`
    recomputes only the attention probabilities and the FFN activation, the largest tensors per
    FLOP (`llama_core.plan` counts what each keeps)."""
    for layer in model.model.layers:
        if recompute:
            layer.recompute()
        elif select_recompute:
            layer.attention.probabilities.recompute()
            layer.feed_forward.activation.recompute()


# Where the documents of packed rows lie (see `documents`): positions [batch, seq], blocked
# [batch, 1, seq, seq], cumulative lengths [batch * (K + 1)].
Documents = tuple[Tensor, Tensor, Tensor]


def documents(doc_ends: Tensor, seq: int) -> Documents:
    """From the rows' cumulative document ends [batch, K], computed once per batch for every layer:

    - positions: each token's position inside its document (RoPE restarts at 0);
    - blocked: 1 where a query may not attend a key (another document, or the future);
    - cumulative lengths: the flattened batch's document ends (the fused kernel's TND layout); the
      padding after a row's last document is a sequence of its own, unused entries are empty ones.
    """
    batch = doc_ends.shape[0]
    ends = ops.minimum(doc_ends.astype(mstype.int32), seq)
    index = ops.arange(seq, dtype=mstype.int32)
    # document number of each position: how many ends lie at or before it
    document = (ends.expand_dims(1) <= index.reshape(1, seq, 1)).astype(mstype.int32).sum(-1)
    starts = ops.concat((ops.zeros((batch, 1), mstype.int32), ends), 1)
    positions = index.reshape(1, seq) - ops.gather_elements(starts, 1, document)
    same = document.expand_dims(2) == document.expand_dims(1)
    causal = index.reshape(seq, 1) >= index.reshape(1, seq)
    blocked = ops.logical_not(ops.logical_and(same, causal)).expand_dims(1)
    row_ends = ops.concat((ends, ops.fill(mstype.int32, (batch, 1), seq)), 1)
    offsets = (ops.arange(batch, dtype=mstype.int32) * seq).reshape(batch, 1)
    return positions, blocked, (row_ends + offsets).reshape(-1).astype(mstype.int64)


class LlamaModel(nn.Cell):
    """Embedding, decoder layers and the final norm: token ids [batch, seq] -> hidden states."""

    def __init__(self, config: LlamaConfig, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        self.tok_embeddings = Embedding(config, tp)
        self.layers = nn.CellList([DecoderLayer(config, tp) for _ in range(config.num_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config)

    def construct(self, input_ids: Tensor, doc_ends: Tensor | None = None) -> Tensor:
        docs = None if doc_ends is None else documents(doc_ends, input_ids.shape[1])
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, docs)
        return self.norm_out(h)


class LlamaForCausalLM(nn.Cell):
    """The decoder and its output head: `lm_head`, or the embedding table when tie_word_embeddings.

    `construct(input_ids)` returns fp32 logits [batch, seq, vocab].
    `construct(input_ids, labels)` takes stored records of length seq_length+1 and returns the scalar loss
    of docs/REFERENCE.md (model and loss): inputs ids[:, :-1], targets labels[:, 1:],
    mask = (input != pad) and (target != ignore), loss = sum(ce * mask) / (sum(mask) + 1e-8), computed
    LOSS_CHUNK_TOKENS tokens at a time (`llama_core.model.loss`). `doc_ends` (either way) marks packed
    rows' documents. A packed batch's loss is then the mean over every supervised token of the batch,
    as for padded rows: the mean of its documents' own losses weighted by their supervised token
    counts (a document's first label is always ignored, so no target crosses a boundary).

    `tp`: this rank's place in a tensor-parallel group (`llama_core.model.parallel`); every rank
    then holds its slices of the weights, returns the whole logits and the same loss.
    """

    def __init__(self, config: LlamaConfig, tp: TensorParallel = NO_PARALLEL) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, tp)
        # a tied head is the embedding table itself (one Parameter, one name), so it has no Linear
        # of its own and takes no LoRA
        self.tied = config.tie_word_embeddings
        self.lm_head = (
            None if self.tied else Linear(config.hidden_size, config.vocab_size, config, tp=tp, split="out")
        )
        self.cross_entropy = ChunkedCrossEntropy(LOSS_CHUNK_TOKENS, tp)
        self.gather_vocab = GatherLastAxis(tp) if tp.enabled else None
        self.pad_token_id = config.pad_token_id
        self.ignore_token_id = config.ignore_token_id

    def split_parameter_names(self) -> set[str]:
        """The parameters this rank holds a slice of under tensor parallelism (the others are
        replicated over the group): split linears' weights, a column-parallel layer's bias and
        LoRA B, a row-parallel layer's LoRA A, the embedding table."""
        if not self.tp.enabled:
            return set()
        held = {"out": ("weight", "bias", "mindpet_delta_lora_b"), "in": ("weight", "mindpet_delta_lora_a")}
        names = {self.model.tok_embeddings.embedding_weight.name}
        for _, cell in self.cells_and_names():
            if isinstance(cell, Linear) and cell.split is not None:
                params = (getattr(cell, attr, None) for attr in held[cell.split])
                names.update(p.name for p in params if isinstance(p, Parameter))
        return names

    def logits(self, input_ids: Tensor, doc_ends: Tensor | None = None) -> Tensor:
        h = self.model(input_ids, doc_ends)
        logits = self.model.tok_embeddings.attend(h) if self.tied else self.lm_head(h)
        if self.gather_vocab is not None:
            logits = self.gather_vocab(logits)
        return logits.astype(mstype.float32)

    def construct(
        self, input_ids: Tensor, labels: Tensor | None = None, doc_ends: Tensor | None = None
    ) -> Tensor:
        if labels is None:
            return self.logits(input_ids, doc_ends)
        tokens = input_ids[:, :-1]
        targets = labels[:, 1:]
        mask = ops.logical_and(tokens != self.pad_token_id, targets != self.ignore_token_id)
        head = self.model.tok_embeddings if self.tied else self.lm_head
        return self.cross_entropy(self.model(tokens, doc_ends), head, targets, mask.astype(mstype.float32))
