"""Streaming reader and writer for MindSpore `.ckpt` files.

Format (mindspore/train/checkpoint_pb2.py and serialization.py, MindSpore 2.x): the file is a
protobuf `Checkpoint { repeated Value value = 1; }` with `Value { required string tag = 1;
oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }` and `TensorProto { repeated
int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }`.
MindSpore writes one serialized single-Value `Checkpoint` per tensor (concatenated messages merge
their repeated fields), splits a tensor larger than 512 MiB into consecutive Values with the same
tag and full dims, and with `crc_check=True` appends `b"crc_num"` + a 10-byte big-endian CRC32 of
everything before it. String entries have dims [0] and type "str".

Only the few bytes of framing are parsed here; tensor bytes are located by offset and read on
demand into a fresh buffer, so reading never holds more than the tensor asked for, and writing
goes tensor by tensor to an atomic temporary file.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llama_core.atomic import atomic_path
from llama_core.checkpoint.dtypes import from_ms_type, storage_dtype, to_ms_type
from llama_core.errors import InputError

_CRC_MARK = b"crc_num"
_CRC_TRAILER = len(_CRC_MARK) + 10
CHUNK_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE: larger tensors are split into Values
STR_TYPE = "str"


@dataclass
class TensorEntry:
    """Where one tensor lives in a .ckpt: name, shape, type (short name or 'str') and byte ranges."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of content pieces

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.chunks)


