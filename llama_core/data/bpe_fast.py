"""A tiktoken fast path for byte-level BPE tokenizer.json files (Qwen2/2.5/3, Llama 3, GPT-2 style).

The `tokenizers` library spends most of an encode in its split-regex pre-tokenizer; tiktoken runs the
same split and the same BPE several times faster. `fast_bpe` builds a `tiktoken.Encoding` from a
tokenizer.json when it can reproduce it exactly: a BPE model over the byte-level alphabet, the
pre-tokenizer a Split regex followed by ByteLevel without its own regex (or ByteLevel with it), no
normalizer or NFC, added tokens split out first. The BPE ranks are the merge order: tiktoken merges
the adjacent pair whose concatenation has the lowest rank, `tokenizers` the pair of the earliest
merge, the same choice when each token's rank is its first merge's index. Anything else is left to
the `tokenizers` library, with the reason.

A fast path that passes the checks is then held to the library on `PROBES` before it is used; a
text the fast path does not cover (not in NFC under an NFC normalizer, or with a very long run that
tiktoken's regex handles slowly) is encoded by the library, call by call.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
import unicodedata
from collections.abc import Collection, Sequence
from typing import Any

# tokenizers' ByteLevel split regex (use_regex true), GPT-2's
BYTE_LEVEL_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# tiktoken's BPE is quadratic in a piece's length: texts with a longer run go through the library
_LONG_RUN_CHARS = 4096
_LONG_RUN = re.compile(rf"\s{{{_LONG_RUN_CHARS},}}|\S{{{_LONG_RUN_CHARS},}}")
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 bytes that do not start a character
# texts the fast path must encode as the library does before it is used (added tokens are appended)
PROBES = (
    "",
    "Hello, world! It's a test: we'll see, they've done it, I'm sure, you'd know, she's right.",
    "HELLO WORLD'S END. DON'T STOP",
    "Numbers 1234567890, 3.14159, 1,000,000 and 2026-12-05T08:00:00Z; 12345678901234567890123.",
    "中文分词测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Emoji 😀👍🏽🇫🇷 and 👨‍👩‍👧‍👦 family; café naïve Ünïcödé Ελληνικά русский عربي हिन्दी",
    "  leading spaces\n\n\ntabs\t\tand   runs       of spaces   \r\n\r\n trailing   ",
    " " * 40 + "\n" * 7 + "\t" * 5 + "x",
    "def f(x):\n    return x**2  # comment\n\n\nprint(f(3))\n",
    "<<<>>> !!! ??? ... --- *** ### $$$ %%% ^^^ &&& ((())) [[]] {{}} ||| ~~~ ``` '' \"\"",
    "a\u0301 e\u0301 (combining marks) \u00a0nbsp\u2009thin\u3000ideographic",
)


class FastEncoding:
    """What chat.py reads of a `tokenizers.Encoding`: ids, character offsets, char <-> token lookups
    (offsets as the library gives them: a token holding part of a character spans the character)."""

    __slots__ = ("_ends", "_starts", "ids")

    def __init__(self, ids: list[int], starts: list[int], ends: list[int]) -> None:
        self.ids, self._starts, self._ends = ids, starts, ends

    @property
    def offsets(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def char_to_token(self, pos: int) -> int | None:
        """The first token whose characters include `pos`; None when none does."""
        k = bisect.bisect_right(self._ends, pos)
        return k if k < len(self.ids) and self._starts[k] <= pos else None

    def token_to_chars(self, index: int) -> tuple[int, int]:
        return self._starts[index], self._ends[index]


class FastBPE:
    """A tokenizer.json's byte-level BPE through tiktoken: `encode` and `encoding` as the library's
    (no specials added), `library` (the `tokenizers.Tokenizer`) for the texts it leaves to it."""

    def __init__(
        self, enc: Any, to_id: Sequence[int] | None, token_bytes: dict[int, bytes], nfc: bool, library: Any
    ) -> None:
        self._enc, self._to_id, self._nfc, self.library = enc, to_id, nfc, library
        # per id: characters starting in the token, and those plus one when it starts inside a
        # character (so a token's offsets are computed from its neighbours' without its bytes)
        size = max(token_bytes) + 1
        self._n_starts, self._back = [0] * size, [0] * size
        for i, b in token_bytes.items():
            starts = len(b.translate(None, _CONTINUATION))
            self._n_starts[i] = starts
            self._back[i] = starts + (b[0] & 0xC0 == 0x80)

    def _covers(self, text: str) -> bool:
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            return False  # the library's offsets then point into the un-normalized text
        return len(text) < _LONG_RUN_CHARS or _LONG_RUN.search(text) is None

    def _ids(self, text: str) -> list[int]:
        ranks = self._enc.encode(text, allowed_special="all")
        return ranks if self._to_id is None else [self._to_id[r] for r in ranks]

    def encode(self, text: str) -> list[int]:
        if not self._covers(text):
            return self.library.encode(text, add_special_tokens=False).ids
        return self._ids(text)

    def encoding(self, text: str) -> Any:
        """A `FastEncoding` of `text`, or the library's `tokenizers.Encoding` for a text it leaves to it."""
        if not self._covers(text):
            return self.library.encode(text, add_special_tokens=False)
        ids = self._ids(text)
        ends = list(itertools.accumulate(map(self._n_starts.__getitem__, ids)))
        back = self._back
        return FastEncoding(ids, [e - back[i] for e, i in zip(ends, ids, strict=True)], ends)


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """The byte-level alphabet: GPT-2's printable character of each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


@functools.cache
def _to_latin1() -> dict[int, int]:
    """str.translate's table from the byte-level alphabet to the characters U+0000..U+00FF (so a
    byte-level token's bytes are `token.translate(table).encode("latin-1")`, in C)."""
    return {ord(c): b for c, b in _byte_alphabet().items()}


