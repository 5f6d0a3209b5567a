"""report.md and the summary text: Jinja2 templates (templates/) over the report's data model.

The templates hold the layout; the filters here hold the formatting of a figure (4 decimals for a
loss, "—" for an unknown) and the escaping that keeps model text from breaking the markdown: a code
span or a fenced block longer than any backtick run in its text, table cells with their pipes escaped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import jinja2

from llama_core.progress import human_seconds
from llama_core.report.model import PLOT_NAME, report_view
from llama_core.report.values import num


def fmt_loss(value: Any) -> str:
    v = num(value)
    return "—" if v is None else f"{v:.4f}"


def fmt_ppl(value: Any) -> str:
    v = num(value)
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 1e4 else f"{v:.3e}"


def fmt_int(value: Any) -> str:
    v = num(value)
    if v is None:
        return "—"
    return f"{v:,.0f}" if v == int(v) else f"{v:,}"


def fmt_seconds(value: Any) -> str:
    v = num(value)
    if v is None:
        return "—"
    return f"{v:.1f}s" if v < 10 else human_seconds(v)


def fmt_rate(value: Any) -> str:
    v = num(value)
    return "—" if v is None else f"{v:,.0f} tokens/s"


def fmt_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def fmt_change(change: Mapping[str, Any] | None, digits: int = 4) -> str:
    """'-0.5719, -27.2%' for a change of -0.5719 from 2.1040; '' when unknown."""
    if change is None:
        return ""
    text = f"{change['delta']:+.{digits}f}"
    return text if change["percent"] is None else f"{text}, {change['percent']:+.1f}%"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall("`+", text)), default=0)


def code(text: Any) -> str:
    """An inline code span holding `text` whatever backticks it contains (newlines become spaces)."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    if not text:
        return "(empty)"
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def fenced(text: Any, info: str = "text") -> str:
    """A fenced block that `text` cannot close: the fence is longer than its longest backtick run."""
    text = str(text)
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def row(*cells: Any) -> str:
    """A table row, each cell on one line with its pipes escaped (GitHub reads `\\|` as a pipe, in
    code spans too)."""
    one_line = (str(c).replace("\r", " ").replace("\n", " ").replace("|", "\\|") for c in cells)
    return "| " + " | ".join(one_line) + " |"


def checked(answer: Mapping[str, Any]) -> str:
    """An answer (model.py's) as a table cell: its check mark, then its text as a code span."""
    mark = "" if answer["right"] is None else "✓ " if answer["right"] else "✗ "
    return mark + (code(answer["output"]) if answer["output"] else "(no text)")


@cache
def _environment() -> jinja2.Environment:
    # markdown, not HTML: escaping is the filters' (code, fenced, row), autoescape would add entities
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("llama_core.report", "templates"),
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(
        loss=fmt_loss,
        ppl=fmt_ppl,
        int=fmt_int,
        secs=fmt_seconds,
        rate=fmt_rate,
        value=fmt_value,
        change=fmt_change,
        code=code,
        fenced=fenced,
        g=lambda v: f"{v:g}",
        pct=lambda v: f"{v:.1%}",
    )
    env.globals.update(row=row, checked=checked, PLOT_NAME=PLOT_NAME)
    return env


def markdown_of(view: Mapping[str, Any]) -> str:
    """report.md's text for a report's data model (`report_view`)."""
    return _environment().get_template("report.md.j2").render(view=view)


def summary_of(view: Mapping[str, Any]) -> str:
    """The summary text (no final newline) for a report's data model (`report_view`)."""
    return _environment().get_template("summary.txt.j2").render(view=view).removesuffix("\n")


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md's text for a report (report.json's content)."""
    return markdown_of(report_view(report))


def summary_text(report: Mapping[str, Any]) -> str:
    """The short block for a task log or a terminal, from a report (report.json's content)."""
    return summary_of(report_view(report))
