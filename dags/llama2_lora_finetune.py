"""Llama 2 LoRA fine-tune: the MindFormers quick start as one Airflow DAG.

    validate ─▶ fetch_alpaca ─▶ alpaca_to_conversations ─▶ tokenize_to_mindrecord ─┐
             ─▶ fetch_tokenizer ───────────────────────────────┘                    ├─▶ finetune [node k]
             ─▶ fetch_weights ─▶ import_checkpoint ─▶ shard_checkpoint ─────────────┘   (msrun per node)

`validate` checks every param in a second, so a mistake fails the run before any work. Every stage
skips work an earlier run already did with the same inputs and settings, so a re-run or a backfill
only pays for what changed. Downloads, data and checkpoints live under `work_dir` and are shared by
runs; each run trains into `work_dir/runs/<run_id>`.

Deployment settings (environment of the dag-processor and the workers):
- `LLAMA_LORA_WORK_ROOT`: work_dir must resolve inside it (default: the default work_dir).
- `LLAMA_LORA_WORK_DIR`: the default work_dir (default /data/llama).
- `LLAMA_LORA_DEFAULTS`: a YAML file of param defaults (e.g. your own sources and work_dir).
- `LLAMA_LORA_SCHEDULE`: a cron expression or preset for scheduled retraining. Accepted only when
  LLAMA_LORA_DEFAULTS sets the sources and work_dir (the built-in defaults are the quick start's
  internet sources); without it the DAG runs only when triggered. Runs fall on cron ticks from now
  on: unpausing or a backfill never starts a run for a tick already past.
- `LLAMA_LORA_NPU_POOL` / `LLAMA_LORA_NPU_QUEUE`: pool (one slot per NPU node) and queue of finetune.
- `LLAMA_LORA_NPU_NODES`: how many NPU nodes the queue has (default 1): at most that many fine-tune
  node tasks of this DAG run at once, over all runs and backfills.
- `LLAMA_LORA_RANK_CHATTER_LEVEL`: the level MindSpore's distributed start-up chatter is logged at in
  the task log (default DEBUG: hidden at Airflow's default INFO; always in the rank's own file).

This file only wires operators: parsing it imports neither MindSpore nor torch.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import yaml
from airflow.sdk import DAG, Param

from operators.finetune import MsrunFinetuneOperator
from operators.schedule import FutureTicksTimetable
from operators.stages import (
    AlpacaToConversationsOperator,
    FetchOperator,
    ImportCheckpointOperator,
    ShardCheckpointOperator,
    TokenizeToMindRecordOperator,
)
from operators.validate import ValidateParamsOperator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_WORK_DIR = os.environ.get("LLAMA_LORA_WORK_DIR", "/data/llama")
SHA256_PATTERN = "^([0-9a-fA-F]{64})?$"


def _source(url: str, what: str) -> Param:
    return Param(
        url,
        type="string",
        minLength=1,
        section="Sources",
        description=f"{what}: an absolute path, file://, http(s)://, s3://BUCKET/KEY or hf://ORG/REPO",
    )


def _sha256(what: str) -> Param:
    return Param(
        None,
        type=["null", "string"],
        pattern=SHA256_PATTERN,
        section="Sources",
        description=f"expected sha256 of the {what} (64 hex digits); empty: not checked",
    )


PARAMS = {
    "alpaca_url": _source(
        "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
        "Alpaca records (JSON list or JSON Lines)",
    ),
    "alpaca_sha256": _sha256("Alpaca file"),
    "tokenizer_url": _source(
        "https://ascend-repo-modelzoo.obs.cn-east-2.myhuaweicloud.com/MindFormers/llama2/tokenizer.model",
        "the Llama sentencepiece tokenizer.model",
    ),
    "tokenizer_sha256": _sha256("tokenizer.model"),
    "weights_url": _source(
        "https://ascend-repo-modelzoo.obs.cn-east-2.myhuaweicloud.com/MindFormers/llama2/llama2_7b.ckpt",
        "base weights: a MindSpore .ckpt, or a Hugging Face Llama folder or repo (imported)",
    ),
    "weights_sha256": _sha256("weights file (a single .ckpt)"),
    "storage_conn_id": Param(
        None,
        type=["null", "string"],
        section="Sources",
        description="Airflow connection with the credentials for s3:// (login/password, extra endpoint_url) "
        "or hf:// (password = token); empty: none",
    ),
    "work_dir": Param(
        DEFAULT_WORK_DIR,
        type="string",
        pattern="^/",
        section="Data",
        description="absolute folder for downloads, data, checkpoints and runs/<run_id>; it must be inside "
        "the workers' LLAMA_LORA_WORK_ROOT",
    ),
    "seq_length": Param(
        4096,
        type="integer",
        minimum=8,
        maximum=131072,
        section="Data",
        description="tokens per record (records hold seq_length + 1 ids); the model trains on this length",
    ),
    "layout": Param(
        "buckets",
        enum=["buckets", "packed", "padded"],
        section="Data",
        description="buckets: records as MindFormers writes them, each batch trimmed to its length bucket "
        "(same losses, far less padding computed); packed: several conversations per row, each attending "
        "only to itself (the least work); padded: the reference's full-length records, for bit-for-bit "
        "comparisons",
    ),
    "config": Param(
        str(CONFIGS / "lora_llama2_7b.yaml"),
        type="string",
        pattern="^/.*\\.ya?ml$",
        section="Training",
        description="absolute path of the training YAML (MindFormers keys), e.g. configs/lora_llama2_7b.yaml",
    ),
    "overrides": Param(
        {},
        type="object",
        section="Training",
        description='config keys to override, e.g. {"runner_config.epochs": 1, "lr_schedule.learning_rate": '
        "1e-4}; an unknown key fails the run at once",
    ),
    "device_target": Param(
        "Ascend", enum=["Ascend", "CPU"], section="Cluster", description="Ascend NPUs, or CPU (tests, demo)"
    ),
    "master_port": Param(
        None,
        type=["null", "integer"],
        minimum=1024,
        maximum=65535,
        section="Cluster",
        description="msrun's master port; empty: a free port per run, so fine-tunes never share one. "
        "Ranks: parallel_config data_parallel x model_parallel x pipeline_stage of the config",
    ),
    "nodes": Param(
        1,
        type="integer",
        minimum=1,
        maximum=256,
        section="Cluster",
        description="NPU nodes the fine-tune spans: one finetune task per node on the Ascend queue, the "
        "config's ranks split evenly over them; work_dir must be on storage every node shares",
    ),
    "node_start_timeout": Param(
        600,
        type="integer",
        minimum=10,
        maximum=86400,
        section="Cluster",
        description="seconds the node tasks wait for each other to start before failing (fewer free "
        "nodes than asked for); a started node that fails stops the others at once",
    ),
}
SOURCE_PARAMS = ("alpaca_url", "tokenizer_url", "weights_url", "work_dir")


def _defaults_from(path: str | None) -> dict:
    """Param defaults from the deployment's YAML file (LLAMA_LORA_DEFAULTS); unknown names fail."""
    if not path:
        return {}
    defaults = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(defaults) - set(PARAMS))
    if not isinstance(defaults, dict) or unknown:
        raise ValueError(f"LLAMA_LORA_DEFAULTS {path}: unknown params {unknown}; known: {sorted(PARAMS)}")
    return defaults


