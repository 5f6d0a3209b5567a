"""Streaming access to safetensors files and HF model folders (single file or sharded + index).

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor to {dtype, shape, data_offsets} (offsets relative to the end of the header), then the
raw little-endian tensor bytes. `safetensors.safe_open` cannot hand out BF16 tensors as numpy
(numpy has no bfloat16 here) and `safetensors.numpy.save_file` needs every tensor in memory, so
this module reads and writes the documented layout directly: one tensor in memory at a time.
Files written here load with `safe_open`, torch and transformers (checked in the tests).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_core.atomic import atomic_path
from llama_core.checkpoint.dtypes import check_short, storage_dtype
from llama_core.errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class StEntry:
    """One tensor of a safetensors file: where it is and what it holds."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


def scan_safetensors(path: str | os.PathLike[str]) -> tuple[list[StEntry], dict[str, str]]:
    """Index a .safetensors file (entries in data order, and the `__metadata__` strings)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise InputError(f"{path}: not a safetensors file (header length {hlen})")
        try:
            header = json.loads(f.read(hlen))
        except ValueError as exc:
            raise InputError(f"{path}: safetensors header is not JSON: {exc}") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    entries = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        dtype = check_short(info["dtype"], where)
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        expected = int(np.prod(shape, dtype=np.int64)) * storage_dtype(dtype).itemsize
        if end - begin != expected or base + end > size:
            raise InputError(f"{where}: byte range {begin}..{end} does not fit shape {list(shape)} {dtype}")
        entries.append(StEntry(name, path, dtype, shape, base + begin, end - begin))
    entries.sort(key=lambda e: e.offset)
    return entries, metadata


def read_entry(entry: StEntry) -> np.ndarray:
    """The tensor's bytes in a fresh array of its storage dtype (BF16 as uint16 bits)."""
    buf = np.empty(entry.nbytes, dtype=np.uint8)
    with open(entry.path, "rb") as f:
        got = os.preadv(f.fileno(), [memoryview(buf)], entry.offset) if entry.nbytes else 0
    if got != entry.nbytes:
        raise InputError(f"{entry.path}: tensor {entry.name!r} is truncated")
    return buf.view(storage_dtype(entry.dtype)).reshape(entry.shape)


def hf_weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of an HF model folder: those of the index, or `model.safetensors`."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise InputError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise InputError(f"{index}: lists {missing[0]} which is missing from {folder}")
        return [index, *(folder / f for f in files)]
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise InputError(f"{folder}: only PyTorch .bin/.pth weights found; safetensors are required")
    raise InputError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}")


def scan_hf_folder(folder: str | os.PathLike[str]) -> list[StEntry]:
    """Every tensor of an HF model folder, checked against the index when there is one."""
    folder = Path(folder)
    files = hf_weight_files(folder)
    entries: list[StEntry] = []
    seen: dict[str, Path] = {}
    for path in files:
        if path.name == INDEX_NAME:
            continue
        for e in scan_safetensors(path)[0]:
            if e.name in seen:
                raise InputError(f"tensor {e.name!r} is in both {seen[e.name]} and {path}")
            seen[e.name] = path
            entries.append(e)
    if files[0].name == INDEX_NAME:
        weight_map = json.loads(files[0].read_text())["weight_map"]
        for name, fname in weight_map.items():
            if seen.get(name) != folder / fname:
                raise InputError(f"{files[0]}: tensor {name!r} is not in {fname}")
    return entries


# ---------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: header facts known before its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * storage_dtype(self.dtype).itemsize


def _header(plan: list[PlannedTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in plan:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data area starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike[str],
    plan: list[PlannedTensor],
    arrays: Iterable[np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write the tensors of `plan` (arrays given in plan order, one at a time) atomically."""
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        head = _header(plan, metadata)
        f.write(head)
        written += len(head)
        it: Iterator[np.ndarray] = iter(arrays)
        for t in plan:
            arr = next(it)
            if tuple(arr.shape) != t.shape or arr.dtype != storage_dtype(t.dtype):
                raise ValueError(f"tensor {t.name!r}: got {arr.dtype}{list(arr.shape)}, planned {t}")
            f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
            written += t.nbytes
    return written
