"""The one HF <-> MindSpore name table for the Llama family (docs/REFERENCE.md), with shapes and slicing.

Each row names a parameter on both sides, its shape in terms of the model's sizes, how tensor
parallelism slices it (Megatron style) and which pipeline stage holds it:

| MindSpore name (HF name)                                   | shape        | TP split              | stage |
|------------------------------------------------------------|--------------|-----------------------|-------|
| model.tok_embeddings.embedding_weight (model.embed_tokens) | [vocab, h]   | rows (vocab)          | first |
| layers.i.attention_norm (input_layernorm)                  | [h]          | replicated            | layer |
| layers.i.attention.wq (self_attn.q_proj)                   | [heads*d, h] | rows (whole heads)    | layer |
| layers.i.attention.wk, wv (self_attn.k_proj, v_proj)       | [kv*d, h]    | rows (whole kv heads) | layer |
| layers.i.attention.wo (self_attn.o_proj)                   | [h, heads*d] | columns               | layer |
| layers.i.ffn_norm (post_attention_layernorm)               | [h]          | replicated            | layer |
| layers.i.feed_forward.w1, w3 (mlp.gate_proj, up_proj)      | [ffn, h]     | rows                  | layer |
| layers.i.feed_forward.w2 (mlp.down_proj)                   | [h, ffn]     | columns               | layer |
| model.norm_out (model.norm)                                | [h]          | replicated            | last  |
| lm_head (lm_head)                                          | [vocab, h]   | rows (vocab)          | last  |
| layers.i.attention.wq.bias (self_attn.q_proj.bias), Qwen2  | [heads*d]    | rows (whole heads)    | layer |
| layers.i.attention.wk, wv .bias (k_proj, v_proj), Qwen2    | [kv*d]       | rows (whole kv heads) | layer |
| layers.i.attention.q_norm, k_norm (self_attn.q_norm, k_norm), Qwen3 | [d] | replicated         | layer |

(`layers.i` is `model.layers.i`, stage "layer" is the stage of layer i; every name ends
in `.weight` except the embedding's and the biases.) The sizes and which rows a model has come from
`LlamaConfig.dims`, the model's config: biases with `qkv_bias`, q/k norms with `qk_norm`, and no
`lm_head` when `tied` (the head is the embedding table).

LoRA (`<linear>.mindpet_delta_lora_a` [r, in], `_lora_b` [out, r]; older files say `tk_delta_`)
follows its linear: for a row-split linear B is split by rows and A replicated, for a
column-split one A is split by columns and B replicated. Optimizer states `adam_m.<p>` and
`adam_v.<p>` follow `<p>`. Training scalars (a name without a dot, at most one element, such as
`global_step`) are replicated on every rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama_core.errors import InputError
from llama_core.model.config import LORA_PREFIXES, LlamaDims

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")


@dataclass(frozen=True)
class Param:
    """One row of the table. `{i}` stands for the layer index."""

    ms: str
    hf: str
    shape: tuple[str, ...]
    tp_axis: int | None  # axis split by tensor parallelism; None = replicated
    stage: str  # "first", "layer" or "last"
    when: str = "always"  # which models have it: "always", "qkv_bias", "qk_norm" or "untied"

    def present(self, dims: LlamaDims) -> bool:
        return {
            "always": True,
            "qkv_bias": dims.qkv_bias,
            "qk_norm": dims.qk_norm,
            "untied": not dims.tied,
        }[self.when]


TABLE: tuple[Param, ...] = (
    Param("model.tok_embeddings.embedding_weight", "model.embed_tokens.weight", ("vocab", "h"), 0, "first"),
    Param(
        "model.layers.{i}.attention_norm.weight",
        "model.layers.{i}.input_layernorm.weight",
        ("h",),
        None,
        "layer",
    ),
    Param(
        "model.layers.{i}.attention.wq.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
        ("q", "h"),
        0,
        "layer",
    ),
    Param(
        "model.layers.{i}.attention.wk.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        ("kv", "h"),
        0,
        "layer",
    ),
    Param(
        "model.layers.{i}.attention.wv.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
        ("kv", "h"),
        0,
        "layer",
    ),
    Param(
        "model.layers.{i}.attention.wo.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
        ("h", "q"),
        1,
        "layer",
    ),
    Param(
        "model.layers.{i}.ffn_norm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        ("h",),
        None,
        "layer",
    ),
    Param(
        "model.layers.{i}.feed_forward.w1.weight",
        "model.layers.{i}.mlp.gate_proj.weight",
        ("ffn", "h"),
        0,
        "layer",
    ),
    Param(
        "model.layers.{i}.feed_forward.w2.weight",
        "model.layers.{i}.mlp.down_proj.weight",
        ("h", "ffn"),
        1,
        "layer",
    ),
    Param(
        "model.layers.{i}.feed_forward.w3.weight",
        "model.layers.{i}.mlp.up_proj.weight",
        ("ffn", "h"),
        0,
        "layer",
    ),
    Param("model.norm_out.weight", "model.norm.weight", ("h",), None, "last"),
    Param("lm_head.weight", "lm_head.weight", ("vocab", "h"), 0, "last", "untied"),
    *(
        Param(
            f"model.layers.{{i}}.attention.{ms}.bias",
            f"model.layers.{{i}}.self_attn.{hf}.bias",
            (size,),
            0,
            "layer",
            "qkv_bias",
        )
        for ms, hf, size in (("wq", "q_proj", "q"), ("wk", "k_proj", "kv"), ("wv", "v_proj", "kv"))
    ),
    *(
        Param(
            f"model.layers.{{i}}.attention.{norm}.weight",
            f"model.layers.{{i}}.self_attn.{norm}.weight",
            ("d",),
            None,
            "layer",
            "qk_norm",
        )
        for norm in ("q_norm", "k_norm")
    ),
)

# HF buffers that are recomputed from the config, not weights (older HF checkpoints hold them).
HF_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + r"\Z")


_MS_RE = [(_compile(p.ms), p) for p in TABLE]
_HF_RE = [(_compile(p.hf), p) for p in TABLE]


@dataclass(frozen=True)
class Match:
    """A name resolved against the table: the row and the layer index (None outside layers)."""

    param: Param
    layer: int | None

    @property
    def ms_name(self) -> str:
        return self.param.ms.replace("{i}", str(self.layer))

    @property
    def hf_name(self) -> str:
        return self.param.hf.replace("{i}", str(self.layer))

    def shape(self, dims: LlamaDims) -> tuple[int, ...]:
        return tuple(dims.size(s) for s in self.param.shape)


def _lookup(name: str, table: list[tuple[re.Pattern[str], Param]], dims: LlamaDims | None) -> Match | None:
    for regex, param in table:
        m = regex.match(name)
        if m and (dims is None or param.present(dims)):
            layer = int(m.group(1)) if m.groups() else None
            if dims is not None and layer is not None and layer >= dims.layers:
                raise InputError(f"tensor {name!r}: layer {layer} but the config has {dims.layers} layers")
            return Match(param, layer)
    return None


def match_ms(name: str, dims: LlamaDims | None = None) -> Match | None:
    """The table row of a MindSpore base-weight name, or None (also for a row `dims` has not)."""
    return _lookup(name, _MS_RE, dims)


def match_hf(name: str, dims: LlamaDims | None = None) -> Match | None:
    """The table row of an HF base-weight name, or None (also for a row `dims` has not)."""
    return _lookup(name, _HF_RE, dims)


def hf_to_ms(name: str) -> str:
    """HF name -> MindSpore name (InputError for a name outside the table)."""
    m = match_hf(name)
    if m is None:
        raise InputError(f"tensor {name!r}: not a Llama weight name known to the HF -> MindSpore table")
    return m.ms_name


def ms_to_hf(name: str) -> str:
    """MindSpore name -> HF name (InputError for a name outside the table)."""
    m = match_ms(name)
    if m is None:
        raise InputError(f"tensor {name!r}: not a Llama weight name known to the MindSpore -> HF table")
    return m.hf_name


def check_shape(name: str, shape: tuple[int, ...], match: Match, dims: LlamaDims) -> None:
    """Fail naming the tensor when its shape is not the one the config implies."""
    expected = match.shape(dims)
    if tuple(shape) != expected:
        raise InputError(
            f"tensor {name!r}: shape {list(shape)} does not match the config, expected {list(expected)}"
        )


def expected_ms_names(dims: LlamaDims) -> list[str]:
    """Every base weight a complete checkpoint of `dims` holds: the embedding, each layer's, the rest."""
    rows = [p for p in TABLE if p.present(dims)]
    per_layer = [p.ms for p in rows if "{i}" in p.ms]
    first = [p.ms for p in rows if p.stage == "first"]
    last = [p.ms for p in rows if p.stage == "last"]
    return first + [n.replace("{i}", str(i)) for i in range(dims.layers) for n in per_layer] + last


