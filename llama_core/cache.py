"""Stage cache: an identical re-run finds its output complete and skips.

A stage's key is a digest of its name, its output format version, the content of its input files
and its parameters (`cache_key`). The stage writes a manifest (JSON, atomically, last) that
records the key and the size of each output (`write_manifest`). An output counts as complete only
when its manifest exists, carries the same key, and every listed output file is present with the
recorded size (`cached`). A stage asks `StageKey` whether it can skip (`hit()`) and for the key to
record (`value()`).

Fetch records its streamed downloads with the same manifest helpers but cannot use `cached` or
`StageKey`: its input is a remote source whose bytes are unknown until downloaded, so its key
names the source, and whether a copy is current is the store's to say (each file's record keeps
the ETag, Last-Modified or size+mtime the store reported, compared with what the store reports
now; see `fetch.core`). hf:// downloads are recorded by huggingface_hub itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_core.atomic import write_bytes_atomic, write_json_atomic

_CHUNK = 8 << 20


def _digest_memo_dir() -> Path:
    base = os.environ.get("LLAMA_CORE_CACHE_DIR") or Path.home() / ".cache" / "llama_core"
    return Path(base) / "digests"


def _memo_path(path: Path) -> Path:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    return _digest_memo_dir() / hashlib.sha256(ident.encode()).hexdigest()


def remember_sha256(path: str | os.PathLike[str], digest: str) -> None:
    """Memoise a digest computed while `path` was written (a download hashes as it goes),
    so a later `file_sha256(path)` does not read a multi-GB file again."""
    try:
        memo = _memo_path(Path(path))
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo, digest.encode())
    except OSError:
        pass  # a read-only home only loses the memo


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, memoised by (real path, size, mtime, inode).

    Multi-GB checkpoints are hashed once; a changed file (new size, mtime or inode) is hashed
    again. The memo is a cache only: deleting it costs time, never correctness.
    """
    path = Path(path)
    memo = _memo_path(path)
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    remember_sha256(path, digest)
    return digest


def manifest_path_for(output: str | os.PathLike[str]) -> Path:
    """Where a stage records a single-file output: `<output>.manifest.json` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".manifest.json")


def content_id(path: str | os.PathLike[str]) -> str:
    """What stands for a file's content in a cache key.

    A file that one of our stages wrote, intact (the size its manifest records) and untouched
    since (not newer than the manifest, which is written last), is identified by that stage's
    cache key: the key determines the bytes, and a multi-GB checkpoint need not be hashed again
    by the stage after it. Any other file by its sha256.
    """
    path = Path(path)
    producer = read_manifest(manifest_path_for(path))
    if producer is not None:
        try:
            st = path.stat()
            untouched = (
                producer.outputs.get(path.name) == st.st_size
                and st.st_mtime_ns <= producer.path.stat().st_mtime_ns
            )
        except OSError:
            untouched = False
        if untouched:
            return f"{producer.stage}:{producer.key}"
    return f"sha256:{file_sha256(path)}"


def cache_key(
    stage: str,
    format_version: int,
    inputs: Iterable[str | os.PathLike[str]],
    params: Mapping[str, Any],
) -> str:
    """Digest of everything that determines a stage's output.

    `inputs` are files whose content matters (their `content_id`s are used, not their paths, so
    a moved input still hits); `params` must be JSON-serialisable and hold every setting that
    changes the output, and nothing that does not (worker counts, log intervals).
    """
    h = hashlib.sha256()
    h.update(f"{stage}\0{format_version}\0".encode())
    for path in inputs:
        h.update(content_id(path).encode() + b"\0")
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a completed stage wrote, read back from its manifest file."""

    path: Path
    stage: str
    key: str
    outputs: dict[str, int]
    extra: dict[str, Any]


def write_manifest(
    manifest_path: str | os.PathLike[str],
    *,
    stage: str,
    key: str,
    outputs: Iterable[str | os.PathLike[str]],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Record a completed stage. Call it last, after every output is in place.

    `outputs` are paths; they are stored relative to the manifest's folder with their sizes.
    """
    manifest_path = Path(manifest_path)
    base = manifest_path.parent
    sizes = {os.path.relpath(Path(p), base): Path(p).stat().st_size for p in outputs}
    doc = {
        "stage": stage,
        "cache_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": sizes,
        **(extra or {}),
    }
    return write_json_atomic(manifest_path, doc)


def read_manifest(manifest_path: str | os.PathLike[str]) -> Manifest | None:
    """The manifest at `manifest_path`, or None when it is absent or unreadable."""
    manifest_path = Path(manifest_path)
    try:
        doc = json.loads(manifest_path.read_text())
        stage, key, outputs = doc.pop("stage"), doc.pop("cache_key"), doc.pop("outputs")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    doc.pop("created", None)
    return Manifest(manifest_path, stage, key, dict(outputs), doc)


def cached(manifest_path: str | os.PathLike[str], key: str) -> Manifest | None:
    """The manifest if it proves a complete output for `key`, else None."""
    manifest = read_manifest(manifest_path)
    if manifest is None or manifest.key != key:
        return None
    base = manifest.path.parent
    for rel, size in manifest.outputs.items():
        try:
            if (base / rel).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest


class StageKey:
    """The cache key of one stage run: `hit()` checks the manifest, `value()` awaits the key.

    Hashing a multi-GB input costs about as much CPU as converting it. The key is only needed up
    front when a manifest already exists (a possible cache hit); otherwise the digest is computed
    in a background thread (hashlib releases the GIL) while the stage works, and awaited at the
    end, before the manifest is written.
    """

    def __init__(
        self,
        manifest_path: Path,
        stage: str,
        format_version: int,
        inputs: Sequence[str | os.PathLike[str]],
        params: Mapping[str, Any],
    ) -> None:
        self.manifest_path = manifest_path
        self._args = (stage, format_version, list(inputs), dict(params))
        self._future: Future[str] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def hit(self) -> Manifest | None:
        """The manifest when it proves an identical earlier run, else None (hashing then continues
        in the background)."""
        if self.manifest_path.exists():
            manifest = cached(self.manifest_path, self.value())
            if manifest is not None:
                return manifest
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-key")
            self._future = self._pool.submit(cache_key, *self._args)
        return None

    def value(self) -> str:
        """The key (waits for the background digest if one is running)."""
        if self._future is None:
            self._future = Future()
            self._future.set_result(cache_key(*self._args))
        try:
            return self._future.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
