"""fetch(): download a source into a folder, resumably, verified, once, and cached.

`fetch` parses the source, picks the store folder, takes its lock and hands the request to the
fetcher of the source's scheme (`FETCHERS`). Stores a `Reader` can stream a file from (file,
http, s3) share the download loop below; hf:// repos are downloaded by huggingface_hub (`hf`).

Layout under the store folder (`dest`, or `cache_dir/<source digest>` when a shared cache is used):
- `<name>`                 the fetched file, or a folder of files (s3 prefix, local folder, hf repo)
- `.<name>.fetch.json`     manifest: redacted source, and per file its size, sha256 and validator
- `.<name>.fetch.lock`     file lock: concurrent fetches of one source download it once
- `.<file>.part[.json]`    a partial download and the validator it started from (for resuming)
A file appears under its final name only complete and verified (atomic rename).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import queue
import re
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from llama_core.atomic import atomic_path, disk_full, remove_path, write_json_atomic
from llama_core.cache import cache_key, file_sha256, read_manifest, remember_sha256, write_manifest
from llama_core.errors import ConfigError, InputError, LlamaCoreError
from llama_core.fetch.hf import fetch_hf
from llama_core.fetch.redact import redact
from llama_core.fetch.remote import (
    FetchError,
    HttpReader,
    LocalReader,
    Reader,
    RemoteFile,
    S3Reader,
    Transient,
)
from llama_core.fetch.results import FetchedFile, FetchResult
from llama_core.fetch.source import Credentials, FetchRequest, RetryPolicy, Source, Timeouts, parse_source
from llama_core.progress import Progress

log = logging.getLogger("llama_core.fetch")

FORMAT_VERSION = 1


# A fetcher puts the request's source at `store/<name>` (its caller holds the store's lock) and
# returns its files; `FETCHERS` holds one per scheme.
Fetcher = Callable[[FetchRequest, Path], list[FetchedFile]]


def fetch(
    source: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    credentials: Credentials | None = None,
    retry: RetryPolicy | None = None,
    timeouts: Timeouts | None = None,
    progress_interval: float = 5.0,
    local_roots: Sequence[str] | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FetchResult:
    """Fetch `source` (path, file://, http(s)://, s3://, hf://) to `dest/<name>`.

    `sha256` pins a single-file source's digest: a mismatch raises and keeps nothing. With
    `cache_dir`, the download lands in that shared cache and is hard-linked (or copied) into
    `dest`. Credentials not given in `credentials` come from the environment. With `local_roots`, a
    local source must resolve inside one of those folders, each file checked as it is opened. With
    `allowed_hosts`, an http(s) source and each redirect it answers with must name one of them.
    """
    t0 = time.monotonic()
    creds = credentials or Credentials()
    secrets = creds.secrets()
    src = parse_source(source)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ConfigError(f"sha256 for {src.redacted} must be 64 hex digits, got {sha256!r}")
    expected = sha256.lower() if sha256 else None
    if expected and src.scheme == "hf":
        raise ConfigError(f"sha256 pins one file; hf source {src.redacted} is a folder")
    roots = None if local_roots is None else tuple(local_roots)
    req = FetchRequest(
        src, creds, expected, retry or RetryPolicy(), timeouts or Timeouts(), progress_interval, roots,
        tuple(allowed_hosts),
    )  # fmt: skip
    store = (
        Path(cache_dir) / hashlib.sha256(req.identity.encode()).hexdigest()[:24] if cache_dir else Path(dest)
    )
    try:
        with disk_full("fetch", store):  # a partial download stays (hidden) for the next fetch to resume
            with _locked(store, src):
                files = FETCHERS[src.scheme](req, store)
            if cache_dir:
                files = [_link_into(f, store, Path(dest)) for f in files]
    except LlamaCoreError as exc:
        raise type(exc)(redact(exc, secrets)) from None
    except Exception as exc:
        # Third-party messages may quote URLs or keys: re-raise redacted, without the raw chain.
        log.debug("%s", redact("".join(traceback.format_exception(exc)), secrets))
        raise FetchError(
            redact(f"fetch of {src.redacted} failed: {type(exc).__name__}: {exc}", secrets)
        ) from None
    result = FetchResult(
        src.redacted, Path(dest) / src.name, tuple(files), sum(f.size for f in files), time.monotonic() - t0
    )
    got = "cached" if result.cached else "fetched"
    log.info(
        "%s %s: %d file(s), %d bytes in %.1fs",
        got,
        src.redacted,
        len(files),
        result.total_bytes,
        result.elapsed,
    )
    return result


@contextlib.contextmanager
def _locked(store: Path, src: Source) -> Iterator[None]:
    store.mkdir(parents=True, exist_ok=True)
    lock = FileLock(store / f".{src.name}.fetch.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another fetch of %s to finish (%s)", src.redacted, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fetch_streamed(
    make_reader: Callable[[FetchRequest], Reader], req: FetchRequest, store: Path
) -> list[FetchedFile]:
    """Download each file the reader lists unless the manifest's record of it still holds (same
    size and validator as the store reports now); forget files gone from the source."""
    src, expected, retry = req.src, req.sha256, req.retry
    reader = make_reader(req)
    entry = store / src.name
    manifest_path = store / f".{src.name}.fetch.json"
    key = cache_key("fetch", FORMAT_VERSION, [], {"source": req.identity})
    if expected and entry.is_file() and file_sha256(entry) == expected:
        # Content-addressed hit: the pinned digest proves the content, no need to ask the store.
        return [FetchedFile(src.redacted, entry, entry.stat().st_size, expected, True)]
    remote = _retrying(reader.listing, retry, src.redacted)
    if expected and (len(remote) != 1 or remote[0].rel):
        raise ConfigError(f"sha256 pins one file; {src.redacted} holds {len(remote)} files")
    manifest = read_manifest(manifest_path)
    old = manifest.extra.get("files", {}) if manifest and manifest.key == key else {}
    files, records = [], {}
    for rf in remote:
        path = entry / rf.rel if rf.rel else entry
        fetched = _still_valid(rf, path, old.get(rf.rel))
        validator = rf.validator
        if fetched is None:
            fetched, validator = _download(reader, rf, path, expected, retry, req.progress_interval)
        files.append(fetched)
        records[rf.rel] = {"size": fetched.size, "sha256": fetched.sha256, "validator": validator}
    for rel in set(old) - set(records):  # gone from the source since the last fetch
        remove_path(entry / rel)
    write_manifest(
        manifest_path,
        stage="fetch",
        key=key,
        outputs=[f.path for f in files],
        extra={"source": src.redacted, "files": records},
    )
    return files


FETCHERS: dict[str, Fetcher] = {
    "file": functools.partial(_fetch_streamed, LocalReader),
    "http": functools.partial(_fetch_streamed, HttpReader),
    "s3": functools.partial(_fetch_streamed, S3Reader),
    "hf": fetch_hf,
}


def _still_valid(rf: RemoteFile, path: Path, record: dict[str, Any] | None) -> FetchedFile | None:
    """The local copy if the store reports the same size and validator as when it was fetched."""
    if not record or rf.validator is None or record.get("validator") != rf.validator:
        return None
    if rf.size != record.get("size") or not path.is_file() or path.stat().st_size != rf.size:
        return None
    if file_sha256(path) != record.get("sha256"):  # memoised: free unless the file was touched
        return None
    return FetchedFile(rf.source, path, rf.size, record["sha256"], True)


def _retrying(fn, retry: RetryPolicy, shown: str):
    failures = 0
    while True:
        try:
            return fn()
        except Transient as exc:
            failures += 1
            _wait(exc, failures, retry, shown, 0)


def _wait(exc: Transient, failures: int, retry: RetryPolicy, shown: str, offset: int) -> None:
    """Sleep before the next attempt, or raise FetchError when the retries are used up."""
    if failures > retry.retries:
        raise FetchError(f"giving up on {shown} after {failures} attempts: {exc}", retryable=True)
    delay = min(retry.backoff * 2 ** (failures - 1), retry.max_backoff)
    if exc.retry_after is not None:
        delay = min(max(delay, exc.retry_after), retry.max_backoff)
    log.warning("%s; retry %d/%d in %.1fs from byte %d", exc, failures, retry.retries, delay, offset)
    time.sleep(delay)


def _download(
    reader: Reader, rf: RemoteFile, final: Path, expected: str | None, retry: RetryPolicy, interval: float
) -> tuple[FetchedFile, str | None]:
    """Stream `rf` into `.<name>.part` (resuming one left by an earlier run), verify, rename.

    Returns the file and the validator the store gave for the bytes received."""
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.part"
    meta_path = final.parent / f".{final.name}.part.json"
    meta = _read_meta(meta_path)
    if not (partial.is_file() and meta.get("validator") and meta.get("validator") == rf.validator):
        meta = {"validator": rf.validator, "size": rf.size}
        partial.write_bytes(b"")
    hasher, offset = _hash_file(partial)
    # Resume against the validator the partial started from: If-Range/ETag detect a change.
    current = RemoteFile(rf.rel, rf.source, meta.get("size"), meta.get("validator"), rf.address)
    progress = Progress(
        f"fetch {rf.source}", rf.size, unit="bytes", interval=interval, logger=log, start=offset
    )
    failures, failed_at = 0, -1
    with _Sink(partial, hasher) as sink:
        while True:
            try:
                stream = reader.open(current, offset)
                if stream.start != offset:
                    log.info(
                        "%s: restarting from byte 0 (was at %d): no usable Range/validator", rf.source, offset
                    )
                    sink.restart()
                    offset = 0
                    progress = Progress(
                        f"fetch {rf.source}", stream.size, unit="bytes", interval=interval, logger=log
                    )
                if stream.validator != current.validator or stream.size != current.size:
                    current = RemoteFile(rf.rel, rf.source, stream.size, stream.validator, rf.address)
                    write_json_atomic(meta_path, {"validator": stream.validator, "size": stream.size})
                for chunk in stream.chunks:
                    sink.put(chunk)
                    offset += len(chunk)
                    progress.update(len(chunk))
                if stream.size is not None and offset != stream.size:
                    raise Transient(f"{rf.source}: connection closed at byte {offset} of {stream.size}")
                break
            except Transient as exc:
                sink.drain()
                # Count consecutive failures without progress: a long transfer over a flaky link
                # that keeps advancing is not given up on.
                failures = 1 if offset > failed_at else failures + 1
                failed_at = offset
                _wait(exc, failures, retry, rf.source, offset)
        digest = sink.hexdigest()
    progress.close()
    if expected and digest != expected:
        remove_path(partial)
        remove_path(meta_path)
        raise InputError(
            f"sha256 mismatch for {rf.source}: expected {expected}, got {digest}; nothing was kept"
        )
    with atomic_path(final) as tmp:
        os.replace(partial, tmp)
    remove_path(meta_path)
    remember_sha256(final, digest)
    return FetchedFile(rf.source, final, offset, digest, False), current.validator


class _Sink:
    """Writes chunks to a file and hashes them as they arrive, each on a worker thread, so the
    socket read, the write and the sha256 overlap (all three release the GIL).

    Chunks are staged into `_BLOCK`-sized page-aligned buffers; the writer thread writes each full
    block at its offset with O_DIRECT where the file system allows it: the bytes go from the buffer
    to the disk without a copy into the page cache. Buffered writes spend CPU on that copy and slow
    down as the page cache fills; direct writes of whole blocks cost almost none, and leave the
    fsync before the rename nothing to do. The block in progress reaches the file with a plain
    write when the transfer pauses or ends (`drain`); the next direct write of that block rewrites
    it whole. Without O_DIRECT (tmpfs, macOS) the blocks go through the page cache. At most
    `_DEPTH` chunks wait for the hasher and `_DEPTH` blocks are in use."""

    _DEPTH = 8
    _BLOCK = 1 << 20
    _ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of the logical block size

    def __init__(self, path: Path, hasher: Any) -> None:
        self.hasher = hasher
        self.error: BaseException | None = None
        self.fd = os.open(path, os.O_RDWR)
        self.direct_fd = _open_direct(path)
        self.free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(self._DEPTH):
            self.free.put(mmap.mmap(-1, self._BLOCK))  # anonymous maps are page-aligned
        self.block = self.free.get()
        # A resumed partial's bytes are on disk already; its unaligned tail is staged again so
        # that the blocks stay aligned.
        size = os.fstat(self.fd).st_size
        self.pos, self.fill = size - size % self._ALIGN, size % self._ALIGN
        self.block[: self.fill] = os.pread(self.fd, self.fill, self.pos)
        self.to_hash: queue.Queue[bytes | None] = queue.Queue(self._DEPTH)
        self.to_write: queue.Queue[tuple[mmap.mmap, int] | None] = queue.Queue()
        hash_job = (self.to_hash, lambda chunk: self.hasher.update(chunk), lambda chunk: None)
        write_job = (self.to_write, lambda job: self._write_block(*job), lambda job: self.free.put(job[0]))
        self.threads = [
            threading.Thread(target=self._serve, args=hash_job, name="fetch-hash", daemon=True),
            threading.Thread(target=self._serve, args=write_job, name="fetch-write", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _serve(self, jobs: queue.Queue, work: Callable[[Any], None], release: Callable[[Any], None]) -> None:
        """Run `work` on each job until None. The first error is kept for put/drain to raise;
        later jobs are only released, so the producer never waits for a dead worker."""
        while True:
            job = jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    work(job)
            except BaseException as exc:
                self.error = exc
            finally:
                if job is not None:
                    release(job)
                jobs.task_done()

    def _write_block(self, block: mmap.mmap, pos: int) -> None:
        if self.direct_fd is not None:
            try:
                _pwrite_all(self.direct_fd, block, pos)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: the file system refuses this direct write
                    raise
                os.close(self.direct_fd)
                self.direct_fd = None
        _pwrite_all(self.fd, block, pos)

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.to_hash.put(chunk)
        view = memoryview(chunk)
        while view:
            n = min(len(view), self._BLOCK - self.fill)
            self.block[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self._BLOCK:
                self.to_write.put((self.block, self.pos))
                self.pos += self._BLOCK
                self.fill = 0
                self.block = self.free.get()

    def drain(self) -> None:
        """Wait until every chunk put is hashed and in the file (whose size is then the offset)."""
        self.to_hash.join()
        self.to_write.join()
        if self.error is None and self.fill:
            _pwrite_all(self.fd, memoryview(self.block)[: self.fill], self.pos)
        if self.error is not None:
            raise self.error

    def restart(self) -> None:
        """Empty the file and the digest: the store sends the whole file again."""
        self.drain()
        os.ftruncate(self.fd, 0)
        self.pos = self.fill = 0
        self.hasher = hashlib.sha256()

    def hexdigest(self) -> str:
        self.drain()
        return self.hasher.hexdigest()

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.to_hash.put(None)
        self.to_write.put(None)
        for thread in self.threads:
            thread.join()
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)


def _open_direct(path: Path) -> int | None:
    """A write descriptor that bypasses the page cache, or None where O_DIRECT is unavailable."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # tmpfs and others refuse O_DIRECT at open
            return None
        raise


def _pwrite_all(fd: int, data: Any, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _hash_file(path: Path) -> tuple[Any, int]:
    """sha256 state and length of what a partial already holds (to resume hashing, not restart it)."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            n += len(chunk)
    return h, n


def _link_into(f: FetchedFile, store: Path, dest: Path) -> FetchedFile:
    """Place a cached file under `dest` (hard link; a copy across file systems), atomically."""
    target = dest / f.path.relative_to(store)
    if not (target.exists() and os.path.samefile(target, f.path)):
        with atomic_path(target) as tmp:
            try:
                os.link(f.path, tmp)
            except OSError:
                shutil.copy2(f.path, tmp)
        remember_sha256(target, f.sha256)
    return FetchedFile(f.source, target, f.size, f.sha256, f.cached)
