"""Tokenizers as the data stages and the evaluation use them.

Llama 2's sentencepiece model (loading with clear errors, and the test that lets a round be tokenized
in one pass, see `llama_core.data.masking`), Llama 3's tiktoken BPE file and Hugging Face tokenizer
folders, each behind the small `Tokenizer` interface; `open_tokenizer` decides the kind from the path.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_core.data.bpe_fast import FastBPE, fast_bpe
from llama_core.errors import InputError

log = logging.getLogger("llama_core.data.tokenizer")

BOS, EOS = 1, 2  # Llama's sentencepiece ids; MindFormers' Tokenize() wraps every text in them


def load_tokenizer(model_file: str | os.PathLike[str]) -> Any:
    """A sentencepiece processor; InputError naming the file when absent or unreadable."""
    import sentencepiece as spm

    path = Path(model_file)
    if not path.is_file():
        raise InputError(f"{path}: tokenizer model file not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{path}: not a valid sentencepiece model ({exc})") from None


def _wire_fields(buf: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, payload) of a protobuf message; payload None for non length-delimited."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 2:
            n = varint()
            yield key >> 3, buf[pos : pos + n]
            pos += n
        else:
            if wire == 0:
                varint()
            else:
                pos += {1: 8, 5: 4}[wire]
            yield key >> 3, None


def splits_at_spaces(sp: Any) -> bool:
    """True when encoding `x + " " + y` (x not ending in a space) always equals encode(x) followed
    by encode(y): no piece can join text with a following space mark.

    Holds when the normalizer is the identity, a dummy prefix is added, extra spaces are kept,
    and no normal or user-defined piece has a space mark after a non-space character. The model
    proto is scanned directly (parsing its 32,000 pieces with protobuf classes takes a second).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    specs = {}
    for number, payload in _wire_fields(sp.serialized_model_proto()):
        if number == 1 and payload is not None:  # a piece: its text is field 1
            text = next((p for n, p in _wire_fields(payload) if n == 1 and p is not None), b"").decode()
            if "\u2581" in text.lstrip("\u2581"):
                return False
        elif number in (2, 3) and payload is not None:
            specs[number] = payload
    trainer = pb.TrainerSpec.FromString(specs.get(2, b""))
    norm = pb.NormalizerSpec.FromString(specs.get(3, b""))
    return (
        norm.name == "identity"
        and norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and not trainer.treat_whitespace_as_suffix
    )


# -- every supported tokenizer behind one small interface
SPECIAL_TOKENS_LLAMA3 = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
)  # fmt: skip
LLAMA3_SPECIALS = 256  # special tokens after the BPE ranks; the rest are reserved ones
# Meta's split regex for Llama 3 (llama_models.llama3.tokenizer.Tokenizer.pat_str)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's Tokenizer.encode cuts its input into slices of at most this many characters, and those at
# runs of more than this many consecutive whitespace / non-whitespace characters (tiktoken issue 195)
_TIKTOKEN_MAX_CHARS, _TIKTOKEN_MAX_RUN = 400_000, 25_000
_LONG_RUN = re.compile(rf"\s{{{_TIKTOKEN_MAX_RUN + 1},}}|\S{{{_TIKTOKEN_MAX_RUN + 1},}}")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")
HF_FILES = (  # what makes an HF tokenizer folder (the first is required)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json",
)  # fmt: skip
_HF_TEMPLATE_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """What the chat formats and the stages need of a tokenizer, whatever its kind.

    `encode` never adds special tokens; `specials` maps the special tokens' text to their ids;
    `stop_ids` are the ids that end a generation (eos, and for HF also generation_config's);
    `chat_template` is an HF tokenizer's own Jinja template (None otherwise); `files` determine it
    (cache keys).
    """

    kind: str
    path: Path
    files: tuple[Path, ...]
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    specials: dict[str, int]
    stop_ids: frozenset[int]
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        raise NotImplementedError

    def special_id(self, name: str) -> int:
        """The id of special token `name`; InputError naming the tokenizer when it has none."""
        try:
            return self.specials[name]
        except KeyError:
            raise InputError(f"{self.path}: the {self.kind} tokenizer has no special token {name}") from None


