"""Atomic outputs: nothing appears under its final name until it is complete and on disk.

Files and folders are built under a hidden temporary name in the same folder (so the final
rename stays on one file system), fsynced, then renamed into place. A crash at any point leaves
at most a hidden `.<name>.tmp-*` entry, never a half file under the final name.

A full disk (ENOSPC, or EDQUOT for a quota) becomes one `DiskFullError` here, for every stage:
`disk_full` wraps a stage's entry and names the stage, the path and the free space.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from llama_core.errors import DiskFullError
from llama_core.progress import human_bytes

TMP_MARK = ".tmp-"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

P = ParamSpec("P")
R = TypeVar("R")


def temp_sibling(final: Path) -> Path:
    """A unique hidden name beside `final`, recognisable as a leftover by `TMP_MARK`."""
    return final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@functools.cache
def _sync_file_range() -> Any:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def start_writeback(fd: int) -> None:
    """Start writing an open file's dirty pages to disk without waiting or evicting them, so the
    fsync that makes an output durable has little left to do (Linux `sync_file_range` with
    SYNC_FILE_RANGE_WRITE; elsewhere nothing: the fsync does it all)."""
    fn = _sync_file_range()
    if fn is not None and fn(fd, 0, 0, 2) != 0:  # 2: SYNC_FILE_RANGE_WRITE; offset 0, length 0: all
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder below a folder."""
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_dir(Path(root))
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file, link or folder if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success move it onto `final`.

    The caller creates a file or a folder at the yielded path. When the block ends without an
    exception the result is fsynced and renamed to `final` (replacing what was there); on an
    exception it is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written at {tmp} for {final}")
        fsync_tree(tmp)
        if tmp.is_dir() and final.is_dir() and not final.is_symlink():
            # A folder cannot be renamed over a non-empty folder: move the old one aside first.
            old = temp_sibling(final)
            os.rename(final, old)
            os.rename(tmp, final)
            remove_path(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        if exc.filename is None and exc.errno in NO_SPACE_ERRNOS:
            # a write to an open file names no path: name the output it was for (`disk_full` shows it)
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise
    finally:
        remove_path(tmp)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented UTF-8 JSON (non-ASCII kept) to `path` atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


def clean_leftovers(folder: str | os.PathLike[str], name: str) -> int:
    """Remove temporary entries that dead runs left beside `folder/name`; return how many.

    Entries of a process that is still alive (a concurrent run) are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.glob(f".{name}{TMP_MARK}*"):
        pid = entry.name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        remove_path(entry)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes an unprivileged writer has on the file system of `path` (or of its nearest existing
    parent, for an output not made yet); None when even that cannot be read."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def final_name(path: str | os.PathLike[str]) -> Path:
    """`path` with each temporary name (`temp_sibling`'s) replaced by the final name it stands for:
    the path a user knows, not the hidden one a failed write was using."""
    parts = []
    for part in Path(path).parts:
        if part.startswith(".") and TMP_MARK in part:
            part = part[1:].rsplit(TMP_MARK, 1)[0]
        parts.append(part)
    return Path(*parts)


@contextlib.contextmanager
def disk_full(stage: str, path: str | os.PathLike[str], needs: int | None = None) -> Iterator[None]:
    """Turn a full disk (ENOSPC) or quota (EDQUOT) in the block into `DiskFullError`: "`stage`: no space
    left on <path> (needs ..., N free)". The path is the failing call's own when it names one (else
    `path`); `needs` is the size being written, when known. Other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        where = final_name(exc.filename or path)
        free = free_bytes(where)
        facts = [f"needs about {human_bytes(needs)}"] if needs else []
        facts.append("free space unknown" if free is None else f"{human_bytes(free)} free")
        if exc.errno == errno.EDQUOT:
            facts.append("disk quota exceeded")
        raise DiskFullError(
            f"{stage}: no space left on {where} ({', '.join(facts)}); free space there and run it again"
        ) from exc


def disk_full_stage(stage: str, path_arg: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a stage's entry function with `disk_full(stage, <its argument path_arg>)`."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def entry(*args: P.args, **kwargs: P.kwargs) -> R:
            where = signature.bind_partial(*args, **kwargs).arguments.get(path_arg) or "."
            with disk_full(stage, where):
                return fn(*args, **kwargs)

        return entry

    return wrap
