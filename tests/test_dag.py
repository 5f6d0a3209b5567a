"""The DAG files: every pipeline file becomes a DAG, parsing imports neither MindSpore nor torch and
stays fast, the stages are wired in order, and a broken pipeline file is reported without hiding the
others."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from operators.finetune import override_args
from operators.pipeline_file import PipelineError, load_pipeline, pipeline_files

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
PIPELINES = REPO / "configs" / "pipelines"

_PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t0 = time.monotonic()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.monotonic() - t0
def task(t):
    return {
        "upstream": sorted(t.upstream_task_ids), "pool": t.pool, "queue": t.queue,
        "trigger_rule": str(t.trigger_rule), "outlets": [a.name for a in getattr(t, "outlets", [])],
        "retries": t.retries, "setup": t.is_setup, "teardown": t.is_teardown,
        "fails_run": getattr(t, "on_failure_fail_dagrun", None),
    }
print(json.dumps({
    "seconds": seconds,
    "errors": bag.import_errors,
    "heavy": sorted(m for m in ("mindspore", "torch", "transformers", "sentencepiece", "matplotlib")
                    if m in sys.modules),
    "dags": {
        dag_id: {
            "tasks": {t.task_id: task(t) for t in dag.tasks},
            "params": {k: dag.params.get_param(k).value for k in dag.params},
            "schema": {k: dag.params.get_param(k).schema for k in dag.params},
            "descriptions": {k: dag.params.get_param(k).description for k in dag.params},
            "timetable": type(dag.timetable).__name__,
            "schedule": str(getattr(dag.timetable, "summary", "")),
            "description": dag.description,
            "native": dag.render_template_as_native_obj,
            "finetune": {
                "mapped_over": sorted(dag.get_task("finetune").expand_input.value),
                "max_active_tis_per_dag": dag.get_task("finetune").max_active_tis_per_dag,
                "rank_chatter_level": dag.get_task("finetune").partial_kwargs["rank_chatter_level"],
                "map_index_template": dag.get_task("finetune").partial_kwargs.get("map_index_template"),
            } if "finetune" in dag.task_ids else None,
        }
        for dag_id, dag in bag.dags.items()
    },
}, default=str))
"""


