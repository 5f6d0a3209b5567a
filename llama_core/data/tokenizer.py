"""The sentencepiece tokenizer as the data stages use it: loading with clear errors, and the test
that lets a round be tokenized in one pass (see `llama_core.data.masking`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_core.errors import InputError

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
