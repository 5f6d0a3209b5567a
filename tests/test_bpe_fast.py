"""The tiktoken fast path of HF tokenizer.json files (llama_core.data.bpe_fast) against the `tokenizers`
library: the same ids, offsets and char <-> token lookups (what chat.py reads) on every real Alpaca
record and on hard cases, for the tokenizer.json layouts it takes; the library, said in the log, for
those it cannot reproduce.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llama_core.data.bpe_fast import FastEncoding
from llama_core.data.tokenizer import HFTokenizer, open_tokenizer

HARD = [
    "",
    " ",
    "\n",
    "Grüß dich, 世界? Ça va — naïve café 😀 Servus 🌍. Ελληνικά, русский, עברית",
    "中文分词测试：你好，世界！这是一个很长的句子，没有空格。日本語のテキストも。",
    "👨‍👩‍👧‍👦🏳️‍🌈🇯🇵 emoji only 🙂🙂🙂",
    "digits 0123456789 3.14159265358979 1,000,000 -42 +7e10 ٣٤٥ ①②③",
    "spaces"
    + " " * 300
    + "tabs"
    + "\t" * 50
    + "newlines"
    + "\n" * 80
    + "mixed \r\n \n\t \u00a0\u3000 end   ",
    "a" + " " * 5000 + "b",  # a run past the fast path's limit: the library encodes it
    "x" * 6000,
    "Type <|im_end|> or <|im_start|>user\n<|endoftext|><|im_end|><|im_end|>x<|im_start|>",
    "I'm sure you'll see they've done it, she'd said; DON'T YOU'RE 'S 'll",
    "e\u0301te\u0301 \u212b",  # not in NFC: a normalizing tokenizer leaves it to the library
    "<|im_end",
]
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def texts(alpaca_path: Path) -> list[str]:
    """Every real Alpaca record as ChatML text (the specials inside it), then the hard cases."""
    records = json.loads(alpaca_path.read_text())
    rendered = [
        f"<|im_start|>user\n{r['instruction']}\n{r['input']}<|im_end|>\n<|im_start|>assistant\n{r['output']}<|im_end|>\n"
        for r in records
    ]
    assert len(rendered) >= 200
    return rendered + HARD


def _train(folder: Path, tok: RustTokenizer, texts: list[str], **trainer: object) -> Path:
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=2000,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            **trainer,
        ),
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def gpt2_style_dir(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    """A GPT-2-style byte-level BPE: ByteLevel's own split regex, no normalizer, <|endoftext|> inside
    the vocabulary (id 0, as the trainer puts it), a non-special added token."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    return _train(tmp_path_factory.mktemp("gpt2_style"), tok, texts[:999], special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module")
def permuted_dir(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer_dir: Path) -> Path:
    """The Qwen-style tokenizer with its merged tokens' ids reversed: ids no longer follow the merge
    order, so the fast path ranks tokens by merge and maps ranks to ids through a table."""
    doc = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    merged = sorted((i for i in vocab.values() if i >= 256), reverse=True)
    new = dict(zip(sorted(merged), merged, strict=True))
    doc["model"]["vocab"] = {t: new.get(i, i) for t, i in vocab.items()}
    folder = tmp_path_factory.mktemp("permuted")
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture(scope="module")
def llama3_converted_dir(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer_path: Path) -> Path:
    """Meta's Llama 3 BPE converted by transformers' TikTokenConverter (the bench's hf tokenizer): every
    split of a token is a merge, ignore_merges, ChatML's tokens added past the vocabulary."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama_core.data.tokenizer import LLAMA3_PATTERN

    n = sum(1 for line in llama3_tokenizer_path.read_bytes().splitlines() if line.strip())
    converter = TikTokenConverter(
        vocab_file=str(llama3_tokenizer_path),
        pattern=LLAMA3_PATTERN,
        extra_special_tokens={t: n + i for i, t in enumerate(SPECIALS)},
    )
    folder = tmp_path_factory.mktemp("llama3_converted")
    converter.converted().save(str(folder / "tokenizer.json"))
    return folder


def assert_same_as_library(tok: HFTokenizer, texts: list[str]) -> None:
    """Ids, offsets and every char_to_token / token_to_chars answer equal the library's."""
    for text in texts:
        ref, got = tok.model.encode(text, add_special_tokens=False), tok.encoding(text)
        assert tok.encode(text) == ref.ids, text[:60]
        assert got.ids == ref.ids, text[:60]
        assert got.offsets == ref.offsets, text[:60]
        assert [got.char_to_token(c) for c in range(len(text) + 1)] == [
            ref.char_to_token(c) for c in range(len(text) + 1)
        ], text[:60]
        assert [got.token_to_chars(k) for k in range(len(ref.ids))] == [
            ref.token_to_chars(k) for k in range(len(ref.ids))
        ], text[:60]


@pytest.mark.parametrize(
    "layout", ["hf_tokenizer_dir", "gpt2_style_dir", "permuted_dir", "llama3_converted_dir"]
)
def test_fast_path_equals_tokenizers(layout: str, request: pytest.FixtureRequest, texts: list[str]) -> None:
    tok = open_tokenizer(request.getfixturevalue(layout))
    assert tok.fast is not None
    assert isinstance(tok.encoding(texts[0]), FastEncoding)  # the fast path, not the library, answers
    assert_same_as_library(tok, texts)


def test_permuted_ids_go_through_a_table(hf_tokenizer_dir: Path, permuted_dir: Path) -> None:
    plain, permuted = open_tokenizer(hf_tokenizer_dir), open_tokenizer(permuted_dir)
    assert plain.fast._to_id is None and permuted.fast._to_id is not None
    assert plain.encode("Hello there") != permuted.encode("Hello there")


def _byte_vocab() -> dict[str, int]:
    return {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}


def _save(folder: Path, tok: RustTokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_library_for_what_tiktoken_cannot_reproduce(
    tmp_path: Path, texts: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    wordpiece = RustTokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "##re": 2, "a": 3}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    metaspace = RustTokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    metaspace.train_from_iterator(texts[:200], trainers.BpeTrainer(vocab_size=500, show_progress=False))
    # merges that take a different path from tiktoken's: "he" before "th", "the" made from "th"+"e",
    # so the library leaves "they" as t|he|y where tiktoken makes the|y
    vocab = _byte_vocab() | {"he": 256, "th": 257, "the": 258}
    diverging = RustTokenizer(models.BPE(vocab, [("h", "e"), ("t", "h"), ("th", "e")]))
    diverging.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    cases = {
        "wordpiece": (wordpiece, "model WordPiece is not BPE"),
        "metaspace": (metaspace, "pre-tokenizer Metaspace is not a Split regex then ByteLevel"),
        "diverging": (diverging, "unlike the tokenizers library"),
    }
    for name, (lib, why) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llama_core.data.tokenizer"):
            tok = open_tokenizer(_save(tmp_path / name, lib))
            assert tok.fast is None  # built (and said) on first use
        said = [
            r.getMessage() for r in caplog.records if "encoding with the tokenizers library" in r.getMessage()
        ]
        assert len(said) == 1 and why in said[0], (name, said)
        assert tok.encode(texts[1]) == lib.encode(texts[1], add_special_tokens=False).ids
