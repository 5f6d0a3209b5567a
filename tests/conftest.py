"""Test helpers. Shared data (real tokenizer, Alpaca sample) is found through `shared_file`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from llama_core.demo import DemoInputs

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


# The longest files, first: under `make test` (pytest-xdist, --dist loadfile) each worker starts on
# one of them and the other files fill in behind, instead of one of them starting last.
LONGEST_FIRST = ("test_stack.py", "test_airflow_live.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keeps its order


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


# -- the tokenizers of the chat formats (tests/chat_tokenizers.py)
@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model (tiktoken BPE), from the llama-models package."""
    from chat_tokenizers import llama3_model

    return llama3_model()


def _alpaca_texts(alpaca_path: Path) -> list[str]:
    import json

    return [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in json.loads(alpaca_path.read_text())]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, alpaca_path: Path) -> Path:
    """A Qwen-style HF tokenizer folder whose chat_template is ChatML with a default system message."""
    from chat_tokenizers import CHATML_WITH_SYSTEM, build_hf_tokenizer

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    return build_hf_tokenizer(folder, _alpaca_texts(alpaca_path), CHATML_WITH_SYSTEM)


@pytest.fixture(scope="session")
def plain_hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer_dir: Path) -> Path:
    """The same tokenizer without a chat_template (the built-in chatml format's case)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("plain_hf_tokenizer")
    for f in hf_tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


CHAT_TOKENIZERS = {
    "vicuna_v1.1": "tokenizer_path",
    "llama3": "llama3_tokenizer_path",
    "hf": "hf_tokenizer_dir",
    "chatml": "plain_hf_tokenizer_dir",
}


@pytest.fixture
def chat_case(request: pytest.FixtureRequest) -> tuple[Path, str]:
    """(tokenizer, chat_template) for the chat format the test is parametrized with (indirect)."""
    return request.getfixturevalue(CHAT_TOKENIZERS[request.param]), request.param


def _shared_demo_inputs(factory: pytest.TempPathFactory) -> DemoInputs:
    """The demo's inputs built once per `make test`, not once per xdist worker or per module (it
    pre-trains the base model, about a minute on 2 busy cores): in the folder both workers share,
    under a lock; a later call finds the files a first build wrote whole."""
    import fcntl
    import os

    from llama_core.demo import make_demo_inputs

    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's popen-gwN
    with open(base / "demo_inputs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return make_demo_inputs(base / "demo_inputs")


@pytest.fixture(scope="session")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> DemoInputs:
    """The demo's generated inputs (`llama_core.demo`): Alpaca records, tokenizer, tiny Llama (HF, .ckpt).
    Read-only: a test that changes or adds files works on a copy (`copy_demo_inputs`)."""
    return _shared_demo_inputs(tmp_path_factory)


@pytest.fixture(scope="session")
def copy_demo_inputs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """`copy(dest)`: the demo's inputs copied to `dest` (modification times kept), returning `dest`.
    (Not over the `demo_inputs` fixture: modules that name their own copy so would shadow it.)"""
    import shutil

    def copy(dest: Path) -> Path:
        shutil.copytree(_shared_demo_inputs(tmp_path_factory).alpaca.parent, dest)
        return dest

    return copy
