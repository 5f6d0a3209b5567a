"""python -m llama_core.report REPORT_JSON_OR_RUN_DIR: print the summary of an existing report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llama_core.report.files import load_report
from llama_core.report.markdown import summary_text


def build_parser(prog: str = "python -m llama_core.report") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Print the summary of a fine-tune's report.")
    parser.add_argument("report", help="report.json, or the folder holding it (or a run folder with report/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    print(summary_text(load_report(build_parser().parse_args(argv).report)))
    return 0
