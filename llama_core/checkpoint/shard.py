"""Shard a Llama checkpoint to a run config's parallel layout (the pipeline's "checkpoint shard").

`python -m llama_core.checkpoint.shard --load_checkpoint SRC --config CFG --output_dir DIR`

SRC is a complete .ckpt or a distributed folder of rank_<i>/. DIR receives
`rank_<i>/checkpoint_<i>.ckpt` for every rank of data_parallel x model_parallel x pipeline_stage
(from the config's `parallel_config`) and `manifest.json` (layout, per-tensor slices, source
digest). Tensor parallel slicing is Megatron style (table in `llama_core.checkpoint.names`):

| tensor                                     | split over model_parallel ranks   |
|--------------------------------------------|-----------------------------------|
| attention.wq/wk/wv, feed_forward.w1/w3     | output rows (q: whole heads, k/v: whole kv heads*) |
| attention.wo, feed_forward.w2              | input columns                     |
| tok_embeddings, lm_head                    | vocabulary rows                   |
| attention_norm, ffn_norm, norm_out         | replicated                        |
| LoRA B / A of a row / column split linear  | rows / columns (the other one replicated) |
| adam_m.* / adam_v.*                        | as their parameter                |

(*) With fewer kv heads than model_parallel ranks (a multiple of them), k/v and their LoRA are
replicated whole: each rank computes them and keeps the kv head its query heads read.

Pipeline stages get whole layers (MindFormers' assignment, see `layout`), the embedding on the
first stage and norm_out/lm_head on the last. Data-parallel replicas never get copies: ranks that
hold the same slices share one file through hard links, and with model_parallel = pipeline_stage
= 1 every rank is a hard link to the source file itself (a symbolic link when DIR is on another
file system). A hard link is a regular file to every loader, costs no bytes, and keeps the data
even if the source path is later replaced or deleted.

Streaming: one complete tensor (plus its slices) in memory at a time. Nothing outside DIR is
touched; DIR appears complete or not at all; an identical request is a cache hit.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import atomic_path, clean_leftovers, disk_full_stage
from llama_core.cache import StageKey, content_id, write_manifest
from llama_core.checkpoint.layout import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Placement,
    check_layout,
    place,
    slice_bounds,
    stage_layer_ranges,
)
from llama_core.checkpoint.msckpt import CkptWriter, sub_ranges
from llama_core.checkpoint.names import expected_ms_names
from llama_core.checkpoint.sources import CheckpointSource, TensorMeta
from llama_core.cli import exit_code
from llama_core.config import Layout, apply_overrides, layout_from_config, load_config, parse_override_args
from llama_core.errors import InputError
from llama_core.model.config import LlamaConfig
from llama_core.progress import Progress

log = logging.getLogger("llama_core.checkpoint.shard")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardResult:
    """The sharded folder (or the one found complete, `cached=True`)."""

    output_dir: Path
    manifest_path: Path
    layout: dict[str, int]
    world_size: int
    rank_files: list[Path]
    bytes_written: int  # data bytes written by this run (links and the manifest excluded)
    link: str  # how replicas share data: "hardlink", "symlink" (to the source) or "none"
    cached: bool


def _plan(src: CheckpointSource, layout: Layout, dims: Any) -> list[tuple[TensorMeta, Placement]]:
    plan = []
    for meta in src.tensors:
        p = place(meta.name, meta.shape, dims, layout.pp, layout.mp)
        if p.axis is not None and meta.shape[p.axis] % layout.mp:
            raise InputError(
                f"tensor {meta.name!r}: dimension {p.axis} of shape {list(meta.shape)} does not split over "
                f"model_parallel = {layout.mp}"
            )
        plan.append((meta, p))
    present = {m.name for m in src.tensors}
    for name in expected_ms_names(dims):
        if name not in present:
            raise InputError(
                f"{src.path}: tensor {name!r} is missing (the checkpoint is not a complete model)"
            )
    return plan


def _link(target: Path, link: Path) -> str:
    """Hard link `link` to `target`; a symbolic link when they are on different file systems."""
    try:
        os.link(target, link)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    os.symlink(target.resolve(), link)
    return "symlink"


class _Scratch:
    """Reusable uint8 buffers (0: whole tensor, 1: column slice), grown to the largest size asked:
    one allocation instead of a fresh, page-faulting one per tensor."""

    def __init__(self) -> None:
        self._bufs = [np.empty(0, np.uint8), np.empty(0, np.uint8)]

    def get(self, i: int, nbytes: int) -> np.ndarray:
        if self._bufs[i].nbytes < nbytes:
            self._bufs[i] = np.empty(nbytes, np.uint8)
        return self._bufs[i]


def _write_ranks(
    src: CheckpointSource, plan: list[tuple[TensorMeta, Placement]], layout: Layout, tmp: Path
) -> tuple[int, str]:
    """Write one file per (stage, mp index), link the data-parallel replicas; return bytes, link kind."""
    for r in range(layout.world_size):
        (tmp / f"rank_{r}").mkdir()

    def path_of(rank: int) -> Path:
        return tmp / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"

    if layout.mp == 1 and layout.pp == 1 and src.kind in ("complete", "replicated"):
        kinds = {_link(src.files[0], path_of(r)) for r in range(layout.world_size)}
        return 0, kinds.pop()

    primaries = {(s, m): layout.rank(s, 0, m) for s in range(layout.pp) for m in range(layout.mp)}
    files = {key: open(path_of(rank), "wb") for key, rank in primaries.items()}  # noqa: SIM115
    writers = {key: CkptWriter(f, crc=src.crc) for key, f in files.items()}
    scratch = _Scratch()
    progress = Progress(
        f"shard {src.path.name}", total=sum(meta.nbytes for meta, _ in plan), unit="bytes", logger=log
    )
    try:
        for meta, p in plan:
            bounds = slice_bounds(meta.shape[p.axis], layout.mp) if p.axis is not None else None
            located = src.file_ranges(meta) if p.axis in (None, 0) else None
            if located is not None:
                # Whole tensors and row blocks are byte ranges of the source: copy them in the kernel.
                fd, ranges = located
                row_bytes = meta.nbytes // meta.shape[0] if meta.shape and meta.shape[0] else 0
                for stage in p.stages:
                    for m in range(layout.mp):
                        shape, part = meta.shape, ranges
                        if bounds is not None:
                            lo, hi = bounds[m]
                            shape = (hi - lo, *meta.shape[1:])
                            part = sub_ranges(ranges, lo * row_bytes, (hi - lo) * row_bytes)
                        writers[(stage, m)].write_ranges(meta.name, shape, meta.dtype, fd, part)
            else:
                full = src.read(meta, out=scratch.get(0, meta.nbytes))
                for stage in p.stages:
                    for m in range(layout.mp):
                        piece = full
                        if bounds is not None:
                            lo, hi = bounds[m]
                            piece = full[lo:hi] if p.axis == 0 else full[:, lo:hi]
                        if not piece.flags.c_contiguous:
                            dense = (
                                scratch.get(1, piece.nbytes)[: piece.nbytes]
                                .view(piece.dtype)
                                .reshape(piece.shape)
                            )
                            np.copyto(dense, piece)
                            piece = dense
                        writers[(stage, m)].write(meta.name, piece, meta.dtype)
                del full
            progress.update(meta.nbytes)
        for w in writers.values():
            w.finish()
    finally:
        for f in files.values():
            f.close()
    progress.close()
    kind = "none"
    for r in range(layout.world_size):
        stage, d, m = layout.coords(r)
        if d:
            kind = _link(path_of(primaries[(stage, m)]), path_of(r))
    return sum(w.bytes_written for w in writers.values()), kind


def _manifest_extra(
    src: CheckpointSource, plan: list[tuple[TensorMeta, Placement]], layout: Layout, dims: Any, link: str
) -> dict[str, Any]:
    tensors = []
    for meta, p in plan:
        bounds = slice_bounds(meta.shape[p.axis], layout.mp) if p.axis is not None else None
        tensors.append(
            {
                "name": meta.name,
                "dtype": meta.dtype,
                "shape": list(meta.shape),
                "axis": p.axis,
                "stages": list(p.stages),
                "slices": [list(b) for b in bounds] if bounds else None,
            }
        )
    ranks = []
    for r in range(layout.world_size):
        stage, d, m = layout.coords(r)
        ranks.append({"rank": r, "stage": stage, "dp": d, "mp": m, "file": f"rank_{r}/checkpoint_{r}.ckpt"})
    return {
        "format": MANIFEST_FORMAT,
        "layout": {**layout.as_dict(), "world_size": layout.world_size},
        "rank_order": "rank = stage * (data_parallel * model_parallel) + dp * model_parallel + mp",
        "stage_layers": stage_layer_ranges(dims.layers, layout.pp),
        "model": dims.describe(),
        "link": link,
        "source": {
            "path": str(src.path.resolve()),
            "kind": src.kind,
            "crc": src.crc,
            "digest": {str(f.resolve()): content_id(f) for f in src.files},
        },
        "ranks": ranks,
        "tensors": tensors,
    }


@disk_full_stage("shard", "output_dir")
def shard_checkpoint(
    load_checkpoint: str | os.PathLike[str],
    config: str | os.PathLike[str] | Mapping[str, Any],
    output_dir: str | os.PathLike[str],
) -> ShardResult:
    """Shard `load_checkpoint` into `output_dir` for the layout of `config` (a YAML path or a dict)."""
    cfg = config if isinstance(config, Mapping) else load_config(config)
    layout = layout_from_config(cfg)
    dims = LlamaConfig.from_run_config(cfg).dims
    check_layout(layout, dims)
    out = Path(output_dir)
    manifest_path = out / MANIFEST_NAME
    with CheckpointSource(load_checkpoint) as src:
        plan = _plan(src, layout, dims)
        params = {"layout": layout.as_dict(), "model": dims.describe(), "source_kind": src.kind}
        key = StageKey(manifest_path, "checkpoint.shard", FORMAT_VERSION, src.files, params)
        rank_files = [out / f"rank_{r}" / f"checkpoint_{r}.ckpt" for r in range(layout.world_size)]
        hit = key.hit()
        if hit is not None:
            log.info("cache hit: %s already holds this sharding of %s", out, src.path)
            return ShardResult(
                out,
                manifest_path,
                layout.as_dict(),
                layout.world_size,
                rank_files,
                0,
                hit.extra["link"],
                True,
            )
        if out.resolve() == src.path.resolve() or src.path.resolve().is_relative_to(out.resolve()):
            raise InputError(f"{out}: the output folder must not contain the source checkpoint {src.path}")
        clean_leftovers(out.parent, out.name)
        log.info(
            "sharding %s (%s) for dp %d x mp %d x pp %d into %s",
            src.path,
            src.kind,
            layout.dp,
            layout.mp,
            layout.pp,
            out,
        )
        with atomic_path(out) as tmp:
            tmp.mkdir()
            written, link = _write_ranks(src, plan, layout, tmp)
            write_manifest(
                tmp / MANIFEST_NAME,
                stage="checkpoint.shard",
                key=key.value(),
                outputs=[tmp / f"rank_{r}" / f"checkpoint_{r}.ckpt" for r in range(layout.world_size)],
                extra={**_manifest_extra(src, plan, layout, dims, link), "bytes_written": written},
            )
    log.info("wrote %s: %d ranks, %d data bytes, replicas by %s", out, layout.world_size, written, link)
    return ShardResult(
        out, manifest_path, layout.as_dict(), layout.world_size, rank_files, written, link, False
    )


class _ShardParser(argparse.ArgumentParser):
    """Keeps the words it does not know (`--a.b.c value` config overrides) as `args.overrides`."""

    def parse_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, rest = self.parse_known_args(args, namespace)
        parsed.overrides = rest
        return parsed


def build_parser(prog: str = "python -m llama_core.checkpoint.shard") -> argparse.ArgumentParser:
    p = _ShardParser(
        prog=prog,
        description="Shard a Llama checkpoint to the parallel layout of a run config.",
        epilog="Extra --a.b.c value arguments override config keys, e.g. --parallel_config.model_parallel 2.",
    )
    p.add_argument("--load_checkpoint", required=True, help="complete .ckpt or folder of rank_<i>/")
    p.add_argument("--config", required=True, help="run config YAML (parallel_config, model.model_config)")
    p.add_argument("--output_dir", required=True, help="folder to create (replaced as a whole)")
    return p


def stage_from_args(args: argparse.Namespace) -> ShardResult:
    """The sharding the parsed command line asks for, with its config overrides applied."""
    cfg = apply_overrides(load_config(args.config), parse_override_args(args.overrides))
    return shard_checkpoint(args.load_checkpoint, cfg, args.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    res = stage_from_args(build_parser().parse_args(argv))
    print(json.dumps({"output_dir": str(res.output_dir), "world_size": res.world_size, "cached": res.cached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
