"""Write one benchmark's section of docs/BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

from llama_core.atomic import write_bytes_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
WORK_DIR = REPO_ROOT / "bench" / "_work"

_HEADER = (
    "# Benchmarks\n\n"
    "Each section is written by the command it names, on this project's standard machine "
    "(2 cores, 24 GB, no accelerator). Re-run the command to refresh its section.\n"
)


def machine_line() -> str:
    """When and where a figure was measured, including the load from anything else running."""
    load1, _, _ = os.getloadavg()
    return (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, 1-min load before the run {load1:.2f}."
    )


def update_section(name: str, title: str, command: str, body: str) -> Path:
    """Replace (or append) the section `name` of docs/BENCHMARKS.md.

    The section states the command that produced it, the machine line, then `body` (markdown).
    """
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else _HEADER
    section = (
        f"<!-- begin {name} -->\n## {title}\n\nCommand: `{command}`\n\n{machine_line()}\n\n"
        f"{body.strip()}\n<!-- end {name} -->\n"
    )
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}"
    return write_bytes_atomic(BENCHMARKS_MD, text.encode())
