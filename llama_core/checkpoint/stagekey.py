"""Cache keys for checkpoint stages, hashed beside the work instead of before it.

Hashing a multi-GB input costs about as much CPU as converting it. The key is only needed up
front when a manifest already exists (a possible cache hit); otherwise the digest is computed in
a background thread (hashlib releases the GIL) while the stage works, and awaited at the end,
before the manifest is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llama_core.cache import Manifest, cache_key, cached


class StageKey:
    """The cache key of one stage run: `hit()` checks the manifest, `value()` awaits the key."""

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
