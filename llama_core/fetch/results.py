"""What a fetch delivered: the files, where they are, and whether they had to be downloaded.

Every scheme's fetcher returns `FetchedFile`s, so these types sit below both `core` and `hf`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FetchedFile:
    """One fetched file. `cached` is True when it was already there and valid (no download)."""

    source: str  # redacted
    path: Path
    size: int
    sha256: str
    cached: bool


@dataclass(frozen=True)
class FetchResult:
    """What `fetch` delivered: `path` is the file or folder under `dest`."""

    source: str  # redacted
    path: Path
    files: tuple[FetchedFile, ...]
    total_bytes: int
    elapsed: float

    @property
    def cached(self) -> bool:
        """True when nothing had to be downloaded."""
        return all(f.cached for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings), e.g. for the CLI output or an Airflow XCom."""
        doc = asdict(self)
        doc["path"] = str(self.path)
        doc["files"] = [{**asdict(f), "path": str(f.path)} for f in self.files]
        doc["cached"] = self.cached
        return doc