# ---------------------------------------------------------------------------------------- reading
def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise InputError(f"{where}: truncated checkpoint (varint runs past the end)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


class _Source:
    """Positioned reads of the framing bytes of an open file."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self.f.fileno(), n, offset)


def _parse_tensor(src: _Source, start: int, end: int, where: str) -> tuple[list[int], str, int, int]:
    """Parse a TensorProto in [start, end): dims, type, content offset and length."""
    dims: list[int] = []
    ttype, content = None, None
    pos = start
    while pos < end:
        head = src.read_at(pos, min(32, end - pos))
        key, p = _varint(head, 0, where)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, p = _varint(head, p, where)
            if field_no == 1:
                dims.append(value - (1 << 64) if value >= 1 << 63 else value)
            pos += p
            continue
        if wire != 2:
            raise InputError(f"{where}: unexpected protobuf wire type {wire} in a tensor")
        length, p = _varint(head, p, where)
        body = pos + p
        if body + length > end:
            raise InputError(f"{where}: truncated checkpoint (tensor field runs past its message)")
        if field_no == 1:  # packed dims
            packed, q = src.read_at(body, length), 0
            while q < length:
                value, q = _varint(packed, q, where)
                dims.append(value)
        elif field_no == 2:
            ttype = src.read_at(body, length).decode("utf-8")
        elif field_no == 3:
            content = (body, length)
        pos = body + length
    if ttype is None or content is None:
        raise InputError(f"{where}: tensor without type or content")
    return dims, ttype, content[0], content[1]


def has_crc_trailer(path: str | os.PathLike[str]) -> bool:
    """Whether a .ckpt ends with MindSpore's `crc_num` trailer."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return size >= _CRC_TRAILER and os.pread(f.fileno(), len(_CRC_MARK), size - _CRC_TRAILER) == _CRC_MARK


def scan_ckpt(path: str | os.PathLike[str]) -> list[TensorEntry]:
    """Index a .ckpt: every tensor's name, shape, type and byte ranges, without reading the data."""
    path = Path(path)
    entries: list[TensorEntry] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        src = _Source(f, size)
        end = size
        if size >= _CRC_TRAILER and src.read_at(size - _CRC_TRAILER, len(_CRC_MARK)) == _CRC_MARK:
            end = size - _CRC_TRAILER
        pos = 0
        while pos < end:
            where = f"{path} at byte {pos}"
            head = src.read_at(pos, min(20, end - pos))
            key, p = _varint(head, 0, where)
            if key != 0x0A:
                raise InputError(f"{where}: not a MindSpore checkpoint (unexpected protobuf key {key})")
            length, p = _varint(head, p, where)
            vstart, vend = pos + p, pos + p + length
            if vend > end:
                raise InputError(f"{where}: truncated checkpoint (entry runs past the end of the file)")
            entries_add = _parse_value(src, vstart, vend, where)
            name, dims, ttype, coff, clen = entries_add
            last = entries[-1] if entries else None
            if last is not None and last.name == name:
                last.chunks.append((coff, clen))  # continuation of a tensor split over Values
            else:
                dtype = STR_TYPE if ttype == STR_TYPE else from_ms_type(ttype, f"{path}: tensor {name!r}")
                entries.append(TensorEntry(name, tuple(dims), dtype, [(coff, clen)]))
            pos = vend
    for e in entries:
        if e.dtype != STR_TYPE:
            expected = int(np.prod(e.shape, dtype=np.int64)) * storage_dtype(e.dtype).itemsize
            if expected != e.nbytes:
                raise InputError(
                    f"{path}: tensor {e.name!r} has {e.nbytes} content bytes, shape {list(e.shape)} "
                    f"{e.dtype} needs {expected}"
                )
    return entries


def _parse_value(src: _Source, start: int, end: int, where: str) -> tuple[str, list[int], str, int, int]:
    tag = None
    tensor = None
    pos = start
    while pos < end:
        head = src.read_at(pos, min(20, end - pos))
        key, p = _varint(head, 0, where)
        field_no, wire = key >> 3, key & 7
        if wire != 2:
            raise InputError(f"{where}: unexpected protobuf wire type {wire} in a checkpoint entry")
        length, p = _varint(head, p, where)
        body = pos + p
        if field_no == 1:
            tag = src.read_at(body, length).decode("utf-8")
        elif field_no == 2:
            tensor = _parse_tensor(src, body, body + length, f"{where} ({tag})")
        elif field_no == 3:
            raise InputError(f"{where}: entry {tag!r} is a MapParameter, which is not supported")
        pos = body + length
    if tag is None or tensor is None:
        raise InputError(f"{where}: checkpoint entry without name or tensor")
    return (tag, *tensor)


class CkptReader:
    """Random access to the tensors of a .ckpt; each read allocates only that tensor."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries = {e.name: e for e in scan_ckpt(self.path)}
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__

    def __enter__(self) -> CkptReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def fileno(self) -> int:
        return self._f.fileno()

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor `name` as a numpy array in its storage dtype (BF16 as uint16 bits).

        `out`, a uint8 buffer of at least the tensor's size, is filled instead of a new allocation
        (reusing one buffer spares the page faults of a fresh one per tensor).
        """
        e = self.entries[name]
        buf = np.empty(e.nbytes, dtype=np.uint8) if out is None else out[: e.nbytes]
        view, at = memoryview(buf), 0
        for offset, length in e.chunks:
            got = os.preadv(self._f.fileno(), [view[at : at + length]], offset)
            if got != length:
                raise InputError(f"{self.path}: tensor {name!r} is truncated")
            at += length
        if e.dtype == STR_TYPE:
            return buf
        return buf.view(storage_dtype(e.dtype)).reshape(e.shape)

    def __iter__(self) -> Iterator[tuple[TensorEntry, np.ndarray]]:
        for name, entry in self.entries.items():
            yield entry, self.read(name)


def load_ckpt_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a (small) .ckpt in memory: for tests and tiny models only."""
    with CkptReader(path) as reader:
        return {e.name: arr for e, arr in reader}


# ---------------------------------------------------------------------------------------- writing
def _enc_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(no: int, payload_len: int) -> bytes:
    return _enc_varint((no << 3) | 2) + _enc_varint(payload_len)


def sub_ranges(ranges: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The file ranges holding bytes [start, start + length) of the content stored in `ranges`."""
    out, pos = [], 0
    for offset, n in ranges:
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo < hi:
            out.append((offset + lo - pos, hi - lo))
        pos += n
    return out


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_file_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append `length` bytes of `src_fd` from `offset` to `dst_fd`, in the kernel when it can."""
    while length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(length, 1 << 30), offset)
        except OSError:  # e.g. EXDEV on old kernels or ENOSYS: copy through user space
            n = 0
        if n <= 0:
            block = os.pread(src_fd, min(length, 64 << 20), offset)
            if not block:
                raise InputError(f"unexpected end of input file at byte {offset}")
            _write_all(dst_fd, block)
            n = len(block)
        offset += n
        length -= n


class CkptWriter:
    """Appends tensors to an open binary file in MindSpore's layout (optionally with its CRC).

    Writes go straight to the file descriptor (the file object is flushed once and then left
    alone), so tensor bytes can also be copied file-to-file in the kernel (`write_ranges`).
    """

    def __init__(self, f: BinaryIO, crc: bool = False) -> None:
        f.flush()
        self.fd, self.crc = f.fileno(), crc
        self._crc = 0
        self.bytes_written = 0

    def _emit(self, data: bytes | memoryview) -> None:
        if self.crc:
            self._crc = zlib.crc32(data, self._crc)
        _write_all(self.fd, data)
        self.bytes_written += len(data)

    @staticmethod
    def _frames(name: str, dims: list[int], ms_type: str, total: int) -> Iterator[tuple[bytes, int, int]]:
        """(framing bytes, content start, content length) per Value; > 512 MiB splits as MindSpore does."""
        dims_bytes = b"".join(b"\x08" + _enc_varint(d) for d in dims)
        tag = name.encode("utf-8")
        type_bytes = ms_type.encode()
        for start in range(0, max(total, 1), CHUNK_BYTES):
            length = min(CHUNK_BYTES, total - start)
            tensor_head = dims_bytes + _field(2, len(type_bytes)) + type_bytes + _field(3, length)
            tensor_len = len(tensor_head) + length
            value_head = _field(1, len(tag)) + tag + _field(2, tensor_len)
            yield _field(1, len(value_head) + tensor_len) + value_head + tensor_head, start, length

    def write(self, name: str, array: np.ndarray, dtype: str) -> None:
        """Write tensor `name`, held in `dtype`'s storage (BF16 as uint16 bits); 'str' for raw strings."""
        ms_type = STR_TYPE if dtype == STR_TYPE else to_ms_type(dtype)
        dims = [0] if dtype == STR_TYPE else list(array.shape)
        if dtype != STR_TYPE and array.dtype != storage_dtype(dtype):
            raise ValueError(f"tensor {name!r}: array dtype {array.dtype} does not hold {dtype}")
        content = memoryview(np.ascontiguousarray(array)).cast("B")
        for head, start, length in self._frames(name, dims, ms_type, len(content)):
            self._emit(head)
            self._emit(content[start : start + length])

    def write_ranges(
        self, name: str, shape: tuple[int, ...], dtype: str, src_fd: int, ranges: list[tuple[int, int]]
    ) -> None:
        """Write tensor `name` whose bytes are `ranges` of the open file `src_fd`, copied in the kernel."""
        total = sum(n for _, n in ranges)
        if self.crc:  # the CRC needs the bytes in user space
            buf = np.empty(total, np.uint8)
            at = 0
            for offset, n in ranges:
                buf[at : at + n] = np.frombuffer(os.pread(src_fd, n, offset), np.uint8)
                at += n
            self.write(name, buf.view(storage_dtype(dtype)).reshape(shape), dtype)
            return
        for head, start, length in self._frames(name, list(shape), to_ms_type(dtype), total):
            self._emit(head)
            for offset, n in sub_ranges(ranges, start, length):
                copy_file_range(src_fd, self.fd, offset, n)
            self.bytes_written += length

    def finish(self) -> None:
        """Append the CRC trailer when asked for (call once, after the last tensor)."""
        if self.crc:
            trailer = _CRC_MARK + self._crc.to_bytes(10, byteorder="big")
            _write_all(self.fd, trailer)
            self.bytes_written += len(trailer)


def write_ckpt(
    path: str | os.PathLike[str],
    tensors: Iterator[tuple[str, np.ndarray, str]] | list[tuple[str, np.ndarray, str]],
    crc: bool = False,
) -> int:
    """Write (name, array, dtype) triples to `path` atomically, one tensor at a time; return bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = CkptWriter(f, crc=crc)
        for name, array, dtype in tensors:
            writer.write(name, array, dtype)
        writer.finish()
    return writer.bytes_written
