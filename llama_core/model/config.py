"""The Llama model's configuration: sizes, dtypes, RoPE, norm eps and token ids, in one dataclass.

One decoder covers the families users fine-tune; their differences are a few switches here:

| family          | HF model_type | what differs from Llama 2                                          |
|-----------------|---------------|--------------------------------------------------------------------|
| Llama 2         | llama         | -                                                                  |
| Llama 3.x       | llama         | theta 5e5, `rope_scaling` llama3 (3.1+), tied head (3.2 1B/3B)     |
| Qwen2 / Qwen2.5 | qwen2         | `qkv_has_bias`, theta 1e6, tied head (small sizes)                 |
| Qwen3 (dense)   | qwen3         | `qk_norm` (RMSNorm per head on q and k), explicit `head_dim`       |

It reads a run YAML's `model.model_config` (MindFormers' key names) and a Hugging Face `config.json`
(whose `model_type` decides the family; anything not implemented is refused by name), and writes the
latter. It imports no MindSpore: the checkpoint tools, which never build the model,
take their tensor shapes (`LlamaConfig.dims`) from the same object the model is built from, so a
size rule (the FFN width) or a LoRA parameter name is stated once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from llama_core.errors import ConfigError

logger = logging.getLogger("llama_core.model")

# Suffix prefixes of the LoRA parameters on a Linear: MindPet's first, then the older name.
LORA_PREFIXES = ("mindpet_delta_", "tk_delta_")

# Names the *_dtype / *_type fields accept (the model maps them to MindSpore dtypes).
DTYPE_NAMES = ("float32", "float16", "bfloat16")
_DTYPE_FIELDS = (
    "compute_dtype",
    "layernorm_compute_type",
    "softmax_compute_type",
    "rotary_dtype",
    "param_init_type",
)

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
    "attn_proj_has_bias": (False,),
    "moe_config": (None,),
}

# The HF families this model implements, and the HF class each one exports as.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Llama 3.1's RoPE frequency scaling: the keys `rope_scaling` must hold (HF's names).
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaDims:
    """The sizes that fix every parameter's shape, as the checkpoint name table spells them.

    Built only by `LlamaConfig.dims`; its fields are what a shard manifest records as the model.
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False
    qk_norm: bool = False
    tied: bool = False  # lm_head is the embedding table: no lm_head.weight of its own

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    def size(self, symbol: str) -> int:
        """The size a shape symbol of the name table stands for."""
        return {
            "h": self.hidden,
            "d": self.head_dim,
            "q": self.heads * self.head_dim,
            "kv": self.kv_heads * self.head_dim,
            "ffn": self.ffn,
            "vocab": self.vocab,
        }[symbol]

    def describe(self) -> dict[str, Any]:
        """The fields as a manifest records them; a Llama 2 shape reads as it always has (the
        family switches appear only when set), so shard caches made before them still hit."""
        doc = dataclasses.asdict(self)
        defaults = {"head_dim": self.hidden // self.heads, "qkv_bias": False, "qk_norm": False, "tied": False}
        return {k: v for k, v in doc.items() if k not in defaults or v != defaults[k]}


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
    head_dim: int | None = None  # None: hidden_size // num_heads (Qwen3 gives it explicitly)
    qkv_has_bias: bool = False  # Qwen2: q, k and v projections carry a bias
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    tie_word_embeddings: bool = False  # the output head is the embedding table (Llama 3.2 1B/3B)
    rope_scaling: dict[str, Any] | None = None  # {rope_type: llama3, factor, low_freq_factor, ...}
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
        if self.head_dim is None:
            if isinstance(self.num_heads, int) and self.num_heads > 0 and self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model_config.hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads} (give head_dim explicitly)"
                )
            self.head_dim = self.hidden_size // self.num_heads if self.num_heads else 0
        self.validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LlamaConfig:
        """Build from a YAML `model.model_config` mapping.

        Unknown keys raise ConfigError naming them. MindFormers keys for features that do not change
        the trained model (`IGNORED_MINDFORMERS_KEYS`) are skipped and listed in one log line; those that
        would change it (`NEUTRAL_MINDFORMERS_VALUES`: qkv_concat, extend_method...) must keep their
        neutral value or raise ConfigError.
        """
        values = _mindformers_rope_scaling(values)
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
    def from_run_config(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        """Build from a whole run config (its `model.model_config`)."""
        model_config = (cfg.get("model") or {}).get("model_config")
        if not isinstance(model_config, Mapping):
            raise ConfigError("config key 'model.model_config' is missing or not a mapping")
        return cls.from_dict(model_config)

    @classmethod
    def from_hf_config(
        cls, hf: Mapping[str, Any], *, check_features: bool = True, **overrides: Any
    ) -> LlamaConfig:
        """Build from a Hugging Face `config.json` mapping of a Llama, Qwen2 or Qwen3 model;
        `overrides` set other fields (e.g. seq_length, dtypes).

        RoPE is read in both spellings: the published files' `rope_theta` + `rope_scaling`, and
        transformers 5's `rope_parameters`. HF features this model does not implement raise
        ConfigError naming them, unless `check_features` is off (tools that only read the sizes).
        """
        if check_features:
            _check_hf_features(hf)
        model_type = hf.get("model_type", "llama")
        rope = _hf_rope(hf)
        try:
            hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
            max_positions = hf.get("max_position_embeddings", 4096)
            kv_heads = hf.get("num_key_value_heads") or heads
            values: dict[str, Any] = {
                "seq_length": min(max_positions, 4096),
                "hidden_size": hidden,
                "num_layers": hf["num_hidden_layers"],
                "num_heads": heads,
                "n_kv_heads": None if kv_heads == heads else kv_heads,
                "vocab_size": hf["vocab_size"],
                "intermediate_size": hf["intermediate_size"],
                "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
                "theta": rope.pop("rope_theta", 10000.0),
                "max_position_embedding": max_positions,
                "head_dim": hf.get("head_dim") or hidden // heads,
                "qkv_has_bias": model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                "qk_norm": model_type == "qwen3",
                "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
                "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
            }
        except KeyError as exc:
            raise ConfigError(f"HF config lacks {exc.args[0]!r}") from None
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(hf.get(key), int):
                values[key] = hf[key]
        if isinstance(hf.get("eos_token_id"), list) and hf["eos_token_id"]:
            values["eos_token_id"] = hf["eos_token_id"][0]  # Llama 3.1 lists its end-of-turn ids too
        values.update(overrides)
        return cls(**values)

    @property
    def hf_model_type(self) -> str:
        """The HF family of this shape: q/k norm is Qwen3's, a q/k/v bias Qwen2's, else Llama."""
        return "qwen3" if self.qk_norm else "qwen2" if self.qkv_has_bias else "llama"

    def to_hf_config(self, torch_dtype: str) -> dict[str, Any]:
        """The `config.json` of the Hugging Face model of this shape, stored as `torch_dtype`."""
        model_type = self.hf_model_type
        hf: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[model_type]],
            "model_type": model_type,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": float(self.rms_norm_eps),
            "rope_theta": float(self.theta),
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": int(self.max_position_embedding),
            "bos_token_id": int(self.bos_token_id),
            "eos_token_id": int(self.eos_token_id),
            "pad_token_id": int(self.pad_token_id),
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": torch_dtype,
        }
        if model_type == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        if model_type == "qwen2":
            hf.update(use_sliding_window=False)
        if model_type == "qwen3":
            hf.update(attention_bias=False, use_sliding_window=False)
        return hf

    def validate(self) -> None:
        """Raise ConfigError on values that cannot build a model."""
        positive = (
            "seq_length", "hidden_size", "num_layers", "num_heads", "vocab_size", "multiple_of", "head_dim"
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model_config.{name} must be a positive integer, got {value!r}")
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
        if not all(0 < value < math.inf for value in (self.rms_norm_eps, self.theta)):  # NaN fails too
            raise ConfigError("model_config.rms_norm_eps and theta must be positive")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        for name in _DTYPE_FIELDS:
            if getattr(self, name) not in DTYPE_NAMES:
                raise ConfigError(
                    f"model_config.{name} {getattr(self, name)!r} is not one of {', '.join(DTYPE_NAMES)}"
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
    def num_kv_heads(self) -> int:
        return self.num_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width, as MindFormers sizes it: 2/3 of 4*hidden, times ffn_dim_multiplier, rounded
        up to multiple_of (unless intermediate_size gives it)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        width = int(2 * (4 * self.hidden_size) / 3)
        if self.ffn_dim_multiplier is not None:
            width = int(self.ffn_dim_multiplier * width)
        return self.multiple_of * ((width + self.multiple_of - 1) // self.multiple_of)

    @property
    def dims(self) -> LlamaDims:
        return LlamaDims(
            hidden=self.hidden_size,
            layers=self.num_layers,
            heads=self.num_heads,
            kv_heads=self.num_kv_heads,
            ffn=self.ffn_hidden_size,
            vocab=self.vocab_size,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_has_bias,
            qk_norm=self.qk_norm,
            tied=self.tie_word_embeddings,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every Linear cell, by cell name (as in the built model), without allocating."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, int]] = {}
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}"
            shapes[f"{prefix}.attention.wq"] = (q_dim, h)
            shapes[f"{prefix}.attention.wk"] = (kv_dim, h)
            shapes[f"{prefix}.attention.wv"] = (kv_dim, h)
            shapes[f"{prefix}.attention.wo"] = (h, q_dim)
            shapes[f"{prefix}.feed_forward.w1"] = (f, h)
            shapes[f"{prefix}.feed_forward.w2"] = (h, f)
            shapes[f"{prefix}.feed_forward.w3"] = (f, h)
        if not self.tie_word_embeddings:  # a tied head is the embedding table, not a Linear
            shapes["lm_head"] = (self.vocab_size, h)
        return shapes

    def num_parameters(self) -> int:
        """Total parameters of LlamaForCausalLM, computed arithmetically (7B: 6,738,415,616)."""
        linears = sum(out * inp for out, inp in self.linear_shapes().values())
        norms = (2 * self.num_layers + 1) * self.hidden_size
        per_layer = 0
        if self.qkv_has_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return linears + norms + self.num_layers * per_layer + self.vocab_size * self.hidden_size


def _mindformers_rope_scaling(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """MindFormers spells Llama 3.1's RoPE scaling `extend_method: LLAMA3` with the numbers under
    `scaling_factor`; read it as `rope_scaling` (rope_type llama3). Other values pass unchanged."""
    if values.get("extend_method") != "LLAMA3":
        return values
    scaling = values.get("scaling_factor")
    if not isinstance(scaling, Mapping):
        raise ConfigError(
            "model_config.extend_method LLAMA3 needs scaling_factor as a mapping of its numbers"
        )
    if values.get("rope_scaling") is not None:
        raise ConfigError("model_config: give either rope_scaling or extend_method LLAMA3, not both")
    rest = {k: v for k, v in values.items() if k not in ("extend_method", "scaling_factor")}
    return {**rest, "rope_scaling": {"rope_type": "llama3", **scaling}}


def _hf_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings in one dict (rope_theta, rope_type and its parameters), from transformers 5's
    `rope_parameters` or the published files' `rope_theta` + `rope_scaling` (older files say `type`)."""
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    if "rope_theta" in hf:
        rope.setdefault("rope_theta", hf["rope_theta"])
    return rope


def _check_rope_scaling(rope: Mapping[str, Any]) -> None:
    """Only Llama 3.1's frequency scaling is implemented; its four numbers must be there and sane."""
    rope_type = rope.get("rope_type")
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling rope_type={rope_type!r} is not supported (only 'llama3')")
    missing = [k for k in LLAMA3_ROPE_KEYS if not isinstance(rope.get(k), (int, float))]
    if missing:
        raise ConfigError(f"rope_scaling (llama3) lacks a number for {', '.join(missing)}")
    if rope["factor"] <= 0 or not 0 < rope["low_freq_factor"] < rope["high_freq_factor"]:
        raise ConfigError(
            "rope_scaling (llama3) needs factor > 0 and 0 < low_freq_factor < high_freq_factor, got "
            f"{rope['factor']}, {rope['low_freq_factor']}, {rope['high_freq_factor']}"
        )


def _check_hf_features(hf: Mapping[str, Any]) -> None:
    """Raise ConfigError for an HF config feature the model does not implement."""
    model_type = hf.get("model_type", "llama")
    if model_type not in HF_ARCHITECTURES:
        raise ConfigError(
            f"HF config: model_type={model_type!r} is not supported (only {', '.join(HF_ARCHITECTURES)})"
        )
    rope = _hf_rope(hf)
    supported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "use_sliding_window": (bool(hf.get("use_sliding_window", False)), False),
        # Qwen2 always has its q/k/v bias (no key); Llama's attention_bias would add one to o too
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
    }
    for key, (value, only) in supported.items():
        if value != only:
            raise ConfigError(f"HF config: {key}={value!r} is not supported (only {only!r})")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        try:
            _check_rope_scaling(rope)
        except ConfigError as exc:
            raise ConfigError(f"HF config: {exc}") from None
