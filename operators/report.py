"""The run's last task: one report of what the pipeline did and handed back (`llama_core.report`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Context

from operators.evaluate import write_resolved_config
from operators.stages import StageOperator

# the pipeline's stages in order, and the outputs of each worth finding again
STAGES = (
    "validate", "fetch_alpaca", "fetch_tokenizer", "fetch_weights", "alpaca_to_conversations",
    "tokenize_to_mindrecord", "import_checkpoint", "shard_checkpoint", "finetune", "evaluate",
    "export_adapter", "export_merged",
)  # fmt: skip
OUTPUT_KEYS = {"path": "path", "output_path": "output", "output_file": "output", "output_dir": "output"}
REQUIRED = ("finetune", "evaluate", "export_adapter")  # a run without these did not hand back a model


def _one(value: Any) -> Any:
    """A mapped task's XComs come as a list (one per map index): the first is node 0's."""
    if isinstance(value, list | tuple) and not isinstance(value, str):
        return value[0] if value else None
    return value


class ReportOperator(StageOperator):
    """Write `run_dir/report.md`, `report.json` and `loss_curve.png` from the run's task results,
    print the summary in the task log, and push the report's data model as the XCom `report` (the
    "Fine-tune" tab shows its evaluation, stages and outputs: the same figures as report.md); with
    `tracking`, send them and the adapter to MLflow too.
    The DAG makes it validate's teardown: it runs when the other tasks are done, failed or not, so a
    failed run still gets a report of how far it came (the failed tasks decide the run's state, not
    this one)."""

    template_fields: Sequence[str] = ("run_dir", "config", "overrides")
    ui_color = "#ebdef0"

    def __init__(
        self,
        *,
        run_dir: str,
        config: str,
        overrides: Mapping[str, Any] | str | None = None,
        pipeline_file: str = "",
        tracking: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.config, self.overrides = run_dir, config, overrides
        self.pipeline_file, self.tracking = pipeline_file, tracking

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.report import Stage, bounded_view, write_report

        ti, params, dag_run = context["ti"], context["params"], context["dag_run"]
        results = {name: ti.xcom_pull(task_ids=name) for name in STAGES}
        run_dir = Path(self.run_dir)
        _, cfg = write_resolved_config(run_dir, self.config, self.overrides, params.get("seq_length"))
        stages, outputs = [], {}
        for name in STAGES:
            result = _one(results[name])
            if not isinstance(result, dict):
                stages.append(Stage(name=name, seconds=None, cached=None, outputs={}))
                continue
            found = {
                label: str(result[key])
                for key, label in OUTPUT_KEYS.items()
                if isinstance(result.get(key), str)
            }
            seconds = result.get("stage_seconds", result.get("duration_s"))
            stages.append(Stage(name=name, seconds=seconds, cached=result.get("cached"), outputs=found))
        adapter, merged = _one(results["export_adapter"]), _one(results["export_merged"])
        if isinstance(adapter, dict):
            outputs["PEFT adapter"] = adapter["output_dir"]
        if isinstance(merged, dict):
            outputs["merged checkpoint (MindSpore)"] = merged["merged_checkpoint"]
            outputs["merged model (HF safetensors)"] = merged["hf_folder"]
        if isinstance(adapter, dict):
            outputs["final training checkpoint (rank 0)"] = adapter["finetuned_checkpoint"]
        outputs["run folder"] = str(run_dir)
        outputs["rank logs"] = str(run_dir / "msrun_log")
        outputs["resolved config"] = str(run_dir / "resolved_config.yaml")
        summary_file = run_dir / "train_summary.json"
        train = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        logical_date = getattr(dag_run, "logical_date", None)
        report = write_report(
            run_dir,
            run={
                "dag_id": dag_run.dag_id,
                "run_id": dag_run.run_id,
                "logical_date": logical_date.isoformat() if logical_date else None,
                "pipeline_file": self.pipeline_file,
                "params": {k: v for k, v in params.items()},
            },
            stages=stages,
            config=cfg,
            config_path=self.config,
            data=_one(results["tokenize_to_mindrecord"]),
            train=train,
            evaluation=_one(results["evaluate"]),
            outputs=outputs,
        )
        for line in report.summary.splitlines():
            self.log.info("%s", line)
        ti.xcom_push(key="report", value=bounded_view(report.view))
        missing = [name for name in REQUIRED if not isinstance(_one(results[name]), dict)]
        if params.get("export_merged") and not isinstance(merged, dict):
            missing.append("export_merged")
        if missing:
            self.log.warning(
                "%s did not succeed: this run handed back no complete result (its report: %s)",
                ", ".join(missing), report.markdown_path,
            )  # fmt: skip
        if self.tracking:  # MLflow (the pipeline's `tracking` section): it warns, it never fails the report
            from operators.tracking import track_report

            track_report(
                self.tracking, context, cfg=cfg,
                data=_one(results["tokenize_to_mindrecord"]), run_dir=run_dir, failed=bool(missing),
                adapter=Path(adapter["output_dir"]) if isinstance(adapter, dict) else None,
            )  # fmt: skip
        return {
            "incomplete": missing,
            "report": report.markdown_path,
            "report_json": report.json_path,
            "loss_curve": report.plot_path,
            **outputs,
        }
