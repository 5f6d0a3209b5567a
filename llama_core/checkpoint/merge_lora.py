"""Merge LoRA into the base weights: one complete checkpoint without adapters or optimizer state.

`python -m llama_core.checkpoint.merge_lora --base_checkpoint BASE --output_path OUT.ckpt
     [--lora_checkpoint LORA] (--config CFG | --lora_alpha A)`

For every linear with `mindpet_delta_lora_a` A [r, in] and `_lora_b` B [out, r] (or the older
`tk_delta_` names): W += (B @ A) * alpha / r, computed in fp32 and stored in W's type. BASE may
itself hold the LoRA weights (a full training checkpoint); LORA (e.g. a LoRA-only training
checkpoint) takes precedence when given. Optimizer states (adam_m.*, adam_v.*) and step counters
are dropped (counted in the result and logged). Either input may be a .ckpt or a rank_<i>/ folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import atomic_path, clean_leftovers, disk_full_stage
from llama_core.cache import StageKey, manifest_path_for, write_manifest
from llama_core.checkpoint.dtypes import cast
from llama_core.checkpoint.lora_args import lora_alpha
from llama_core.checkpoint.msckpt import CkptWriter
from llama_core.checkpoint.names import OPTIMIZER_PREFIXES, is_training_scalar, lora_pairs, split_lora_name
from llama_core.checkpoint.sources import CheckpointSource
from llama_core.cli import exit_code
from llama_core.errors import InputError
from llama_core.progress import Progress

log = logging.getLogger("llama_core.checkpoint.merge_lora")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class MergeResult:
    output_path: Path
    manifest_path: Path
    merged: list[str]  # linears that received their LoRA update
    dropped: list[str] = field(default_factory=list)  # LoRA, optimizer and step tensors left out
    cached: bool = False


def _read_lora(src: CheckpointSource) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    metas = {m.name: m for m in src.tensors}
    pairs = lora_pairs({n: m.shape for n, m in metas.items()})
    out = {}
    for linear, (a, b) in pairs.items():
        out[linear] = (
            cast(src.read(metas[a]), metas[a].dtype, "F32"),
            cast(src.read(metas[b]), metas[b].dtype, "F32"),
        )
    return out


@disk_full_stage("merge_lora", "output_path")
def merge_lora(
    base_checkpoint: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    lora_checkpoint: str | os.PathLike[str] | None = None,
    alpha: float | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> MergeResult:
    """Write base + LoRA as one complete checkpoint at `output_path` (atomic, cached).

    `alpha` defaults to the run config's pet_config.lora_alpha; r is read from the LoRA shapes.
    """
    out = Path(output_path)
    manifest_path = manifest_path_for(out)
    alpha_value = lora_alpha(alpha, config)
    with CheckpointSource(base_checkpoint) as base:
        if lora_checkpoint is not None:
            with CheckpointSource(lora_checkpoint) as lsrc:
                lora = _read_lora(lsrc)
                lora_files = list(lsrc.files)
        else:
            lora, lora_files = _read_lora(base), []
        if not lora:
            raise InputError(
                f"{lora_checkpoint or base_checkpoint}: no LoRA weights (mindpet_delta_lora_a/b) found"
            )
        keep, dropped = [], []
        for meta in base.tensors:
            numel = int(np.prod(meta.shape, dtype=np.int64))
            if (
                split_lora_name(meta.name)
                or meta.name.startswith(OPTIMIZER_PREFIXES)
                or is_training_scalar(meta.name, numel)
            ):
                dropped.append(meta.name)
            else:
                keep.append(meta)
        names = {m.name: m for m in keep}
        for linear, (a, b) in lora.items():
            w = names.get(f"{linear}.weight")
            if w is None:
                raise InputError(
                    f"tensor {linear}.weight (base of its LoRA weights) is missing from {base.path}"
                )
            if (b.shape[0], a.shape[1]) != w.shape:
                raise InputError(
                    f"tensor {linear}.weight: shape {list(w.shape)} does not match its LoRA B @ A "
                    f"[{b.shape[0]}, {a.shape[1]}]"
                )
        params = {"alpha": alpha_value, "lora_separate": lora_checkpoint is not None}
        key = StageKey(
            manifest_path, "checkpoint.merge_lora", FORMAT_VERSION, [*base.files, *lora_files], params
        )
        if key.hit():
            log.info("cache hit: %s is already this merge", out)
            return MergeResult(out, manifest_path, sorted(lora), dropped, True)
        clean_leftovers(out.parent, out.name)
        progress = Progress(f"merge {base.path.name}", sum(m.nbytes for m in keep), "bytes", logger=log)
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            writer = CkptWriter(f)
            for meta in keep:
                arr = base.read(meta)
                linear = meta.name[: -len(".weight")] if meta.name.endswith(".weight") else None
                if linear in lora:
                    a, b = lora[linear]
                    merged = cast(arr, meta.dtype, "F32") + (b @ a) * np.float32(alpha_value / a.shape[0])
                    arr = cast(merged.astype(np.float32), "F32", meta.dtype)
                writer.write(meta.name, arr, meta.dtype)
                progress.update(meta.nbytes)
            writer.finish()
        progress.close()
        write_manifest(
            manifest_path,
            stage="checkpoint.merge_lora",
            key=key.value(),
            outputs=[out],
            extra={"alpha": alpha_value, "merged": sorted(lora), "dropped": len(dropped)},
        )
    log.info("merged LoRA into %d linears; left out %d LoRA/optimizer/step tensors", len(lora), len(dropped))
    return MergeResult(out, manifest_path, sorted(lora), dropped, False)


def build_parser(prog: str = "python -m llama_core.checkpoint.merge_lora") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Merge LoRA into the base weights (W += B @ A * alpha / r); drop optimizer state.",
    )
    p.add_argument(
        "--base_checkpoint", required=True, help="base (or full training) .ckpt or rank_<i>/ folder"
    )
    p.add_argument("--lora_checkpoint", help="checkpoint holding the LoRA weights, if not in the base one")
    p.add_argument("--output_path", required=True, help="merged .ckpt to write")
    p.add_argument("--config", help="run config YAML (pet_config.lora_alpha)")
    p.add_argument("--lora_alpha", type=float, help="LoRA alpha (overrides the config)")
    return p


def stage_from_args(args: argparse.Namespace) -> MergeResult:
    """The merge the parsed command line asks for."""
    return merge_lora(
        args.base_checkpoint, args.output_path, args.lora_checkpoint, args.lora_alpha, args.config
    )


def main(argv: Sequence[str] | None = None) -> int:
    res = stage_from_args(build_parser().parse_args(argv))
    print(json.dumps({"output_path": str(res.output_path), "merged": len(res.merged), "cached": res.cached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
