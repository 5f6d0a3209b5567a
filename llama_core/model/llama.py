"""Llama 2 family decoder in MindSpore, readable top to bottom.

Parameter names follow MindFormers 1.3 (reference section 3) so checkpoints interchange:
`model.tok_embeddings.embedding_weight`, `model.layers.<i>.attention.wq|wk|wv|wo.weight`,
`model.layers.<i>.feed_forward.w1|w2|w3.weight`, `model.layers.<i>.attention_norm|ffn_norm.weight`,
`model.norm_out.weight`, `lm_head.weight` (untied).

Precision: parameters are stored in `param_init_type`; matmuls run in `compute_dtype`; RMSNorm in
`layernorm_compute_type`, softmax in `softmax_compute_type`, RoPE in `rotary_dtype`; logits are fp32.
On Ascend `use_flash_attention` switches attention to MindSpore's fused `flash_attention_score`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype
from mindspore.common.initializer import Normal, One, initializer

from llama_core.checkpoint.names import mindformers_ffn_size
from llama_core.errors import ConfigError

logger = logging.getLogger("llama_core.model")

DTYPES = {"float32": mstype.float32, "float16": mstype.float16, "bfloat16": mstype.bfloat16}

# MindFormers `model_config` keys for features that do not change what is trained here (incremental
# inference, parallel layouts, generation defaults, kernel tuning). They are accepted so the reference
# YAML loads as is, and listed in a log line so nothing is dropped without a word.
IGNORED_MINDFORMERS_KEYS = frozenset(
    {
        "type",
        "batch_size",
        "checkpoint_name_or_path",
        "use_past",
        "use_past_shard",
        "is_dynamic",
        "use_kvcache_op",
        "is_flexible_shape",
        "use_rope_slice",
        "use_paged_attention",
        "block_size",
        "num_blocks",
        "offset",
        "repetition_penalty",
        "max_decode_length",
        "top_k",
        "top_p",
        "do_sample",
        "fine_grain_interleave",
        "compute_in_2d",
        "pretrain_seqlen",
        "parallel_config",
        "embedding_init_type",
        "init_method_std",
        "fused_rms_norm",
        "pet_config",  # read by LoraConfig.from_pet_config
    }
)
# MindFormers keys that would change the model (names, maths): accepted only at these values.
NEUTRAL_MINDFORMERS_VALUES: dict[str, tuple[Any, ...]] = {
    "extend_method": ("None", None),
    "scaling_factor": (1.0, None),
    "qkv_concat": (False,),
    "qkv_has_bias": (False,),
    "attn_proj_has_bias": (False,),
    "tie_word_embeddings": (False,),
    "moe_config": (None,),
}

# Llama's standard deviation for the normal init of linear and embedding weights (MindFormers default).
INIT_STD = 0.02
# Added to the scores of future positions, per softmax dtype: exp() of the sum is exactly 0.
_MASK_VALUE = {mstype.float32: -1.0e9, mstype.float16: -6.0e4, mstype.bfloat16: -1.0e9}
# flash_attention_score's compressed causal mask (sparse_mode 2) is always 2048 x 2048.
_FLASH_MASK_SIZE = 2048


@dataclasses.dataclass
class LlamaConfig:
    """Model hyper-parameters, with MindFormers' `model.model_config` key names. Defaults: Llama 2 7B."""

    seq_length: int = 4096
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (as many KV heads as query heads)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    intermediate_size: int | None = None  # explicit FFN size; overrides the multiple_of rule
    rms_norm_eps: float = 1.0e-5
    theta: float = 10000.0
    max_position_embedding: int | None = None  # None: seq_length
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    ignore_token_id: int = -100
    compute_dtype: str = "float32"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: str = "float32"
    param_init_type: str = "float32"
    use_flash_attention: bool = False

    def __post_init__(self) -> None:
        if self.max_position_embedding is None:
            self.max_position_embedding = self.seq_length
        self.validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LlamaConfig:
        """Build from a YAML `model.model_config` mapping.

        Unknown keys raise ConfigError naming them. MindFormers keys for features that do not change
        the trained model (`IGNORED_MINDFORMERS_KEYS`) are skipped and listed in one log line; those that
        would change it (`NEUTRAL_MINDFORMERS_VALUES`: qkv_concat, extend_method...) must keep their
        neutral value or raise ConfigError.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | IGNORED_MINDFORMERS_KEYS | NEUTRAL_MINDFORMERS_VALUES.keys()
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ConfigError(f"model_config: unknown key(s) {', '.join(unknown)}")
        for key, neutral in NEUTRAL_MINDFORMERS_VALUES.items():
            if key in values and values[key] not in neutral:
                allowed = " or ".join(map(repr, neutral))
                raise ConfigError(f"model_config.{key}={values[key]!r} is not supported (only {allowed})")
        ignored = sorted(k for k in values if k in IGNORED_MINDFORMERS_KEYS and k != "pet_config")
        if ignored:
            logger.info(
                "model_config: ignoring MindFormers keys not used by this model: %s", ", ".join(ignored)
            )
        return cls(**{k: v for k, v in values.items() if k in fields})

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Build from a Hugging Face Llama `config.json` mapping; `overrides` set other fields (e.g.
        seq_length, dtypes). Raises ConfigError for HF features this model does not implement."""
        rope = hf.get("rope_parameters") or {}
        unsupported = {
            "model_type": (hf.get("model_type", "llama"), "llama"),
            "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
            "attention_bias": (bool(hf.get("attention_bias", False)), False),
            "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
            "tie_word_embeddings": (bool(hf.get("tie_word_embeddings", False)), False),
            "rope_scaling": (hf.get("rope_scaling"), None),
            "rope_type": (rope.get("rope_type", "default"), "default"),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ConfigError(f"HF config: {key}={value!r} is not supported (only {supported!r})")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if head_dim * heads != hf["hidden_size"]:
            raise ConfigError(
                f"HF config: head_dim {head_dim} x heads {heads} != hidden_size {hf['hidden_size']}"
            )
        max_positions = hf.get("max_position_embeddings", 4096)
        values: dict[str, Any] = {
            "seq_length": min(max_positions, 4096),
            "hidden_size": hf["hidden_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": heads,
            "n_kv_heads": hf.get("num_key_value_heads") or None,
            "vocab_size": hf["vocab_size"],
            "intermediate_size": hf["intermediate_size"],
            "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
            "theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            "max_position_embedding": max_positions,
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(hf.get(key), int):
                values[key] = hf[key]
        if values["n_kv_heads"] == heads:
            values["n_kv_heads"] = None
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError on values that cannot build a model."""
        positive = ("seq_length", "hidden_size", "num_layers", "num_heads", "vocab_size", "multiple_of")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model_config.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model_config.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        kv = self.num_kv_heads
        if not isinstance(kv, int) or kv <= 0 or self.num_heads % kv:
            raise ConfigError(
                f"model_config.n_kv_heads {self.n_kv_heads!r} must be a positive divisor of "
                f"num_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model_config: head dim {self.head_dim} must be even for rotary embeddings")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError(
                f"model_config.intermediate_size must be positive, got {self.intermediate_size}"
            )
        if self.max_position_embedding < self.seq_length:
            raise ConfigError(
                f"model_config.max_position_embedding {self.max_position_embedding} is below "
                f"seq_length {self.seq_length}"
            )
        if self.rms_norm_eps <= 0 or self.theta <= 0:
            raise ConfigError("model_config.rms_norm_eps and theta must be positive")
        for name in (
            "compute_dtype",
            "layernorm_compute_type",
            "softmax_compute_type",
            "rotary_dtype",
            "param_init_type",
        ):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"model_config.{name} {getattr(self, name)!r} is not one of {', '.join(DTYPES)}"
                )
        if self.use_flash_attention:
            if self.compute_dtype == "float32":
                raise ConfigError(
                    "model_config.use_flash_attention needs compute_dtype float16 or bfloat16 "
                    "(flash_attention_score runs on Ascend in half precision)"
                )
            if self.head_dim % 16 or self.head_dim > 512:
                raise ConfigError(
                    f"model_config.use_flash_attention needs a head dim that is a multiple of 16 up to 512, "
                    f"got {self.head_dim}"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width: 2/3 of 4*hidden, times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return mindformers_ffn_size(self.hidden_size, self.multiple_of, self.ffn_dim_multiplier)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every Linear cell, by cell name (as in the built model), without allocating."""
        h, kv_dim, f = self.hidden_size, self.num_kv_heads * self.head_dim, self.ffn_hidden_size
        shapes: dict[str, tuple[int, int]] = {}
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}"
            shapes[f"{prefix}.attention.wq"] = (h, h)
            shapes[f"{prefix}.attention.wk"] = (kv_dim, h)
            shapes[f"{prefix}.attention.wv"] = (kv_dim, h)
            shapes[f"{prefix}.attention.wo"] = (h, h)
            shapes[f"{prefix}.feed_forward.w1"] = (f, h)
            shapes[f"{prefix}.feed_forward.w2"] = (h, f)
            shapes[f"{prefix}.feed_forward.w3"] = (f, h)
        shapes["lm_head"] = (self.vocab_size, h)
        return shapes

    def num_parameters(self) -> int:
        """Total parameters of LlamaForCausalLM, computed arithmetically (7B: 6,738,415,616)."""
        linears = sum(out * inp for out, inp in self.linear_shapes().values())
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return linears + norms + self.vocab_size * self.hidden_size


class Linear(nn.Cell):
    """y = x W^T with W [out, in] stored in param_init_type and multiplied in compute_dtype."""

    def __init__(
        self, in_features: int, out_features: int, config: LlamaConfig, weight: Parameter | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = DTYPES[config.compute_dtype]
        if weight is None:
            weight = Parameter(
                initializer(Normal(INIT_STD), (out_features, in_features), DTYPES[config.param_init_type]),
                name="weight",
            )
        self.weight = weight
        self.matmul = ops.MatMul(transpose_b=True)

    def project(self, x: Tensor, weight: Tensor) -> Tensor:
        """x [..., in] @ weight[out, in]^T, flattened to 2-D for the matmul kernel."""
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]), weight.astype(self.compute_dtype))
        return y.reshape((*lead, weight.shape[0]))

    def construct(self, x: Tensor) -> Tensor:
        return self.project(x.astype(self.compute_dtype), self.weight)


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