def parse(pipelines: Path | None = None, **env: str) -> dict:
    """The DAG folder as Airflow's DagBag sees it, in a fresh interpreter."""
    if pipelines is not None:
        env["LLAMA_LORA_PIPELINES"] = str(pipelines)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(DAGS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def shipped() -> dict:
    return parse()


def test_each_pipeline_file_is_a_dag_and_parsing_imports_no_framework(shipped: dict) -> None:
    assert shipped["errors"] == {}
    assert sorted(shipped["dags"]) == [
        "llama2_13b_lora_alpaca",
        "llama2_70b_lora_alpaca",
        "llama2_7b_lora_alpaca",
        "llama2_tiny_lora_demo",
        "llama3_1_8b_lora_alpaca",
        "llama_lora_adapter_check",
        "qwen2_5_7b_lora_alpaca",
    ]
    assert shipped["heavy"] == []
    # how long parsing takes is measured by bench/dag_parse.py (docs/BENCHMARKS.md)


def test_the_stages_are_wired_in_order(shipped: dict) -> None:
    tasks = shipped["dags"]["llama2_7b_lora_alpaca"]["tasks"]
    assert {name: t["upstream"] for name, t in tasks.items()} == {
        "validate": [],
        "fetch_alpaca": ["validate"],
        "fetch_tokenizer": ["validate"],
        "fetch_weights": ["validate"],
        "alpaca_to_conversations": ["fetch_alpaca"],
        "tokenize_to_mindrecord": ["alpaca_to_conversations", "fetch_tokenizer"],
        "import_checkpoint": ["fetch_weights"],
        "shard_checkpoint": ["import_checkpoint"],
        "finetune": ["shard_checkpoint", "tokenize_to_mindrecord", "validate"],  # mapped over its plans
        "evaluate": ["finetune"],
        "export_adapter": ["finetune"],
        "export_merged": ["finetune"],
        "report": ["evaluate", "export_adapter", "export_merged", "validate"],
    }
    # validate's teardown: runs after a failure too (not after validate's), never decides the run's state
    assert tasks["report"]["trigger_rule"].lower().endswith("all_done_setup_success")
    assert tasks["report"]["teardown"] and tasks["validate"]["setup"]
    assert tasks["report"]["fails_run"] is False  # else its success would pass a failed fine-tune's run
    assert tasks["export_adapter"]["outlets"] == ["llama2_7b_lora_alpaca.adapter"]
    assert tasks["export_merged"]["outlets"] == ["llama2_7b_lora_alpaca.merged"]
    # a wrong param fails validate at once whatever its retries (test_airflow_live); they are for the
    # control plane failing it before it ran. A failed fine-tune wants a look, not a blind re-launch.
    assert tasks["validate"]["retries"] == tasks["fetch_alpaca"]["retries"] > 0  # the pipeline's retries
    assert tasks["finetune"]["retries"] == 0
    dag = shipped["dags"]["llama2_7b_lora_alpaca"]
    assert dag["finetune"]["mapped_over"] == ["node_rank"]
    assert dag["finetune"]["map_index_template"] == "node {{ task.node_rank }}"
    assert dag["finetune"]["rank_chatter_level"] == 10  # DEBUG: hidden at Airflow's INFO
    assert dag["native"] is True


def test_params_default_from_the_pipeline_file(shipped: dict) -> None:
    for dag_id in ("llama2_7b_lora_alpaca", "llama2_tiny_lora_demo"):
        spec = load_pipeline(PIPELINES / f"{dag_id}.yaml")
        dag = shipped["dags"][dag_id]
        params = dag["params"]
        assert params["alpaca_url"] == spec.sources.alpaca.url
        assert params["tokenizer_sha256"] == spec.sources.tokenizer.sha256
        assert params["work_dir"] == spec.work_dir
        assert params["seq_length"] == spec.data.seq_length
        assert params["holdout_fraction"] == spec.data.holdout_fraction
        assert params["chat_template"] == spec.data.chat_template
        assert params["config"] == str(REPO / spec.training.config)
        assert params["overrides"]["parallel_config.data_parallel"] == spec.cluster.ranks
        assert params["prompts"] == spec.evaluation.prompt_values
        assert params["device_target"] == spec.cluster.device_target
        assert params["export_merged"] == spec.export.merged
        assert dag["timetable"] == "NullTimetable" and "manual runs only" in dag["description"].lower()
        for task in ("finetune", "evaluate"):
            assert dag["tasks"][task]["queue"] == spec.cluster.queue
            assert dag["tasks"][task]["pool"] == spec.cluster.pool
        assert {s["section"] for s in dag["schema"].values()} == {
            "Sources", "Data", "Training", "Evaluation and export", "Cluster",
        }  # fmt: skip
        assert all(dag["descriptions"].values())
    for dag_id in ("llama3_1_8b_lora_alpaca", "qwen2_5_7b_lora_alpaca"):
        spec = load_pipeline(PIPELINES / f"{dag_id}.yaml")
        assert spec.data.chat_template is not None
        assert shipped["dags"][dag_id]["params"]["chat_template"] == spec.data.chat_template
    seven_b = shipped["dags"]["llama2_7b_lora_alpaca"]["params"]
    assert (seven_b["seq_length"], seven_b["overrides"]["parallel_config.data_parallel"]) == (4096, 8)
    assert seven_b["device_target"] == "Ascend"
    # 70B: 8 ranks of one tensor-parallel group (model_parallel 8 in its config) are data_parallel 1
    seventy_b = shipped["dags"]["llama2_70b_lora_alpaca"]["params"]
    assert seventy_b["overrides"]["parallel_config.data_parallel"] == 1
    assert seventy_b["config"] == str(REPO / "configs" / "lora_llama2_70b.yaml")


def _pipelines(tmp_path: Path, **changes: dict) -> Path:
    """A copy of the shipped pipeline folder; `changes[name]` updates that file's top-level keys."""
    folder = tmp_path / "pipelines"
    shutil.copytree(PIPELINES, folder)
    for name, change in changes.items():
        path = folder / f"{name}.yaml"
        doc = yaml.safe_load(path.read_text()) if path.exists() else {}
        path.write_text(yaml.safe_dump({**doc, **change}))
    return folder


def test_a_broken_pipeline_file_is_an_import_error_naming_the_key_and_hides_no_dag(tmp_path: Path) -> None:
    demo = yaml.safe_load((PIPELINES / "llama2_tiny_lora_demo.yaml").read_text())
    folder = _pipelines(
        tmp_path,
        nodes_typo={**demo, "dag_id": "nodes_typo", "cluster": {**demo["cluster"], "nodes": "two"}},
        unknown_key={**demo, "dag_id": "unknown_key", "data": {**demo["data"], "seq_lenght": 512}},
        bad_cron={**demo, "dag_id": "bad_cron", "schedule": "every day"},
    )
    (folder / "not_yaml.yaml").write_text("dag_id: [unclosed\n")
    parsed = parse(folder)
    assert sorted(parsed["dags"]) == [
        "llama2_13b_lora_alpaca",
        "llama2_70b_lora_alpaca",
        "llama2_7b_lora_alpaca",
        "llama2_tiny_lora_demo",
        "llama3_1_8b_lora_alpaca",
        "llama_lora_adapter_check",
        "qwen2_5_7b_lora_alpaca",
    ]
    assert list(parsed["errors"]) == [str(DAGS / "llama_lora_pipeline_errors.py")]  # a file with no DAG
    (error,) = parsed["errors"].values()
    assert "4 pipeline file(s) cannot become DAGs" in error
    assert f"{folder}/nodes_typo.yaml (DAG nodes_typo): key 'cluster.nodes'" in error
    assert f"{folder}/unknown_key.yaml (DAG unknown_key): key 'data.seq_lenght': Extra inputs" in error
    assert f"{folder}/bad_cron.yaml (DAG bad_cron): key 'schedule': 'every day' is not a cron" in error
    assert f"{folder}/not_yaml.yaml: not readable as YAML" in error


def test_a_duplicate_dag_id_is_refused(tmp_path: Path) -> None:
    demo = yaml.safe_load((PIPELINES / "llama2_tiny_lora_demo.yaml").read_text())
    folder = _pipelines(tmp_path, zz_copy=demo)
    parsed = parse(folder)
    assert "llama2_tiny_lora_demo" in parsed["dags"]
    assert "key 'dag_id': 'llama2_tiny_lora_demo' is already" in next(iter(parsed["errors"].values()))


def test_schedules_cron_and_asset(tmp_path: Path) -> None:
    folder = _pipelines(
        tmp_path,
        llama2_tiny_lora_demo={"schedule": "0 3 * * 1"},
        llama2_7b_lora_alpaca={"schedule": {"asset": "s3://datasets/alpaca/latest.json"}},
    )
    parsed = parse(folder)
    assert parsed["errors"] == {}
    demo, seven_b = parsed["dags"]["llama2_tiny_lora_demo"], parsed["dags"]["llama2_7b_lora_alpaca"]
    assert (
        demo["timetable"] == "FutureTicksTimetable" and "scheduled: 0 3 * * 1" in demo["description"].lower()
    )
    assert seven_b["timetable"] == "AssetTriggeredTimetable"
    assert "s3://datasets/alpaca/latest.json" in seven_b["description"]


def test_load_pipeline_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    doc = yaml.safe_load((PIPELINES / "llama2_tiny_lora_demo.yaml").read_text())
    doc["sources"]["tokenizer"]["sha256"] = "abc"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match=r"key 'sources.tokenizer.sha256': String should match pattern"):
        load_pipeline(path)
    doc["sources"]["tokenizer"]["sha256"] = None
    doc["evaluation"]["prompts"] = ["fine", ""]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match=r"key 'evaluation.prompts\[1\]'"):
        load_pipeline(path)
    doc["evaluation"]["prompts"] = ["fine", {"prompt": "asked", "expect": ""}]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match=r"key 'evaluation.prompts\[1\].expect'"):
        load_pipeline(path)
    doc["evaluation"]["prompts"] = ["fine", {"prompt": "asked", "expect": "this"}]
    path.write_text(yaml.safe_dump(doc))
    assert load_pipeline(path).evaluation.prompt_values == doc["evaluation"]["prompts"]
    doc["data"]["chat_template"] = "alpaca"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match=r"key 'data.chat_template': Input should be 'vicuna_v1.1'"):
        load_pipeline(path)
    assert [p.name for p in pipeline_files()] == [
        "llama2_13b_lora_alpaca.yaml", "llama2_70b_lora_alpaca.yaml", "llama2_7b_lora_alpaca.yaml",
        "llama2_tiny_lora_demo.yaml", "llama3_1_8b_lora_alpaca.yaml", "qwen2_5_7b_lora_alpaca.yaml",
    ]  # fmt: skip


def test_the_chatter_level_is_a_deployment_setting(tmp_path: Path) -> None:
    assert (
        parse(LLAMA_LORA_RANK_CHATTER_LEVEL="info")["dags"]["llama2_tiny_lora_demo"]["finetune"][
            "rank_chatter_level"
        ]
        == 20
    )
    parsed = parse(LLAMA_LORA_RANK_CHATTER_LEVEL="LOUD")
    assert "LLAMA_LORA_RANK_CHATTER_LEVEL='LOUD' is not a logging level" in next(
        iter(parsed["errors"].values())
    )


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
