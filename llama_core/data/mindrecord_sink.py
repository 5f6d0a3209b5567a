"""MindRecord output written in a hidden folder beside the target and renamed into place at the end.

Rows reach the writer as int32 fields that workers send unpadded (each field's leading values
and its full length); the sink adds each field's pad value. Two ways into MindSpore, giving the
same files:

- fast: the rows go straight to MindSpore's C++ shard writer (`FileWriter._writer._writer`,
  private) as ready-made blobs in FileWriter's own row layout. The public
  `FileWriter.write_raw_data` re-validates and re-packs every row in Python, which for 4097-long
  rows costs more than the tokenization. Used when every private handle it needs is there.
- public: `FileWriter.write_raw_data`, when a MindSpore version lacks one of those handles.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import fsync_dir, fsync_tree, remove_path, start_writeback, temp_sibling

# One record for the writer: per field, its leading values (int32 bytes) and its full length.
Row = dict[str, tuple[bytes, int]]


@dataclass(frozen=True)
class _RawWriter:
    """MindSpore's private handles behind the fast path, all looked up together."""

    open: Callable[[], None]  # opens the shard files and writes their header
    write: Callable[[dict[Any, Any], list[bytes], bool, bool], Any]  # (raw, blobs, validate, parallel)
    blob_fields: list[str]  # the order in which FileWriter packs the fields of a row


def raw_writer(fw: Any) -> _RawWriter | None:
    """The fast path's private handles on FileWriter `fw` (its schema added), or None when this
    MindSpore version lacks any of them: an attribute missing or not callable."""
    shard_writer = getattr(fw, "_writer", None)
    open_files = getattr(shard_writer, "open", None)
    set_header = getattr(shard_writer, "set_shard_header", None)
    write = getattr(getattr(shard_writer, "_writer", None), "write_raw_data", None)
    paths, header = getattr(fw, "_paths", None), getattr(fw, "_header", None)
    blob_fields = getattr(header, "blob_fields", None)
    if not (callable(open_files) and callable(set_header) and callable(write)):
        return None
    if not isinstance(paths, list) or not isinstance(blob_fields, (list, tuple)):
        return None

    def open_() -> None:
        open_files(paths, False)
        set_header(header)

    return _RawWriter(open_, write, list(blob_fields))


@contextlib.contextmanager
def _full_disk_as_oserror(output: Path) -> Iterator[None]:
    """MindSpore's shard writer reports a full disk as a RuntimeError ("No free disk to be used while
    writing mindrecord files"): raise it as the OSError(ENOSPC) it is, so `atomic.disk_full` names it."""
    try:
        yield
    except RuntimeError as exc:
        if "No free disk" not in str(exc):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output)) from exc