class SentencePieceTokenizer(Tokenizer):
    """Llama 2's sentencepiece model; `sp` is the processor (masking's fast path uses it)."""

    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        self.path, self.files = path, (path,)
        self.sp = sp = load_tokenizer(path)
        self.vocab_size = sp.get_piece_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.specials = {
            sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)
        }
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))  # sentencepiece drops control pieces itself


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken BPE file (base64 token and rank per line), with Meta's special tokens and
    split regex, encoding as Meta's `Tokenizer.encode` does."""

    kind = "tiktoken"

    def __init__(self, path: Path) -> None:
        import tiktoken

        self.path, self.files = path, (path,)
        ranks = {}
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            token, _, rank = line.partition(b" ")
            try:
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                if line.strip():
                    raise InputError(f"{path}: line {n} is not a base64 token and its rank") from None
        names = [*SPECIAL_TOKENS_LLAMA3]
        names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_SPECIALS - len(names))]
        self.specials = {name: len(ranks) + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.specials
        )
        self.vocab_size = len(ranks) + len(names)
        self._first_special = len(ranks)
        self.bos_id, self.eos_id = self.specials["<|begin_of_text|>"], self.specials["<|end_of_text|>"]
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _meta_slices(text):
            ids += self.model.encode_ordinary(piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode([i for i in ids if i < self._first_special])


def _meta_slices(text: str) -> Iterator[str]:
    """`text` cut where Meta's `Tokenizer.encode` cuts it (see _TIKTOKEN_MAX_CHARS)."""
    for i in range(0, len(text), _TIKTOKEN_MAX_CHARS):
        chunk, start = text[i : i + _TIKTOKEN_MAX_CHARS], 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + _TIKTOKEN_MAX_RUN, run.end(), _TIKTOKEN_MAX_RUN):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder: tokenizer.json (encoded through tiktoken when `bpe_fast` can
    reproduce it, `fast`; else through the `tokenizers` library, `model`, which also decodes), the
    chat template and special tokens of tokenizer_config.json (or chat_template.jinja and
    special_tokens_map.json), and the stop ids of generation_config.json. `template_tokens` are the
    special token strings the chat template is rendered with (as transformers passes them)."""

    kind = "hf"

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = folder
        self.files = tuple(folder / name for name in HF_FILES if (folder / name).is_file())
        try:
            self.model = RustTokenizer.from_file(str(folder / HF_FILES[0]))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise InputError(f"{folder / HF_FILES[0]}: not a valid tokenizer.json ({exc})") from None
        config = {
            **_json_file(folder / "special_tokens_map.json"),
            **_json_file(folder / "tokenizer_config.json"),
        }
        self.template_tokens = {
            k: text for k in _HF_TEMPLATE_TOKENS if (text := _token_text(config.get(k))) is not None
        }
        self.chat_template = _chat_template(folder, config)
        self.specials = {t.content: i for i, t in self.model.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self.model.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = (
            self.model.token_to_id(self.template_tokens[k]) if k in self.template_tokens else None
            for k in ("bos_token", "eos_token")
        )
        stops = _json_file(folder / "generation_config.json").get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else [i for i in stops or () if isinstance(i, int)]
        self.stop_ids = frozenset(i for i in (*stops, self.eos_id) if i is not None)

    @functools.cached_property
    def fast(self) -> FastBPE | None:
        """The tiktoken fast path, or None (said in the log) when it cannot reproduce the file. Built on
        first use: a process that only opens the tokenizer (the stage's main one) skips its cost."""
        fast, why = fast_bpe(_json_file(self.path / HF_FILES[0]), self.model)
        if fast is None:
            log.info(
                "%s: encoding with the tokenizers library, not tiktoken: %s", self.path / HF_FILES[0], why
            )
        return fast

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast.encode(text)
        return self.model.encode(text, add_special_tokens=False).ids

    def encoding(self, text: str) -> Any:
        """The encoding of `text` (no specials added): ids and where each token is (`ids`, `offsets`,
        `char_to_token`, `token_to_chars` of a `tokenizers.Encoding`)."""
        if self.fast is not None:
            return self.fast.encoding(text)
        return self.model.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=True)


def _json_file(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: must hold a JSON object")
    return doc


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The folder's default chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def tokenizer_kind(path: str | os.PathLike[str]) -> str:
    """ "sentencepiece", "tiktoken" or "hf", decided from the path: a folder or a tokenizer.json is
    HF (a folder without tokenizer.json but with a tokenizer.model is that file); a `.model` file is
    tiktoken when it starts with a base64 token and its rank, else sentencepiece."""
    path = Path(path)
    if path.is_dir():
        if (path / HF_FILES[0]).is_file() or not (path / "tokenizer.model").is_file():
            return "hf"
        path = path / "tokenizer.model"
    elif path.name.endswith(".json"):
        return "hf"
    if not path.is_file():
        raise InputError(f"{path}: tokenizer model file not found")
    with open(path, "rb") as f:
        head = f.read(256)
    return "tiktoken" if _TIKTOKEN_LINE.match(head) else "sentencepiece"


def open_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer at `path`, of the kind `tokenizer_kind` decides; InputError naming the path when
    it is absent or not a tokenizer of that kind."""
    path = Path(path)
    kind = tokenizer_kind(path)
    if kind == "hf":
        folder = path if path.is_dir() else path.parent
        if not (folder / HF_FILES[0]).is_file():
            raise InputError(f"{folder}: no tokenizer.json (nor tokenizer.model) in this tokenizer folder")
        return HFTokenizer(folder)
    if path.is_dir():
        path = path / "tokenizer.model"
    return TiktokenTokenizer(path) if kind == "tiktoken" else SentencePieceTokenizer(path)
