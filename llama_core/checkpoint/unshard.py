"""Rebuild one complete .ckpt from a distributed checkpoint (the inverse of `shard`).

`python -m llama_core.checkpoint.unshard --load_checkpoint DIR --output_path OUT.ckpt`

For a folder written by `shard` the slices are concatenated back tensor by tensor, in the source's
order, with its CRC trailer if it had one: the result is byte-identical to a source written by
MindSpore or by this package. So is a tensor-parallel training run's checkpoint folder (its newest
step). A folder with neither (data-parallel training output) must hold the full model on each
rank; rank 0's tensors are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llama_core.atomic import atomic_path, clean_leftovers, disk_full_stage
from llama_core.cache import StageKey, manifest_path_for, write_manifest
from llama_core.checkpoint.msckpt import CkptWriter
from llama_core.checkpoint.sources import CheckpointSource
from llama_core.cli import exit_code
from llama_core.progress import Progress
from llama_core.train.outputs import CHECKPOINT_DIR, checkpoint_file, newest_checkpoint, read_trained_layout

log = logging.getLogger("llama_core.checkpoint.unshard")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class UnshardResult:
    output_path: Path
    manifest_path: Path
    tensors: int
    bytes_written: int
    cached: bool


def unshard_checkpoint(
    load_checkpoint: str | os.PathLike[str], output_path: str | os.PathLike[str]
) -> UnshardResult:
    """Write the complete checkpoint held by `load_checkpoint` to `output_path` (atomic, cached)."""
    out = Path(output_path)
    manifest_path = manifest_path_for(out)
    with CheckpointSource(load_checkpoint) as src:
        key = StageKey(manifest_path, "checkpoint.unshard", FORMAT_VERSION, src.files, {"kind": src.kind})
        if key.hit():
            log.info("cache hit: %s is already the complete form of %s", out, src.path)
            return UnshardResult(out, manifest_path, len(src.tensors), 0, True)
        clean_leftovers(out.parent, out.name)
        progress = Progress(
            f"unshard {src.path.name}", sum(t.nbytes for t in src.tensors), "bytes", logger=log
        )
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            writer = CkptWriter(f, crc=src.crc)
            for meta in src.tensors:
                writer.write(meta.name, src.read(meta), meta.dtype)
                progress.update(meta.nbytes)
            writer.finish()
        progress.close()
        write_manifest(
            manifest_path,
            stage="checkpoint.unshard",
            key=key.value(),
            outputs=[out],
            extra={"source": str(src.path.resolve()), "kind": src.kind, "tensors": len(src.tensors)},
        )
    return UnshardResult(out, manifest_path, len(src.tensors), writer.bytes_written, False)


@disk_full_stage("unshard", "path")
def complete_checkpoint(path: str | os.PathLike[str], what: str) -> Path:
    """A checkpoint argument as one complete file (`train.outputs.checkpoint_file`), where a
    tensor-parallel run's folder (its `checkpoint/parallel.json`) is first unsharded, once, into
    `checkpoint/complete/` under its rank 0 newest checkpoint's name."""
    path = Path(path)
    folder = next((f for f in (path, path / CHECKPOINT_DIR) if read_trained_layout(f) is not None), None)
    if folder is None:
        return checkpoint_file(path, what)
    newest = newest_checkpoint(folder / "rank_0")
    return unshard_checkpoint(folder, folder / "complete" / newest.name).output_path


def build_parser(prog: str = "python -m llama_core.checkpoint.unshard") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Rebuild one complete .ckpt from a folder of rank_<i>/ checkpoints.",
    )
    p.add_argument("--load_checkpoint", required=True, help="distributed checkpoint folder (rank_<i>/)")
    p.add_argument("--output_path", required=True, help="complete .ckpt to write")
    return p


def stage_from_args(args: argparse.Namespace) -> UnshardResult:
    """The unsharding the parsed command line asks for."""
    return unshard_checkpoint(args.load_checkpoint, args.output_path)


def main(argv: Sequence[str] | None = None) -> int:
    res = stage_from_args(build_parser().parse_args(argv))
    print(json.dumps({"output_path": str(res.output_path), "tensors": res.tensors, "cached": res.cached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
