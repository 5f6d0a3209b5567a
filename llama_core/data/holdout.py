"""A held-out evaluation split chosen by the content of each conversation record.

A record is held out when the hash of its conversation, mapped to [0, 1), falls below the
held-out fraction. The hash covers the canonical JSON of the record's `conversations` list only
(keys sorted, no spaces, non-ASCII kept), not its id or position: the split is the same however
the records are ordered or split into files, a record keeps its side when others are added or
removed, and duplicate conversations land on the same side (a copy of a held-out record never
trains the model). Used by `llama_preprocess --holdout_fraction`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llama_core.errors import InputError

HELDOUT_SUFFIX = "-heldout"


def holdout_score(record: Mapping[str, Any]) -> float:
    """The record's place in [0, 1): the first 8 bytes of the sha256 of the canonical JSON of its
    `conversations` (json.dumps with sort_keys, ensure_ascii=False and separators (",", ":"),
    UTF-8) as a big-endian integer, divided by 2**64. Only `conversations` counts."""
    text = json.dumps(record.get("conversations"), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(record: Mapping[str, Any], fraction: float) -> bool:
    """Whether the record belongs to the held-out split of `fraction` (its score is below it);
    never for fraction 0."""
    return fraction > 0 and holdout_score(record) < fraction


def check_fraction(fraction: float) -> float:
    """`fraction` as a float when 0 <= fraction < 1, else InputError naming the value."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise InputError(f"holdout_fraction must be a number in [0, 1), got {fraction!r}") from None
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise InputError(f"holdout_fraction must be in [0, 1), got {fraction!r}")
    return value


def default_eval_path(output_file: str | os.PathLike[str]) -> Path:
    """The held-out output beside `output_file`: `-heldout` inserted before its suffix
    (`alpaca.mindrecord` -> `alpaca-heldout.mindrecord`; `data` -> `data-heldout`)."""
    path = Path(output_file)
    return path.with_name(path.stem + HELDOUT_SUFFIX + path.suffix)