class MindRecordSink:
    """mindspore.mindrecord.FileWriter writing into a hidden folder beside the output.

    MindSpore is imported on a thread from the start and the writer opened at the first row, so
    the import overlaps the workers' start-up. Each shard's dirty pages are sent to disk every
    `WRITEBACK_EVERY` row bytes, so the final fsync does not wait for the whole output.
    `publish()` renames the files into place; the MindRecord header names its shards by base
    name, so the renamed files read back unchanged.
    """

    WRITEBACK_EVERY = 32 << 20  # row bytes before compression

    def __init__(
        self, final: Path, shards: int, schema: dict[str, Any], description: str, pad: Mapping[str, int]
    ) -> None:
        """`pad`: the value that fills each field of `schema` up to its length."""
        self.final = final
        self.shards, self.schema, self.description, self.pad = shards, schema, description, pad
        self.tmp_dir = temp_sibling(final)
        self.tmp_dir.mkdir(parents=True)
        self._import = threading.Thread(target=importlib.import_module, args=("mindspore.mindrecord",))
        self._import.start()
        self._fw: Any = None
        self._raw: _RawWriter | None = None
        self._shard_fds: list[int] = []
        self._unsynced = 0
        self._padding = {name: b"" for name in schema}
        self.rows = 0

    def _open(self) -> Any:
        """The FileWriter, created at the first call; the fast path is chosen here, once."""
        if self._fw is None:
            self._import.join()
            from mindspore.mindrecord import FileWriter

            fw = FileWriter(str(self.tmp_dir / self.final.name), shard_num=self.shards)
            fw.add_schema(self.schema, self.description)
            self._raw = raw_writer(fw)
            if self._raw is not None:
                self._raw.open()
            self._fw = fw
        return self._fw

    def write(self, rows: list[Row]) -> None:
        """Write rows; a row holds, per field, the field's leading values as int32 bytes and its
        full length: the rest is the field's pad value."""
        if not rows:
            return
        self._open()  # no local of it: a failed write's traceback must not keep the writer alive
        if self._raw is not None:
            blobs = [self._blob(row, self._raw.blob_fields) for row in rows]
            with _full_disk_as_oserror(self.final):
                self._raw.write({}, blobs, False, False)
            written = sum(map(len, blobs))
        else:
            with _full_disk_as_oserror(self.final):
                self._fw.write_raw_data([self._arrays(row) for row in rows])
            # counted as the fast path counts its blobs: a length prefix per field when several
            prefix = 8 if len(self.schema) > 1 else 0
            written = sum(4 * length + prefix for row in rows for _, length in row.values())
        self.rows += len(rows)
        if not self._shard_fds:  # the shard files exist once the first rows are written
            self._shard_fds = [os.open(path, os.O_RDONLY) for path in self._shard_paths()]
        self._start_writeback(written)

    def _shard_paths(self) -> list[Path]:
        """FileWriter's files: the output name, or the name followed by the shard number."""
        name = self.final.name
        return [
            p
            for p in sorted(self.tmp_dir.iterdir())
            if p.name.startswith(name) and (p.name == name or p.name[len(name) :].isdigit())
        ]

    def _start_writeback(self, written: int) -> None:
        """Count the row bytes handed to the writer; every WRITEBACK_EVERY of them, start the
        writeback of every shard, whole (the writer fills pages in place, not in file order)."""
        self._unsynced += written
        if self._unsynced >= self.WRITEBACK_EVERY:
            for fd in self._shard_fds:
                start_writeback(fd)
            self._unsynced = 0

    def _field(self, name: str, values: bytes, length: int) -> list[bytes | memoryview]:
        """A field's values followed by its padding (a view on a cached pad block)."""
        missing = 4 * length - len(values)
        if len(self._padding[name]) < missing:
            self._padding[name] = np.full(length, self.pad[name], np.int32).tobytes()
        return [values, memoryview(self._padding[name])[:missing]]

    def _blob(self, row: Row, fields: list[str]) -> bytes:
        """FileWriter's layout: one field's bytes, or each field's prefixed by its 8-byte length."""
        parts: list[bytes | memoryview] = []
        for name in fields:
            values, length = row[name]
            if len(fields) > 1:
                parts.append((4 * length).to_bytes(8, "big"))
            parts += self._field(name, values, length)
        return b"".join(parts)

    def _arrays(self, row: Row) -> dict[str, np.ndarray]:
        """A row as FileWriter.write_raw_data takes it: one int32 array per field."""
        return {name: np.frombuffer(b"".join(self._field(name, *row[name])), np.int32) for name in row}

    def publish(self) -> list[Path]:
        """Commit, fsync and rename every file into the output folder; return the final paths."""
        with _full_disk_as_oserror(self.final):
            self._open().commit()
        self._close_fds()
        fsync_tree(self.tmp_dir)
        finals = []
        for tmp in sorted(self.tmp_dir.iterdir()):
            final = self.final.parent / tmp.name
            os.replace(tmp, final)
            finals.append(final)
        fsync_dir(self.final.parent)
        remove_path(self.tmp_dir)
        return finals

    def discard(self) -> None:
        """Remove everything written so far, and let go of the writer: its files hold their space
        until it closes them, removed or not (a full disk would stay full)."""
        self._close_fds()
        self._fw = self._raw = None
        remove_path(self.tmp_dir)

    def _close_fds(self) -> None:
        for fd in self._shard_fds:
            os.close(fd)
        self._shard_fds = []