def split_lora_name(name: str) -> tuple[str, str, str] | None:
    """'m.wq.mindpet_delta_lora_a' -> ('m.wq', 'mindpet_delta_', 'a'); None for other names."""
    for prefix in LORA_PREFIXES:
        for ab in ("a", "b"):
            suffix = f".{prefix}lora_{ab}"
            if name.endswith(suffix):
                return name[: -len(suffix)], prefix, ab
    return None


def is_training_scalar(name: str, numel: int) -> bool:
    """Step counters and loss scale: a dot-free name with at most one element."""
    return "." not in name and numel <= 1


PEFT_PREFIX = "base_model.model."
_PEFT_LORA = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight\Z")


def ms_lora_to_peft(name: str) -> str:
    """'model.layers.0.attention.wq.mindpet_delta_lora_a' -> PEFT's
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    parts = split_lora_name(name)
    if parts is None:
        raise InputError(f"tensor {name!r}: not a LoRA weight")
    hf_linear = ms_to_hf(parts[0] + ".weight")[: -len(".weight")]
    return f"{PEFT_PREFIX}{hf_linear}.lora_{parts[2].upper()}.weight"


def peft_to_ms_lora(name: str) -> str:
    """PEFT adapter tensor name (with or without the adapter name) -> MindSpore LoRA name."""
    m = _PEFT_LORA.match(name)
    if m is None or not name.startswith(PEFT_PREFIX):
        raise InputError(f"tensor {name!r}: not a PEFT LoRA weight of a Llama linear layer")
    ms_linear = hf_to_ms(m.group(1)[len(PEFT_PREFIX) :] + ".weight")[: -len(".weight")]
    return f"{ms_linear}.{LORA_PREFIXES[0]}lora_{m.group(2).lower()}"


def lora_pairs(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """Group LoRA weights by linear: {linear: (a_name, b_name)}; a lone half or a rank mismatch fails.

    Optimizer states of LoRA weights (adam_m.*, adam_v.*) are not LoRA weights and are ignored.
    """
    halves: dict[str, dict[str, str]] = {}
    for name in shapes:
        parts = None if name.startswith(OPTIMIZER_PREFIXES) else split_lora_name(name)
        if parts:
            halves.setdefault(parts[0], {})[parts[2]] = name
    pairs = {}
    for linear, ab in halves.items():
        if set(ab) != {"a", "b"}:
            present = next(iter(ab.values()))
            raise InputError(f"tensor {present!r}: its LoRA partner ({'b' if 'a' in ab else 'a'}) is missing")
        a, b = shapes[ab["a"]], shapes[ab["b"]]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InputError(f"tensor {ab['a']!r} {list(a)} and {ab['b']!r} {list(b)} are not a LoRA pair")
        pairs[linear] = (ab["a"], ab["b"])
    return pairs