def _pattern(pre: dict[str, Any] | None) -> str:
    """The split regex of a byte-level pre-tokenizer layout; ValueError saying why it is not one."""
    kind = (pre or {}).get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            raise ValueError("ByteLevel pre-tokenizer with add_prefix_space or without its regex")
        return BYTE_LEVEL_PATTERN
    steps = pre.get("pretokenizers", []) if kind == "Sequence" else []
    if len(steps) != 2 or [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        raise ValueError(f"pre-tokenizer {kind} is not a Split regex then ByteLevel, nor ByteLevel")
    split, level = steps
    regex = split.get("pattern", {}).get("Regex")
    if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
        raise ValueError("the Split pre-tokenizer is not an isolated, non-inverted regex")
    if level.get("add_prefix_space") or level.get("use_regex", True):
        raise ValueError("the ByteLevel after Split adds a prefix space or splits again")
    return regex


def _check_layout(doc: dict[str, Any]) -> bool:
    """Raises ValueError when the tokenizer.json's other parts differ from what the fast path does;
    True when its normalizer is NFC."""
    norm = doc.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"normalizer {norm.get('type')} (only NFC is reproduced)")
    post = doc.get("post_processor") or {}
    for step in post.get("processors", [post]) if post.get("type") == "Sequence" else [post]:
        kind = step.get("type")
        if kind == "ByteLevel" and step.get("trim_offsets"):
            raise ValueError("the ByteLevel post-processor trims offsets")
        if kind not in (None, "ByteLevel", "TemplateProcessing"):  # the template adds specials only
            raise ValueError(f"post-processor {kind}")
    model = doc.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"model {model.get('type')} is not BPE")
    if model.get("dropout") or model.get("byte_fallback"):
        raise ValueError("BPE with dropout or byte fallback")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("BPE with a subword prefix or word suffix")
    added = doc.get("added_tokens", [])
    if any(t.get("single_word") or t.get("lstrip") or t.get("rstrip") for t in added):
        raise ValueError("an added token strips spaces or matches single words only")
    texts = [t["content"] for t in added]
    if any(a != b and b.startswith(a) for a in texts for b in texts):
        raise ValueError("an added token is a prefix of another (tiktoken's choice between them differs)")
    if norm is not None and any(not unicodedata.is_normalized("NFC", t) for t in texts):
        raise ValueError("an added token is not in NFC")
    return norm is not None


