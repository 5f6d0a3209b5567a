"""The Fine-tune tab's page (operators/static/finetune_view.html) renders the report task's `report`
XCom, the report's data model, as it is: its script runs under Node with a minimal DOM of its own,
fed the model of golden reports. The live browser tests (test_stack.py) see it in Airflow."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llama_core.report import bounded_view, load_report, report_view

PAGE = Path(__file__).resolve().parents[1] / "operators" / "static" / "finetune_view.html"
GOLDEN = Path(__file__).parent / "data" / "report_golden"
NODE = shutil.which("node") or shutil.which("nodejs")
pytestmark = pytest.mark.skipif(NODE is None, reason="no Node.js to run the page's script")

# Just enough DOM for the page's render functions: elements keep their attributes and children, the
# test reads the text of each `data-testid`.
HARNESS = """
class Node {
  constructor(tag) { this.tag = tag; this.attrs = {}; this.children = []; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  append(...c) { this.children.push(...c); }
  replaceChildren(...c) { this.children = c; }
  set textContent(t) { this.children = [String(t)]; }
  get textContent() { return this.children.map((c) => (typeof c === "string" ? c : c.textContent)).join(""); }
  set className(v) { this.attrs.class = v; }
}
const byId = {};
globalThis.Node = Node;
globalThis.document = { createElement: (t) => new Node(t), createElementNS: (_, t) => new Node(t),
  getElementById: (id) => (byId[id] ||= new Node("div")) };
globalThis.location = { pathname: "/llama-lora/runs/dag/run" };
const testids = {};
const walk = (n) => { if (typeof n === "string") return;
  if (n.attrs["data-testid"]) testids[n.attrs["data-testid"]] = n.textContent; n.children.forEach(walk); };
"""


def render(view: dict[str, Any] | None, tis: list[dict[str, Any]]) -> dict[str, Any]:
    """What the page shows for `view` (the report XCom) and the run's task instances: each data-testid's
    text, and the evaluation box's text."""
    return run_page(f"""
renderEvaluation({json.dumps(view)}); renderStages({json.dumps(tis)}, {json.dumps(view)});
Object.values(byId).forEach(walk);
console.log(JSON.stringify({{testids, evaluation: byId.evaluation.textContent}}));
""")


def run_page(code: str) -> Any:
    """Run the page's render functions (its script without the polling `load()`), then `code`, which
    prints one JSON value."""
    script = PAGE.read_text(encoding="utf-8").split("<script>")[1].split("</script>")[0]
    script = script.rsplit("load();", 1)[0]
    done = subprocess.run(
        [NODE, "-e", HARNESS + script + code], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


def test_the_tab_shows_the_reports_evaluation_stages_and_outputs() -> None:
    view = bounded_view(report_view(load_report(GOLDEN / "answers_with_expect")))
    shown = render(view, [{"task_id": "finetune", "map_index": 0, "state": "success"}])
    ids = shown["testids"]
    tuned = view["evaluation"]["models"][1]
    assert ids["ft-final-eval-loss"] == f"{tuned['eval_loss']:.4f}"
    assert ids["ft-answers-right"] == "1/2"
    stages = view["stages"]
    assert ids["ft-cache-hits"] == f"{stages['cache_hits']} of {stages['cached_stages']} cached stages hit"
    for row in stages["rows"]:
        assert row["name"] in ids["ft-stages"]
    assert "finetunesuccess12m34s" in ids["ft-stages"]  # the task's live state beside the report's time
    for output in view["outputs"]:
        assert output["path"] in ids["ft-outputs"]
    assert "-0.5399, -25.7%" in ids["ft-eval-table"]  # the model's change, as report.md has it


def test_a_run_without_evaluation_or_report_says_so() -> None:
    view = bounded_view(report_view(load_report(GOLDEN / "failed")))
    assert render(view, [])["evaluation"] == "not run: this run had no before/after evaluation"
    live = render(None, [{"task_id": "finetune", "map_index": 0, "state": "running", "duration": 3.21}])
    assert live["testids"]["ft-stages"] == "finetunerunning3.2 s" and live["testids"]["ft-outputs"] == ""


def test_the_tab_lists_the_asset_events_of_the_run_with_the_output_they_point_to() -> None:
    # an event as Airflow's REST API returns it (GET /api/v2/assets/events), the adapter export's extra
    event = {
        "name": "demo.adapter", "uri": "llama-lora://demo/adapter", "timestamp": "2026-12-06T20:00:00Z",
        "source_task_id": "export_adapter",
        "extra": {"adapter": "/work/runs/r1/adapter", "run_id": "r1", "prompts": ["not shown"]},
    }  # fmt: skip
    shown = run_page(f"""renderAssets({json.dumps([event])}); renderAssets([]);
Object.values(byId).forEach(walk); console.log(JSON.stringify(testids["ft-assets"]));""")
    assert shown.startswith("asseturieventtaskoutput")  # the header, then one row per event
    assert "demo.adapterllama-lora://demo/adapter" in shown
    assert "export_adapteradapter: /work/runs/r1/adapter" in shown
    assert "not shown" not in shown  # only the output's path, not the whole extra
