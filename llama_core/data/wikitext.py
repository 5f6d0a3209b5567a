"""Wikitext -> token stream, as MindFormers' `llama_preprocess.py` does for `wiki`
(docs/REFERENCE.md, token layout): the reference's clean-up, blank-line separated paragraphs
(headings skipped), each tokenized as bos + ids + eos. Chunks are tokenized in the worker processes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.data.tokenizer import BOS, EOS, load_tokenizer
from llama_core.errors import InputError

_WIKI_REPLACE = [
    ("s '", "s'"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
]  # fmt: skip
_WIKI_BRACKETS = [
    (r"/' [0-9]/", r"/'[0-9]/"),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (r"'\s*([^']*?)\s*'", r"'\1'"),
]
_WIKI_TAIL = [
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
    (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
]  # fmt: skip


def clean_wikitext(text: str) -> str:
    """The reference's wikitext clean-up (detokenize spacing, number separators, brackets)."""
    text = text.replace(*_WIKI_REPLACE[0])
    text = re.sub(*_WIKI_BRACKETS[0], text)
    for old, new in _WIKI_REPLACE[1:]:
        text = text.replace(old, new)
    for pattern, repl in _WIKI_BRACKETS[1:]:
        text = re.sub(pattern, repl, text)
    for old, new in _WIKI_TAIL:
        text = text.replace(old, new)
    return text


def wiki_paragraphs(files: list[str]) -> Iterator[str]:
    """Paragraphs to tokenize: blank-line separated, headings ('=') skipped. Each file is read
    whole, as the reference does, since its clean-up regexes may span lines."""
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{name}: cannot read as UTF-8 text ({exc})") from None
        for para in clean_wikitext(text).split("\n\n"):
            if para and not para.strip().startswith("="):
                yield para


_STATE: dict[str, Any] = {}  # this worker's tokenizer (set by init_wiki_worker)


def init_wiki_worker(model_file: str) -> None:
    """Load the tokenizer once per worker process."""
    _STATE["sp"] = load_tokenizer(model_file)


def wiki_chunk(paras: list[str]) -> np.ndarray:
    """Token ids of paragraphs, each as bos + ids + eos, concatenated."""
    out: list[int] = []
    for ids in _STATE["sp"].encode(paras):
        out.append(BOS)
        out += ids
        out.append(EOS)
    return np.asarray(out, dtype=np.int32)