def _ranks(model: dict[str, Any], added: Collection[str]) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """tiktoken's mergeable ranks and each token's HF id, by the token's bytes. A token's rank is its
    HF id when ids grow with the merge order (no table needed), else its first merge's position after
    the 256 bytes. Vocabulary entries no merge makes must be `added` tokens (split out before the BPE,
    never reached by it): they are left out."""
    alphabet, table = _byte_alphabet(), _to_latin1()
    vocab: dict[str, int] = model["vocab"]
    if any(c not in vocab for c in alphabet):
        raise ValueError("the vocabulary lacks some of the 256 byte tokens")
    merges = model["merges"]
    # merges are pairs, or "left right" strings in older files (a byte-level token has no space)
    results = [m.replace(" ", "") if isinstance(m, str) else "".join(m) for m in merges]
    if outside := set(results) - vocab.keys():
        raise ValueError(f"merges make tokens outside the vocabulary ({sorted(outside)[:3]})")
    made = dict(zip(reversed(results), range(len(results) - 1, -1, -1), strict=True))  # first merge wins
    if any(t not in made and t not in alphabet for t in vocab if t not in added):
        raise ValueError("the vocabulary has tokens no merge makes")
    vocab = {t: i for t, i in vocab.items() if t in made or t in alphabet}
    if not set("".join(vocab)) <= alphabet.keys():
        raise ValueError("the vocabulary is not byte-level")
    ids = {t.translate(table).encode("latin-1"): i for t, i in vocab.items()}
    order = sorted(made, key=made.__getitem__)
    if all(vocab[a] < vocab[b] for a, b in itertools.pairwise(order)):
        return ids, ids
    ranks = {bytes([b]): b for b in alphabet.values()}
    ranks |= {t.translate(table).encode("latin-1"): 256 + n for n, t in enumerate(order)}
    return ranks, ids


def fast_bpe(doc: dict[str, Any], library: Any) -> tuple[FastBPE | None, str]:
    """A `FastBPE` for tokenizer.json `doc` (parsed) and "", or None and why it cannot be one.
    `library` is the file's `tokenizers.Tokenizer`: the reference on `PROBES`, and the path for the
    texts the fast path leaves to it."""
    import tiktoken

    try:
        nfc = _check_layout(doc)
        pattern = _pattern(doc.get("pre_tokenizer"))
        vocab = doc["model"]["vocab"]
        # an added token that is also in the model's vocabulary has the model's id (as the library has)
        added = {t["content"]: vocab.get(t["content"], t["id"]) for t in doc.get("added_tokens", [])}
        ranks, ids = _ranks(doc["model"], added)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return None, str(exc)
    to_id, specials = None, added
    if ranks is not ids or set(added.values()) & set(ids.values()):
        # the added tokens ranked past the BPE's; a table from rank to HF id
        past = max(ranks.values()) + 1
        specials = {text: past + n for n, text in enumerate(added)}
        to_id = [0] * (past + len(added))
        for b, r in ranks.items():
            to_id[r] = ids[b]
        for text, r in specials.items():
            to_id[r] = added[text]
    try:
        enc = tiktoken.Encoding(
            name="tokenizer.json", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
    except ValueError as exc:
        return None, f"tiktoken refuses it ({exc})"
    token_bytes = {i: b for b, i in ids.items()} | {i: t.encode() for t, i in added.items()}
    fast = FastBPE(enc, to_id, token_bytes, nfc, library)
    for probe in (*PROBES, "".join(f"x{t} {t}\n" for t in added)):
        if fast.encode(probe) != library.encode(probe, add_special_tokens=False).ids:
            return None, f"it encodes {probe[:40]!r} unlike the tokenizers library"
    return fast, ""
