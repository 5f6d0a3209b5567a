"""The glue of the operators after the fine-tune: a dated source, the report of a failed run, the
merged export when it is off."""

from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from task_instance import TaskInstance

from llama_core.report import bounded_view, load_report, report_view
from operators.export import ExportMergedOperator
from operators.report import STAGES, ReportOperator
from operators.stages import FetchOperator, render_dated

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "lora_llama2_tiny.yaml")


def test_a_source_with_the_logical_date_is_rendered_per_run(tmp_path: Path) -> None:
    op = FetchOperator(task_id="fetch", source="", dest=str(tmp_path))
    url = "https://data.example/alpaca-{{ ds }}.json"
    assert render_dated(op, url, {"ds": "2026-01-05"}) == "https://data.example/alpaca-2026-01-05.json"
    assert render_dated(op, "https://data.example/alpaca.json", {}) == "https://data.example/alpaca.json"
    with pytest.raises(AirflowFailException, match="needs a run that has one"):
        render_dated(op, url, {})  # a manual run without a logical date


def test_a_dated_source_is_fetched_for_its_date(tmp_path: Path) -> None:
    for day in ("2026-01-05", "2026-01-06"):
        (tmp_path / f"alpaca-{day}.json").write_text(f'["{day}"]')
    op = FetchOperator(
        task_id="fetch", source=f"{tmp_path}/alpaca-{{{{ ds }}}}.json", dest=str(tmp_path / "d")
    )
    got = op.execute({"ds": "2026-01-06"})
    assert Path(got["path"]).read_text() == '["2026-01-06"]'


def test_the_merged_export_is_skipped_unless_asked(tmp_path: Path) -> None:
    op = ExportMergedOperator(
        task_id="export_merged", enabled="False", run_dir=str(tmp_path), config=TINY, base_checkpoint="x"
    )
    with pytest.raises(AirflowSkipException, match="param export_merged"):
        op.execute({})
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_finetune_failed_gets_a_report_saying_so(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    xcoms = {
        "fetch_alpaca": {"path": str(tmp_path / "alpaca.json"), "cached": True, "stage_seconds": 0.1},
        "tokenize_to_mindrecord": {"output_file": str(tmp_path / "a.mindrecord"), "records_written": 9},
    }
    context = {
        "ti": TaskInstance(xcoms),
        "params": {"seq_length": 32, "export_merged": False},
        "dag_run": SimpleNamespace(
            dag_id="d", run_id="r1", logical_date=datetime(2026, 1, 5, tzinfo=timezone.utc)
        ),
    }
    op = ReportOperator(task_id="report", run_dir=str(run_dir), config=TINY, overrides={})
    assert op.execute(context)["incomplete"] == ["finetune", "evaluate", "export_adapter"]
    report = (run_dir / "report.md").read_text()
    assert "`fetch_alpaca`" in report and "r1" in report
    assert (run_dir / "resolved_config.yaml").is_file()
    # the Fine-tune tab's XCom: the report's own data model, the stage table as report.md has it
    view = context["ti"].pushed["report"]
    assert view == bounded_view(report_view(load_report(run_dir)))
    assert [r["name"] for r in view["stages"]["rows"]] == list(STAGES)
    assert (view["stages"]["cache_hits"], view["stages"]["cached_stages"]) == (1, 1)
    assert view["evaluation"] is None and view["data"]["records_written"] == 9
