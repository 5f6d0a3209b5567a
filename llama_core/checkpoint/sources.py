"""A checkpoint to read whole tensors from: a complete .ckpt, or a distributed folder of rank_<i>/.

A distributed folder written by `shard` (it has the shard manifest) is reassembled tensor by tensor
from its slices, so re-sharding never materialises the complete checkpoint. So is a tensor-parallel
training run's checkpoint folder (it has the trainer's `parallel.json`), from the newest checkpoint
of each rank of its first tensor-parallel group, which must all be of the same step. A folder with
neither (the trainer's data-parallel output) must hold the complete model on every rank; rank 0's
newest checkpoint (`train.outputs.newest_checkpoint`) is read and the others are checked to hold
the same tensors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_core.checkpoint.dtypes import storage_dtype
from llama_core.checkpoint.layout import read_shard_manifest, split_axis
from llama_core.checkpoint.msckpt import STR_TYPE, CkptReader, has_crc_trailer, scan_ckpt
from llama_core.config import Layout
from llama_core.errors import InputError
from llama_core.model.config import LlamaDims
from llama_core.train.outputs import CheckpointName, find_rank_folders, newest_checkpoint, read_trained_layout

log = logging.getLogger("llama_core.checkpoint.sources")


@dataclass(frozen=True)
class TensorMeta:
    """A tensor of the complete checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Size of the data (0 for string entries)."""
        return (
            0
            if self.dtype == STR_TYPE
            else int(np.prod(self.shape, dtype=np.int64)) * storage_dtype(self.dtype).itemsize
        )


def rank_folders(folder: Path, world_size: int | None = None) -> list[Path]:
    """rank_0 .. rank_<n-1> of a distributed checkpoint; a gap or a missing rank names the folder."""
    found = find_rank_folders(folder)
    if not found:
        raise InputError(f"{folder}: neither a .ckpt file nor a folder of rank_<i>/ sub-folders")
    n = world_size if world_size is not None else max(found) + 1
    for i in range(n):
        if i not in found:
            raise InputError(f"{folder / f'rank_{i}'}: rank folder is missing")
    return [found[i] for i in range(n)]


class CheckpointSource:
    """Whole tensors of a complete or distributed checkpoint, read one at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: checkpoint not found")
        self.manifest = read_shard_manifest(self.path) if self.path.is_dir() else None
        self._readers: dict[Path, CkptReader] = {}
        if self.path.is_file():
            self.kind = "complete"
            self.files = [self.path]
            reader = self._reader(self.path)
            self.tensors = [TensorMeta(e.name, e.shape, e.dtype) for e in reader.entries.values()]
            self.crc = has_crc_trailer(self.path)
        elif self.manifest is not None:
            self.kind = "sharded"
            self._init_sharded()
        elif (trained := read_trained_layout(self.path)) is not None:
            self.kind = "sharded"
            self._init_trained(trained)
        else:
            self.kind = "replicated"
            self._init_replicated()

    # -- set-up
    def _reader(self, path: Path) -> CkptReader:
        if path not in self._readers:
            self._readers[path] = CkptReader(path)
        return self._readers[path]

    def _init_replicated(self) -> None:
        files = [newest_checkpoint(f) for f in rank_folders(self.path)]
        first = self._reader(files[0])
        self.tensors = [TensorMeta(e.name, e.shape, e.dtype) for e in first.entries.values()]
        want = {t.name: (t.shape, t.dtype) for t in self.tensors}
        for f in files[1:]:
            # Index only (no data read): every rank must hold the same complete set of tensors.
            got = {e.name: (e.shape, e.dtype) for e in scan_ckpt(f)}
            for name in want.keys() | got.keys():
                if want.get(name) != got.get(name):
                    raise InputError(
                        f"{f}: tensor {name!r} is {got.get(name)} but {files[0]} has {want.get(name)}; "
                        f"a distributed checkpoint without a shard manifest must hold the full model on "
                        f"every rank"
                    )
        self.files = [files[0]]
        self.crc = has_crc_trailer(files[0])

    def _init_sharded(self) -> None:
        doc = self.manifest
        assert doc is not None
        lay = doc["layout"]
        self.layout = Layout(lay["data_parallel"], lay["model_parallel"], lay["pipeline_stage"])
        folders = rank_folders(self.path, self.layout.world_size)
        self._rank_files = [f / f"checkpoint_{i}.ckpt" for i, f in enumerate(folders)]
        for f in self._rank_files:
            if not f.is_file():
                raise InputError(f"{f}: rank checkpoint is missing")
        self.tensors = [TensorMeta(t["name"], tuple(t["shape"]), t["dtype"]) for t in doc["tensors"]]
        self._placement = {t["name"]: (t["axis"], t["stages"][0]) for t in doc["tensors"]}
        unique: dict[tuple[int, int], Path] = {}
        for f in self._rank_files:
            st = f.stat()
            unique.setdefault((st.st_dev, st.st_ino), f)
        self.files = [self.path / "manifest.json", *unique.values()]
        self.crc = bool(doc["source"].get("crc", False))

    def _init_trained(self, doc: dict) -> None:
        lay = doc["layout"]
        self.layout = Layout(lay["data_parallel"], lay["model_parallel"], lay["pipeline_stage"])
        dims = LlamaDims(**doc["model"])
        folders = rank_folders(self.path, self.layout.world_size)
        self._rank_files = [newest_checkpoint(f) for f in folders]
        group = [self._rank_files[self.layout.rank(0, 0, m)] for m in range(self.layout.mp)]
        steps = {(n.epoch, n.step) if (n := CheckpointName.parse(f.name)) else f.name for f in group}
        if len(steps) > 1:
            raise InputError(
                f"{self.path}: the tensor-parallel ranks' newest checkpoints are of different steps "
                f"({', '.join(f.name for f in group)}); a run saves them together, so one is missing"
            )
        self.tensors, self._placement = [], {}
        for e in self._reader(group[0]).entries.values():
            axis = split_axis(e.name, dims, self.layout.mp)
            shape = list(e.shape)
            if axis is not None:
                shape[axis] *= self.layout.mp
            self.tensors.append(TensorMeta(e.name, tuple(shape), e.dtype))
            self._placement[e.name] = (axis, 0)
        self.files = [self.path / "parallel.json", *group]
        self.crc = has_crc_trailer(group[0])

    # -- reading
    def read(self, meta: TensorMeta, out: np.ndarray | None = None) -> np.ndarray:
        """The complete tensor (slices of a sharded source are concatenated).

        `out` (uint8, large enough) receives the bytes when the tensor is stored in one piece.
        """
        if self.kind != "sharded":
            return self._reader(self.files[0]).read(meta.name, out)
        axis, stage = self._placement[meta.name]
        if axis is None:
            return self._read_rank(self.layout.rank(stage, 0, 0), meta)
        parts = [self._read_rank(self.layout.rank(stage, 0, m), meta) for m in range(self.layout.mp)]
        full = np.concatenate(parts, axis=axis)
        if full.shape != meta.shape:
            raise InputError(
                f"{self.path}: tensor {meta.name!r} reassembles to {list(full.shape)}, not {meta.shape}"
            )
        return full

    def file_ranges(self, meta: TensorMeta) -> tuple[int, list[tuple[int, int]]] | None:
        """(open fd, byte ranges) holding the complete tensor, or None when it is spread over ranks."""
        if self.kind == "sharded" or meta.dtype == STR_TYPE:
            return None
        reader = self._reader(self.files[0])
        return reader.fileno(), reader.entries[meta.name].chunks

    def _read_rank(self, rank: int, meta: TensorMeta) -> np.ndarray:
        f = self._rank_files[rank]
        reader = self._reader(f)
        if meta.name not in reader.entries:
            raise InputError(f"{f}: tensor {meta.name!r} is missing")
        return reader.read(meta.name)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
