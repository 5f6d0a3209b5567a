"""The DAG file: parses cleanly, imports neither MindSpore nor torch, and wires the stages in order."""

import json
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
    "native": dag.render_template_as_native_obj,
}))
"""


def _parse_dag() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(DAG_FILE)], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_parses_without_heavy_imports_and_wires_the_pipeline() -> None:
    parsed = _parse_dag()
    assert parsed["heavy"] == []
    assert parsed["dag_id"] == "llama2_lora_finetune"
    assert parsed["upstream"] == {
        "fetch_alpaca": [],
        "fetch_tokenizer": [],
        "fetch_weights": [],
        "alpaca_to_conversations": ["fetch_alpaca"],
        "tokenize_to_mindrecord": ["alpaca_to_conversations", "fetch_tokenizer"],
        "import_checkpoint": ["fetch_weights"],
        "shard_checkpoint": ["import_checkpoint"],
        "finetune": ["shard_checkpoint", "tokenize_to_mindrecord"],
    }
    assert parsed["native"] is True
    for name in (
        "alpaca_url",
        "tokenizer_url",
        "weights_url",
        "config",
        "overrides",
        "work_dir",
    ):
        assert name in parsed["params"]


def test_dagbag_has_no_import_errors() -> None:
    code = (
        "from airflow.dag_processing.dagbag import DagBag;"
        f"b = DagBag(dag_folder={str(DAG_FILE.parent)!r});"
        "print(repr(b.import_errors)); print(sorted(b.dag_ids))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    errors, dag_ids = out.stdout.strip().splitlines()[-2:]
    assert errors == "{}"
    assert dag_ids == "['llama2_lora_finetune']"


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
