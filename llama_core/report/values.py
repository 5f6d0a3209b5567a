"""Readers of a report's values, all tolerant of what a failed or older run left out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def get(mapping: Any, dotted: str, default: Any = None) -> Any:
    """`mapping["a"]["b"]` for "a.b"; `default` when a level is missing or not a mapping."""
    for key in dotted.split("."):
        if not isinstance(mapping, Mapping) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def num(value: Any) -> float | None:
    """A finite number, or None (missing, null, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(items: Any) -> list[tuple[float, float]]:
    """(step, loss) pairs of a loss or eval series; a missing step is the item's position (1-based),
    a missing or null loss is NaN (drawn as a gap)."""
    pairs = []
    for i, item in enumerate(items or []):
        if not isinstance(item, Mapping):
            continue
        step, loss = num(item.get("step")), num(item.get("loss"))
        pairs.append((float(i + 1) if step is None else step, math.nan if loss is None else loss))
    return pairs


def count(value: Any) -> Any:
    """A count reported either as a number or as {"count": n, ...}."""
    return value.get("count") if isinstance(value, Mapping) else value
