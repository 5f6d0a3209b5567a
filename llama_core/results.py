"""Stage results as plain JSON values: what the Airflow tasks put in XCom and `llama-lora` prints."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def to_jsonable(result: Any) -> Any:
    """A stage result (dataclasses, paths, lists) as plain JSON-able values.

    A result with its own `to_dict` is asked for it: it may add derived fields (a fetch's `cached`).
    """
    if callable(getattr(result, "to_dict", None)):
        return result.to_dict()
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {f.name: to_jsonable(getattr(result, f.name)) for f in dataclasses.fields(result)}
    if isinstance(result, Mapping):
        return {str(k): to_jsonable(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [to_jsonable(v) for v in result]
    if isinstance(result, Path):
        return str(result)
    return result


def print_result(result: Any) -> None:
    """Print a stage result as indented JSON on stdout."""
    print(json.dumps(to_jsonable(result), indent=2))
