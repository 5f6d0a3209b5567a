"""Shared CLI plumbing: logging set-up and turning user-facing errors into exit codes."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from llama_core.errors import LlamaCoreError

EXIT_USER_ERROR = 2
ERROR_PREFIX = "error: "  # how a user-facing error's line starts (launch.watch finds it in rank logs)


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines as `LEVEL logger: message` on stderr; the logger name says which stage spoke."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def exit_code(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """The exit code of a CLI's `main`: a `LlamaCoreError` prints `error: <message>` and gives 2."""
    setup_logging()
    try:
        return main(argv)
    except LlamaCoreError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def exit_without_teardown(code: int) -> NoReturn:
    """End the process with `code` at once, skipping the interpreter's teardown.

    For CLIs that load MindSpore only to write files: its teardown takes about 0.25 s, after the
    outputs are already durable. Log handlers and the standard streams are flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
