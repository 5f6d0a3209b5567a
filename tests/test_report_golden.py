"""The report renders every golden report.json to the very bytes it rendered before (tests/data/
report_golden/README.md): a refactor of the report cannot lose or change a figure unnoticed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_core.report import render_markdown, summary_text

GOLDEN = Path(__file__).parent / "data" / "report_golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "report.json").is_file())


def test_there_are_goldens() -> None:
    assert len(CASES) >= 10


@pytest.mark.parametrize("case", CASES)
def test_report_md_and_summary_match_the_golden(case: str) -> None:
    folder = GOLDEN / case
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert render_markdown(report) == (folder / "report.md").read_text(encoding="utf-8")
    assert summary_text(report) + "\n" == (folder / "summary.txt").read_text(encoding="utf-8")