def rotary_tables(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [max_position_embedding, head_dim] for rotate-half RoPE (frequencies repeated)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
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

    def construct(self, x: Tensor) -> Tensor:
        """x [batch, heads, seq, head_dim] -> same shape and dtype."""
        batch, heads, seq, dim = x.shape
        cos, sin = self.cos[:seq], self.sin[:seq]
        xr = x.astype(self.rotary_dtype)
        rotated = self.matmul(xr.reshape(-1, dim), self.rotate_half).reshape(batch, heads, seq, dim)
        return (xr * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Cell):
    """Causal self-attention with grouped-query KV heads (each KV head serves num_heads/n_kv_heads heads)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.softmax_dtype = DTYPES[config.softmax_compute_type]
        self.mask_value = _MASK_VALUE[self.softmax_dtype]
        self.use_flash_attention = config.use_flash_attention
        hidden, kv_dim = config.hidden_size, self.num_kv_heads * self.head_dim
        self.wq = Linear(hidden, hidden, config)
        self.wk = Linear(hidden, kv_dim, config)
        self.wv = Linear(hidden, kv_dim, config)
        self.wo = Linear(hidden, hidden, config)
        self.rotary = RotaryEmbedding(config)
        # primitives with transpose flags: their gradients need no explicit Transpose of [S, S] tensors
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)
        self.weighted_sum = ops.BatchMatMul()
        if self.use_flash_attention:
            # 1 marks a discarded (future) position; sparse_mode 2 reads this compressed causal mask.
            self.flash_mask = Tensor(np.triu(np.ones((_FLASH_MASK_SIZE, _FLASH_MASK_SIZE), np.uint8), 1))

    def split_heads(self, x: Tensor, heads: int) -> Tensor:
        """[batch, seq, heads*head_dim] -> [batch, heads, seq, head_dim]."""
        batch, seq = x.shape[0], x.shape[1]
        return x.reshape(batch, seq, heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x: Tensor) -> Tensor:
        batch, seq = x.shape[0], x.shape[1]
        q = self.rotary(self.split_heads(self.wq(x), self.num_heads))
        k = self.rotary(self.split_heads(self.wk(x), self.num_kv_heads))
        v = self.split_heads(self.wv(x), self.num_kv_heads)
        if self.use_flash_attention:
            out = self.flash_attention(q, k, v)
        else:
            out = self.dot_product_attention(q, k, v)
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

    def dot_product_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d) + causal mask) v, with the softmax in softmax_compute_type."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # query head j reads KV head j // groups
            k = ops.repeat_interleave(k, groups, 1)
            v = ops.repeat_interleave(v, groups, 1)
        seq = q.shape[2]
        scores = self.scores_matmul(q * self.scale, k).astype(self.softmax_dtype)
        # additive [seq, seq] bias broadcast over batch and heads: 0 on and below the diagonal
        future = ops.triu(ops.ones((seq, seq), self.softmax_dtype), 1)
        scores = scores + future * self.mask_value
        # softmax as exp(log_softmax): the same values, but MindSpore's LogSoftmaxGrad is one fused
        # kernel where Softmax's gradient runs as four unfused passes over the [S, S] scores
        probs = ops.exp(ops.log_softmax(scores, axis=-1)).astype(self.compute_dtype)
        return self.weighted_sum(probs, v)


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 gate, w3 up, w2 down."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.ffn_hidden_size
        self.w1 = Linear(hidden, ffn, config)
        self.w2 = Linear(ffn, hidden, config)
        self.w3 = Linear(hidden, ffn, config)

    def construct(self, x: Tensor) -> Tensor:
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Cell):
    """Pre-norm block: h = x + attention(norm(x)); y = h + feed_forward(norm(h))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config)
        self.feed_forward = FeedForward(config)

    def construct(self, x: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Embedding(nn.Cell):
    """Token lookup; the table is `embedding_weight` [vocab, hidden] as in MindFormers."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.embedding_weight = Parameter(
            initializer(
                Normal(INIT_STD), (config.vocab_size, config.hidden_size), DTYPES[config.param_init_type]
            ),
            name="embedding_weight",
        )

    def construct(self, input_ids: Tensor) -> Tensor:
        return ops.gather(self.embedding_weight, input_ids, 0).astype(self.compute_dtype)


class LlamaModel(nn.Cell):
    """Embedding, decoder layers and the final norm: token ids [batch, seq] -> hidden states."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.tok_embeddings = Embedding(config)
        self.layers = nn.CellList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.norm_out = RMSNorm(config.hidden_size, config)

    def construct(self, input_ids: Tensor) -> Tensor:
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm_out(h)


class LlamaForCausalLM(nn.Cell):
    """Llama with an untied lm_head.

    `construct(input_ids)` returns fp32 logits [batch, seq, vocab].
    `construct(input_ids, labels)` takes stored records of length seq_length+1 and returns the scalar loss
    of reference section 3: inputs ids[:, :-1], targets labels[:, 1:], mask = (input != pad) and
    (target != ignore), loss = sum(ce * mask) / (sum(mask) + 1e-8).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, config)
        self.pad_token_id = config.pad_token_id
        self.ignore_token_id = config.ignore_token_id

    def logits(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.model(input_ids)).astype(mstype.float32)

    def construct(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            return self.logits(input_ids)
        tokens = input_ids[:, :-1]
        targets = labels[:, 1:]
        logits = self.logits(tokens)
        mask = ops.logical_and(tokens != self.pad_token_id, targets != self.ignore_token_id)
        mask = mask.astype(mstype.float32)
        # ignored targets (-100) are out of range for the gather; they are masked out afterwards
        safe_targets = ops.where(targets == self.ignore_token_id, ops.zeros_like(targets), targets)
        log_probs = ops.log_softmax(logits, axis=-1)
        nll = -ops.gather_elements(log_probs, -1, safe_targets.expand_dims(-1)).squeeze(-1)
        return ops.sum(nll * mask) / (ops.sum(mask) + 1e-8)
