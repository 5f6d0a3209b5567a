"""The Llama model's configuration: sizes, dtypes, RoPE, norm eps and token ids, in one dataclass.

It reads a run YAML's `model.model_config` (MindFormers' key names) and a Hugging Face `config.json`,
and writes the latter. It imports no MindSpore: the checkpoint tools, which never build the model,
take their tensor shapes (`LlamaConfig.dims`) from the same object the model is built from, so a
size rule (the FFN width) or a LoRA parameter name is stated once.
"""

from __future__ import annotations

import dataclasses
import logging
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
    "qkv_has_bias": (False,),
    "attn_proj_has_bias": (False,),
    "tie_word_embeddings": (False,),
    "moe_config": (None,),
}


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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def size(self, symbol: str) -> int:
        """The size a shape symbol of the name table stands for."""
        return {
            "h": self.hidden,
            "q": self.heads * self.head_dim,
            "kv": self.kv_heads * self.head_dim,
            "ffn": self.ffn,
            "vocab": self.vocab,
        }[symbol]


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
        """Build from a Hugging Face Llama `config.json` mapping; `overrides` set other fields (e.g.
        seq_length, dtypes).

        HF features this model does not implement raise ConfigError, unless `check_features` is off:
        tools that only move tensors (conversion) read the sizes of, say, a tied or rope-scaled model.
        """
        if check_features:
            _check_hf_features(hf)
        rope = hf.get("rope_parameters") or {}
        try:
            hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
            head_dim = hf.get("head_dim") or hidden // heads
            if head_dim * heads != hidden:
                raise ConfigError(f"HF config: head_dim {head_dim} x heads {heads} != hidden_size {hidden}")
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
                "theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                "max_position_embedding": max_positions,
            }
        except KeyError as exc:
            raise ConfigError(f"HF config lacks {exc.args[0]!r}") from None
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(hf.get(key), int):
                values[key] = hf[key]
        values.update(overrides)
        return cls(**values)

    def to_hf_config(self, torch_dtype: str) -> dict[str, Any]:
        """The `config.json` of a Hugging Face LlamaForCausalLM of this shape, stored as `torch_dtype`."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": float(self.rms_norm_eps),
            "rope_theta": float(self.theta),
            "max_position_embeddings": int(self.max_position_embedding),
            "bos_token_id": int(self.bos_token_id),
            "eos_token_id": int(self.eos_token_id),
            "pad_token_id": int(self.pad_token_id),
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
        }

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
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

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
        )

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


def _check_hf_features(hf: Mapping[str, Any]) -> None:
    """Raise ConfigError for an HF config feature the model does not implement."""
    rope = hf.get("rope_parameters") or {}
    supported = {
        "model_type": (hf.get("model_type", "llama"), "llama"),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "tie_word_embeddings": (bool(hf.get("tie_word_embeddings", False)), False),
        "rope_scaling": (hf.get("rope_scaling"), None),
        "rope_type": (rope.get("rope_type", "default"), "default"),
    }
    for key, (value, only) in supported.items():
        if value != only:
            raise ConfigError(f"HF config: {key}={value!r} is not supported (only {only!r})")
