"""The DAG file: parses cleanly, imports neither MindSpore nor torch, and wires the stages in order."""

import json
import os
import subprocess
import sys
from pathlib import Path

from operators.finetune import override_args

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "llama2_lora_finetune.py"

_PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dag = module.dag
print(json.dumps({
    "heavy": sorted(m for m in ("mindspore", "torch", "transformers", "sentencepiece") if m in sys.modules),
    "dag_id": dag.dag_id,
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
    "params": sorted(dag.params.keys()),
    "param_schema": {k: dag.params.get_param(k).schema for k in dag.params},
    "param_descriptions": {k: dag.params.get_param(k).description for k in dag.params},
    "param_defaults": {k: dag.params.get_param(k).value for k in dag.params},
    "native": dag.render_template_as_native_obj,
    "timetable": type(dag.timetable).__name__,
    "description": dag.description,
    "finetune": {
        "pool": dag.get_task("finetune").pool,
        "max_active_tis_per_dag": dag.get_task("finetune").max_active_tis_per_dag,
        "rank_chatter_level": dag.get_task("finetune").partial_kwargs["rank_chatter_level"],
        "map_index_template": dag.get_task("finetune").partial_kwargs.get("map_index_template"),
        "mapped_over": sorted(dag.get_task("finetune").expand_input.value),
    },
    "validate_retries": dag.get_task("validate").retries,
}, default=str))
"""


def _parse_dag(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(DAG_FILE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_parses_without_heavy_imports_and_wires_the_pipeline() -> None:
    parsed = _parse_dag()
    assert parsed["heavy"] == []
    assert parsed["dag_id"] == "llama2_lora_finetune"
    assert parsed["upstream"] == {
        "validate": [],
        "fetch_alpaca": ["validate"],
        "fetch_tokenizer": ["validate"],
        "fetch_weights": ["validate"],
        "alpaca_to_conversations": ["fetch_alpaca"],
        "tokenize_to_mindrecord": ["alpaca_to_conversations", "fetch_tokenizer"],
        "import_checkpoint": ["fetch_weights"],
        "shard_checkpoint": ["import_checkpoint"],
        "finetune": ["shard_checkpoint", "tokenize_to_mindrecord", "validate"],  # mapped over its plans
    }
    assert parsed["finetune"]["mapped_over"] == ["node_rank"]
    assert parsed["finetune"]["map_index_template"] == "node {{ task.node_rank }}"
    assert parsed["native"] is True
    for name in (
        "alpaca_url",
        "tokenizer_url",
        "weights_url",
        "config",
        "overrides",
        "work_dir",
        "layout",
        "nodes",
        "node_start_timeout",
    ):
        assert name in parsed["params"]


def _dagbag(**env: str) -> tuple[str, list[str]]:
    code = (
        "from airflow.dag_processing.dagbag import DagBag;"
        f"b = DagBag(dag_folder={str(DAG_FILE.parent)!r});"
        "import json; print(json.dumps([b.import_errors, sorted(b.dag_ids)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    errors, dag_ids = json.loads(out.stdout.strip().splitlines()[-1])
    return "\n".join(errors.values()), dag_ids


def test_dagbag_has_no_import_errors() -> None:
    assert _dagbag() == ("", ["llama2_lora_finetune"])


def test_the_form_is_in_sections_and_every_param_is_described() -> None:
    parsed = _parse_dag()
    schema, descriptions = parsed["param_schema"], parsed["param_descriptions"]
    assert {s["section"] for s in schema.values()} == {"Sources", "Data", "Training", "Cluster"}
    assert all(descriptions.values()), [name for name, text in descriptions.items() if not text]
    assert set(descriptions) == set(schema)
    assert schema["work_dir"]["pattern"] == "^/"
    assert schema["device_target"]["enum"] == ["Ascend", "CPU"]
    assert (schema["master_port"]["minimum"], schema["master_port"]["maximum"]) == (1024, 65535)
    assert "pattern" in schema["alpaca_sha256"] and "pattern" in schema["config"]


def test_without_configured_sources_the_dag_is_manual_only() -> None:
    parsed = _parse_dag()
    assert parsed["timetable"] == "NullTimetable"
    assert "Manual runs only" in parsed["description"]
    assert parsed["finetune"]["max_active_tis_per_dag"] == 1  # fine-tunes of this DAG never overlap
    assert parsed["validate_retries"] == 0
    assert parsed["finetune"]["rank_chatter_level"] == 10  # DEBUG: hidden at Airflow's INFO
    assert _parse_dag(LLAMA_LORA_RANK_CHATTER_LEVEL="info")["finetune"]["rank_chatter_level"] == 20
    errors, _ = _dagbag(LLAMA_LORA_RANK_CHATTER_LEVEL="LOUD")
    assert "LLAMA_LORA_RANK_CHATTER_LEVEL='LOUD' is not a logging level" in errors
    errors, dag_ids = _dagbag(LLAMA_LORA_SCHEDULE="@weekly")  # a schedule alone is refused, loudly
    assert dag_ids == []
    assert "@weekly" in errors and "needs LLAMA_LORA_DEFAULTS to set" in errors
    assert "alpaca_url" in errors and "work_dir" in errors


def test_a_schedule_runs_on_the_deployments_sources_and_unpausing_starts_nothing(tmp_path: Path) -> None:
    defaults = tmp_path / "defaults.yaml"
    sources = {"alpaca_url": "s3://b/a.json", "tokenizer_url": "s3://b/t.model", "weights_url": "hf://o/m"}
    defaults.write_text(json.dumps({**sources, "work_dir": "/srv/llama", "seq_length": 2048}))
    parsed = _parse_dag(
        LLAMA_LORA_SCHEDULE="0 3 * * 1", LLAMA_LORA_DEFAULTS=str(defaults), LLAMA_LORA_NPU_POOL="ascend_npu"
    )
    assert parsed["timetable"] == "FutureTicksTimetable"
    assert "Scheduled: 0 3 * * 1" in parsed["description"]
    assert {k: parsed["param_defaults"][k] for k in sources} == sources
    assert parsed["param_defaults"]["seq_length"] == 2048
    assert parsed["finetune"]["pool"] == "ascend_npu"
    defaults.write_text(json.dumps({"alpaca_ur": "x"}))
    errors, _ = _dagbag(LLAMA_LORA_DEFAULTS=str(defaults))
    assert "unknown params ['alpaca_ur']" in errors


def test_override_args_are_yaml_scalars() -> None:
    assert override_args({"runner_config.epochs": 1, "model.model_config.use_flash_attention": False}) == [
        "--runner_config.epochs",
        "1",
        "--model.model_config.use_flash_attention",
        "false",
    ]
    assert override_args({"output_dir": "/tmp/x", "lr_schedule.learning_rate": 0.0001}) == [
        "--output_dir",
        "/tmp/x",
        "--lr_schedule.learning_rate",
        "0.0001",
    ]
    assert override_args(None) == []
