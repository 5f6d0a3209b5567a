"""Streaming reader for record files: a JSON list of records, or JSON Lines.

Records are decoded one at a time with the standard library's C scanner over a sliding text
buffer, so memory holds one buffer and one record, never the whole file. Syntax errors name the
file, line and column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llama_core.errors import InputError

_BLOCK = 1 << 20
_WS = " \t\r\n"
_decoder = json.JSONDecoder()


class _Buffer:
    """A window on a text file that knows the line/column of any position in it."""

    def __init__(self, path: Path, on_read: Callable[[int], None] | None) -> None:
        self.path = path
        self._on_read = on_read
        self._f = open(path, encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.text = ""
        self.eof = False
        self._lines_before = 0  # newlines in the text dropped from the window
        self._col_before = 0  # characters after the last dropped newline

    def close(self) -> None:
        self._f.close()

    def more(self) -> bool:
        """Append a block; False at end of file."""
        if self.eof:
            return False
        try:
            block = self._f.read(_BLOCK)
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: not valid UTF-8 text ({exc.reason})") from None
        if not block:
            self.eof = True
            return False
        self.text += block
        if self._on_read:
            self._on_read(len(block))
        return True

    def drop(self, pos: int) -> int:
        """Forget text before `pos`; return the new position of what was at `pos`."""
        if pos < _BLOCK:
            return pos
        head = self.text[:pos]
        newlines = head.count("\n")
        if newlines:
            self._lines_before += newlines
            self._col_before = pos - head.rfind("\n") - 1
        else:
            self._col_before += pos
        self.text = self.text[pos:]
        return 0

    def where(self, pos: int) -> str:
        head = self.text[:pos]
        newlines = head.count("\n")
        line = self._lines_before + newlines + 1
        col = pos - head.rfind("\n") if newlines else self._col_before + pos + 1
        return f"line {line} column {col}"

    def skip_ws(self, pos: int) -> int:
        """Position of the next non-blank character, reading more as needed (len(text) at EOF)."""
        while True:
            while pos < len(self.text) and self.text[pos] in _WS:
                pos += 1
            if pos < len(self.text) or not self.more():
                return pos

    def value(self, pos: int) -> tuple[Any, int]:
        """Decode the JSON value starting at `pos`; return it and the position after it."""
        while True:
            try:
                obj, end = _decoder.raw_decode(self.text, pos)
            except json.JSONDecodeError as exc:
                if self.more():
                    continue
                raise InputError(f"{self.path}: invalid JSON at {self.where(exc.pos)}: {exc.msg}") from None
            # A number cut at the window's end would decode short: make sure something follows.
            if end < len(self.text) or not self.more():
                return obj, end


def iter_records(
    path: str | os.PathLike[str], on_read: Callable[[int], None] | None = None
) -> Iterator[tuple[int, Any]]:
    """Yield `(index, record)` for each record of a JSON list or JSON Lines file, in order.

    `on_read(n)` is called with the number of characters read by each block (for progress).
    Raises InputError naming the file, line and column on malformed JSON.
    """
    path = Path(path)
    try:
        buf = _Buffer(path, on_read)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        pos = buf.skip_ws(0)
        listed = buf.text[pos : pos + 1] == "["
        if listed:
            pos = buf.skip_ws(pos + 1)
            closed = buf.text[pos : pos + 1] == "]"
        index = 0
        while (listed and not closed) or (not listed and pos < len(buf.text)):
            obj, pos = buf.value(pos)
            yield index, obj
            index += 1
            pos = buf.drop(buf.skip_ws(pos))
            if listed:
                sep = buf.text[pos : pos + 1]
                if sep not in (",", "]"):
                    raise InputError(f"{path}: invalid JSON at {buf.where(pos)}: expected ',' or ']'")
                closed = sep == "]"
                pos = buf.skip_ws(pos) if closed else buf.skip_ws(pos + 1)
        if listed:
            pos = buf.skip_ws(pos + 1)
            if pos < len(buf.text):
                raise InputError(f"{path}: invalid JSON at {buf.where(pos)}: extra data after the list")
    finally:
        buf.close()


def record_error(path: str | os.PathLike[str], index: int, field: str, problem: str) -> InputError:
    """An InputError naming file, record index (0-based) and field."""
    return InputError(f"{path}: record {index}: field '{field}' {problem}")
