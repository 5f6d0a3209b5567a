"""The run report: what a fine-tune hands back to the ML engineer, in one folder per run.

A run's results are spread over many stages (cache hits, the data report, train_summary.json, the
before/after evaluation, the adapter and checkpoints). `write_report` gathers them into report.json;
`report_view` (model.py) derives every figure a reader sees from it, once: report.md and the summary
text are templates over that model (markdown.py, templates/), the Airflow "Fine-tune" tab shows the
same model from the report task's XCom, and plot.py draws loss_curve.png.
"""

from llama_core.report.cli import build_parser, main
from llama_core.report.files import (
    REPORT_VERSION,
    ReportResult,
    Stage,
    config_digest,
    find_report,
    load_report,
    write_report,
)
from llama_core.report.markdown import markdown_of, render_markdown, summary_of, summary_text
from llama_core.report.model import (
    JSON_NAME,
    MARKDOWN_NAME,
    PLOT_NAME,
    VIEW_MAX_BYTES,
    bounded_view,
    report_view,
    view_size,
)
from llama_core.report.plot import PLOT_DPI, PLOT_SIZE_INCHES, plot_losses

__all__ = [
    "JSON_NAME",
    "MARKDOWN_NAME",
    "PLOT_DPI",
    "PLOT_NAME",
    "PLOT_SIZE_INCHES",
    "REPORT_VERSION",
    "VIEW_MAX_BYTES",
    "ReportResult",
    "Stage",
    "bounded_view",
    "build_parser",
    "config_digest",
    "find_report",
    "load_report",
    "main",
    "markdown_of",
    "plot_losses",
    "render_markdown",
    "report_view",
    "summary_of",
    "summary_text",
    "view_size",
    "write_report",
]
