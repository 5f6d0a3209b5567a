"""Parallel layouts: which rank holds which slice of which tensor, and the shard manifest.

Rank numbering follows MindSpore's device matrix for pipeline x data x model parallelism:
`rank = stage * (dp * mp) + dp_index * mp + mp_index` (model parallel innermost, so a tensor
parallel group sits on adjacent devices). Layers go to stages as MindFormers assigns them:
`stage(layer) = min(layer // max((layers + 1) // pp, 1), pp - 1)`; the embedding lives on the
first stage, `model.norm_out` and `lm_head` on the last. Slicing per tensor: see `names`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_core.checkpoint.names import (
    OPTIMIZER_PREFIXES,
    LlamaDims,
    check_shape,
    dims_from_model_config,
    is_training_scalar,
    match_ms,
    split_lora_name,
)
from llama_core.errors import ConfigError, InputError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llama_core.shard/1"


@dataclass(frozen=True)
class Layout:
    """data_parallel x model_parallel x pipeline_stage."""

    dp: int = 1
    mp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.mp * self.pp

    def rank(self, stage: int, d: int, m: int) -> int:
        return stage * self.dp * self.mp + d * self.mp + m

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (stage, dp index, mp index)."""
        stage, rest = divmod(rank, self.dp * self.mp)
        d, m = divmod(rest, self.mp)
        return stage, d, m

    def as_dict(self) -> dict[str, int]:
        return {"data_parallel": self.dp, "model_parallel": self.mp, "pipeline_stage": self.pp}


def layout_from_config(cfg: Mapping[str, Any]) -> Layout:
    """The layout of a run config's `parallel_config` (absent keys: 1)."""
    pc = cfg.get("parallel_config") or {}
    values = {}
    for key in ("data_parallel", "model_parallel", "pipeline_stage"):
        value = pc.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"config key 'parallel_config.{key}' must be a positive integer, got {value!r}")
        values[key] = value
    return Layout(values["data_parallel"], values["model_parallel"], values["pipeline_stage"])


def dims_from_run_config(cfg: Mapping[str, Any]) -> LlamaDims:
    """Model sizes from a run config's `model.model_config`."""
    mc = (cfg.get("model") or {}).get("model_config")
    if not isinstance(mc, Mapping):
        raise ConfigError("config key 'model.model_config' is missing or not a mapping")
    return dims_from_model_config(mc)


def check_layout(layout: Layout, dims: LlamaDims) -> None:
    """Fail, naming the config key and the tensor, when a size does not split over the layout."""
    mp = layout.mp
    splits = [
        ("model.model_config.num_heads", dims.heads, "model.layers.0.attention.wq.weight"),
        ("model.model_config.n_kv_heads", dims.kv_heads, "model.layers.0.attention.wk.weight"),
        ("FFN width (intermediate_size / multiple_of)", dims.ffn, "model.layers.0.feed_forward.w1.weight"),
        ("model.model_config.vocab_size", dims.vocab, "model.tok_embeddings.embedding_weight"),
    ]
    for key, size, tensor in splits:
        if size % mp:
            raise ConfigError(
                f"{key} = {size} is not divisible by parallel_config.model_parallel = {mp} "
                f"(tensor {tensor!r} cannot be split)"
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


def place(name: str, shape: tuple[int, ...], dims: LlamaDims, pp: int) -> Placement:
    """Placement of one tensor of a complete checkpoint; InputError (naming it) if it does not fit."""
    all_stages = tuple(range(pp))
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix):
            return place(name[len(prefix) :], shape, dims, pp)
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
    if lora is None:
        check_shape(name, shape, m, dims)
        return Placement(m.param.tp_axis, (stage,))
    out_features, in_features = m.shape(dims)
    ab = lora[2]
    if len(shape) != 2 or (ab == "a" and shape[1] != in_features) or (ab == "b" and shape[0] != out_features):
        want = f"[r, {in_features}]" if ab == "a" else f"[{out_features}, r]"
        raise InputError(f"tensor {name!r}: shape {list(shape)} does not match the config, expected {want}")
    # LoRA B [out, r] follows a row split of its linear, A [r, in] a column split.
    axis = {("a", 1): 1, ("b", 0): 0}.get((ab, m.param.tp_axis))
    return Placement(axis, (stage,))


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
