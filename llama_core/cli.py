"""Shared CLI plumbing: logging set-up and turning user-facing errors into exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from llama_core.errors import LlamaCoreError

EXIT_USER_ERROR = 2


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines as `LEVEL logger: message` on stderr; the logger name says which stage spoke."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a stage's `main`; a `LlamaCoreError` prints `error: <message>` and exits 2."""
    setup_logging()
    try:
        return main(argv)
    except LlamaCoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
