"""Parallel layouts: which rank holds which slice of which tensor, and the shard manifest.

The layout itself (`Layout`, read from `parallel_config` by `layout_from_config`, rank numbering
included) lives with the run config in `llama_core.config`. Layers go to stages as MindFormers
assigns them: `stage(layer) = min(layer // max((layers + 1) // pp, 1), pp - 1)`; the embedding lives on the
first stage, `model.norm_out` and `lm_head` on the last. Slicing per tensor: see `names`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_core.checkpoint.names import (
    OPTIMIZER_PREFIXES,
    Match,
    check_shape,
    is_training_scalar,
    match_ms,
    split_lora_name,
)
from llama_core.config import Layout
from llama_core.errors import ConfigError, InputError
from llama_core.model.config import LlamaDims

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llama_core.shard/1"


def kv_replicated(dims: LlamaDims, mp: int) -> bool:
    """Whether k/v projections are whole on every rank: fewer kv heads than model_parallel ranks
    (each rank then uses the one kv head its query heads read; `check_layout` requires mp to be a
    multiple of the kv heads)."""
    return dims.kv_heads % mp != 0


def check_layout(layout: Layout, dims: LlamaDims) -> None:
    """Fail, naming the config key and the tensor, when a size does not split over the layout."""
    mp = layout.mp
    splits = [
        ("model.model_config.num_heads", dims.heads, "model.layers.0.attention.wq.weight"),
        ("FFN width (intermediate_size / multiple_of)", dims.ffn, "model.layers.0.feed_forward.w1.weight"),
        ("model.model_config.vocab_size", dims.vocab, "model.tok_embeddings.embedding_weight"),
    ]
    for key, size, tensor in splits:
        if size % mp:
            raise ConfigError(
                f"{key} = {size} is not divisible by parallel_config.model_parallel = {mp} "
                f"(tensor {tensor!r} cannot be split)"
            )
    if kv_replicated(dims, mp) and mp % dims.kv_heads:
        raise ConfigError(
            f"model.model_config.n_kv_heads = {dims.kv_heads} is not divisible by "
            f"parallel_config.model_parallel = {mp}, nor is model_parallel a multiple of it (tensor "
            "'model.layers.0.attention.wk.weight' can be neither split by kv heads nor replicated one "
            "kv head per rank)"
        )
    if dims.tied and layout.pp > 1:
        raise ConfigError(
            "model.model_config.tie_word_embeddings: a tied output head (the embedding table, on the "
            "first stage) cannot run with parallel_config.pipeline_stage > 1"
        )
    if layout.pp > dims.layers:
        raise ConfigError(
            f"parallel_config.pipeline_stage = {layout.pp} > model.model_config.num_layers = {dims.layers}"
        )


def stage_of_layer(layer: int, layers: int, pp: int) -> int:
    return min(layer // max((layers + 1) // pp, 1), pp - 1)


def stage_layer_ranges(layers: int, pp: int) -> list[list[int]]:
    """[first, last] layer of each stage."""
    ranges: list[list[int]] = [[] for _ in range(pp)]
    for layer in range(layers):
        ranges[stage_of_layer(layer, layers, pp)].append(layer)
    return [[r[0], r[-1]] if r else [] for r in ranges]


@dataclass(frozen=True)
class Placement:
    """Where a tensor goes: TP axis (None = replicated) and the stages holding it."""

    axis: int | None
    stages: tuple[int, ...]


def place(name: str, shape: tuple[int, ...], dims: LlamaDims, pp: int, mp: int = 1) -> Placement:
    """Placement of one tensor of a complete checkpoint; InputError (naming it) if it does not fit."""
    all_stages = tuple(range(pp))
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix):
            return place(name[len(prefix) :], shape, dims, pp, mp)
    numel = 1
    for d in shape:
        numel *= d
    if is_training_scalar(name, numel):
        return Placement(None, all_stages)
    lora = split_lora_name(name)
    base_name = f"{lora[0]}.weight" if lora else name
    m = match_ms(base_name, dims)
    if m is None:
        raise InputError(f"tensor {name!r}: not a Llama weight, LoRA weight, optimizer state or step counter")
    stage = {"first": 0, "last": pp - 1}.get(m.param.stage)
    if stage is None:
        stage = stage_of_layer(m.layer or 0, dims.layers, pp)
    axis = _linear_axis(m, dims, mp)
    if lora is None:
        check_shape(name, shape, m, dims)
        return Placement(axis, (stage,))
    out_features, in_features = m.shape(dims)
    ab = lora[2]
    if len(shape) != 2 or (ab == "a" and shape[1] != in_features) or (ab == "b" and shape[0] != out_features):
        want = f"[r, {in_features}]" if ab == "a" else f"[{out_features}, r]"
        raise InputError(f"tensor {name!r}: shape {list(shape)} does not match the config, expected {want}")
    return Placement(_lora_axis(ab, axis), (stage,))


def _linear_axis(m: Match, dims: LlamaDims, mp: int) -> int | None:
    """The table's split axis, except for k/v projections replicated over too few kv heads."""
    kv = ".attention.wk." in m.param.ms or ".attention.wv." in m.param.ms
    return None if kv and kv_replicated(dims, mp) else m.param.tp_axis


def _lora_axis(ab: str, linear_axis: int | None) -> int | None:
    """LoRA B [out, r] follows a row split of its linear, A [r, in] a column split."""
    return {("a", 1): 1, ("b", 0): 0}.get((ab, linear_axis))


def split_axis(name: str, dims: LlamaDims, mp: int) -> int | None:
    """The axis `mp`-way tensor parallelism splits tensor `name` along (None: replicated), from its
    name alone: what a rank's slice must be concatenated along to rebuild the whole tensor."""
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix):
            return split_axis(name[len(prefix) :], dims, mp)
    if "." not in name:  # a training scalar
        return None
    lora = split_lora_name(name)
    m = match_ms(f"{lora[0]}.weight" if lora else name, dims)
    if m is None:
        raise InputError(f"tensor {name!r}: not a Llama weight, LoRA weight, optimizer state or step counter")
    axis = _linear_axis(m, dims, mp)
    return axis if lora is None else _lora_axis(lora[2], axis)


def slice_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    step = size // parts
    return [(i * step, (i + 1) * step) for i in range(parts)]


def read_shard_manifest(folder: Path) -> dict[str, Any] | None:
    """The shard manifest of a folder written by `shard`, or None."""
    path = folder / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if doc.get("format") == MANIFEST_FORMAT else None
