"""Test helpers. Shared data (real tokenizer, Alpaca sample) is found through `shared_file`."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def shared_file(relative: str) -> Path:
    """A file under `../shared` (beside the repo, as laid out for developers and CI).

    Skips the calling test, naming the missing path, when the shared folder is absent.
    """
    path = SHARED_DIR / relative
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (expected ../shared beside the repo root)")
    return path


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    """The real Llama 2 sentencepiece model (32,000 pieces)."""
    return shared_file("data/llama2-tokenizer.model")


@pytest.fixture(scope="session")
def alpaca_path() -> Path:
    """The real 999-record Alpaca sample."""
    return shared_file("data/alpaca_en_demo.json")


@pytest.fixture(autouse=True)
def _isolated_digest_memo(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the file-digest memo out of the user's home during tests."""
    monkeypatch.setenv("LLAMA_CORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "llama_core_cache"))