def _schedule(cron: str | None, defaults: dict) -> FutureTicksTimetable | None:
    """Scheduled retraining only on the deployment's own sources; unpausing starts nothing."""
    if not cron:
        return None
    missing = [name for name in SOURCE_PARAMS if name not in defaults]
    if missing:
        raise ValueError(
            f"LLAMA_LORA_SCHEDULE={cron!r} needs LLAMA_LORA_DEFAULTS to set {missing}: a schedule never "
            "runs on the built-in quick-start sources"
        )
    return FutureTicksTimetable(cron, timezone="UTC")


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        raise ValueError(f"LLAMA_LORA_RANK_CHATTER_LEVEL={name!r} is not a logging level (DEBUG, INFO, ...)")
    return level


def node_rank_of(plan: dict) -> int:
    """The node rank of one of validate's per-node plans (the fine-tune is mapped over them)."""
    return plan["node_rank"]


DEFAULTS = _defaults_from(os.environ.get("LLAMA_LORA_DEFAULTS"))
for _name, _value in DEFAULTS.items():
    PARAMS[_name].value = _value
SCHEDULE = _schedule(os.environ.get("LLAMA_LORA_SCHEDULE"), DEFAULTS)
CHATTER_LEVEL = _level(os.environ.get("LLAMA_LORA_RANK_CHATTER_LEVEL", "DEBUG"))
WORK = "{{ params.work_dir }}"
DATA = f"{WORK}/data/seq{{{{ params.seq_length }}}}"

with DAG(
    dag_id="llama2_lora_finetune",
    description=(
        "Alpaca -> MindRecord -> sharded Llama 2 checkpoint -> msrun LoRA fine-tune on Ascend. "
        + (
            f"Scheduled: {os.environ['LLAMA_LORA_SCHEDULE']} (UTC) on the LLAMA_LORA_DEFAULTS sources."
            if SCHEDULE
            else "Manual runs only: set LLAMA_LORA_SCHEDULE and LLAMA_LORA_DEFAULTS to retrain on a schedule."
        )
    ),
    schedule=SCHEDULE,
    catchup=False,
    max_active_runs=1,  # one fine-tune holds a whole node's NPUs (backfills: see finetune's pool)
    render_template_as_native_obj=True,  # params keep their types (ints, the overrides dict)
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["llama", "lora", "mindspore", "ascend"],
    params=PARAMS,
) as dag:
    validate = ValidateParamsOperator(task_id="validate", default_work_root=DEFAULT_WORK_DIR)
    fetch = {
        name: FetchOperator(
            task_id=f"fetch_{name}",
            source=f"{{{{ params.{name}_url }}}}",
            dest=f"{WORK}/downloads/{name}",
            sha256=f"{{{{ params.{name}_sha256 or '' }}}}",
            conn_id="{{ params.storage_conn_id or '' }}",
        )
        for name in ("alpaca", "tokenizer", "weights")
    }
    conversations = AlpacaToConversationsOperator(
        task_id="alpaca_to_conversations",
        data_path="{{ ti.xcom_pull(task_ids='fetch_alpaca')['path'] }}",
        output_path=f"{WORK}/data/alpaca-conversation.json",
    )
    mindrecord = TokenizeToMindRecordOperator(
        task_id="tokenize_to_mindrecord",
        input_glob="{{ ti.xcom_pull(task_ids='alpaca_to_conversations')['output_path'] }}",
        model_file="{{ ti.xcom_pull(task_ids='fetch_tokenizer')['path'] }}",
        seq_length="{{ params.seq_length }}",
        packing="{{ 'pack' if params.layout == 'packed' else 'none' }}",
        # each data layout keeps its own file: switching back and forth re-tokenizes nothing
        output_file=f"{DATA}/alpaca{{{{ '-packed' if params.layout == 'packed' else '' }}}}.mindrecord",
    )
    imported = ImportCheckpointOperator(
        task_id="import_checkpoint",
        input_path="{{ ti.xcom_pull(task_ids='fetch_weights')['path'] }}",
        output_path=f"{WORK}/checkpoint/llama2.ckpt",
    )
    sharded = ShardCheckpointOperator(
        task_id="shard_checkpoint",
        load_checkpoint="{{ ti.xcom_pull(task_ids='import_checkpoint')['output_path'] }}",
        config="{{ params.config }}",
        overrides="{{ params.overrides }}",
        output_dir=f"{WORK}/checkpoint/transformed",
    )
    finetune = MsrunFinetuneOperator.partial(
        task_id="finetune",
        map_index_template="node {{ task.node_rank }}",
        config="{{ params.config }}",
        overrides="{{ params.overrides }}",
        train_dataset_dir="{{ ti.xcom_pull(task_ids='tokenize_to_mindrecord')['output_file'] }}",
        load_checkpoint="{{ ti.xcom_pull(task_ids='shard_checkpoint')['output_dir'] }}",
        seq_length="{{ params.seq_length }}",
        output_dir=f"{WORK}/runs/{{{{ run_id }}}}",
        device_target="{{ params.device_target }}",
        master_port="{{ params.master_port }}",
        length_buckets="{{ params.layout != 'padded' }}",
        nodes="{{ params.nodes }}",
        node_start_timeout="{{ params.node_start_timeout }}",
        # A pool with one slot per NPU node serialises fine-tunes across DAGs and backfills;
        # max_active_tis_per_dag does so for this DAG even in the default pool.
        pool=os.environ.get("LLAMA_LORA_NPU_POOL", "default_pool"),
        max_active_tis_per_dag=int(os.environ.get("LLAMA_LORA_NPU_NODES", "1")),
        queue=os.environ.get("LLAMA_LORA_NPU_QUEUE", "ascend"),
        retries=0,  # a failed fine-tune wants a look at the failed rank, not a blind re-launch
        rank_chatter_level=CHATTER_LEVEL,
    ).expand(node_rank=validate.output.map(node_rank_of))

    validate >> list(fetch.values())
    fetch["alpaca"] >> conversations >> mindrecord
    fetch["tokenizer"] >> mindrecord
    fetch["weights"] >> imported >> sharded
    [mindrecord, sharded] >> finetune
