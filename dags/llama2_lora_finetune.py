"""Llama 2 LoRA fine-tune: the MindFormers quick start as one Airflow DAG.

    fetch_alpaca ─▶ alpaca_to_conversations ─▶ tokenize_to_mindrecord ─┐
    fetch_tokenizer ────────────────────────────────┘                    ├─▶ finetune (msrun, N ranks)
    fetch_weights ─▶ import_checkpoint ─▶ shard_checkpoint ──────────────┘

Every stage skips work an earlier run already did with the same inputs and settings, so a
re-run or a backfill only pays for what changed. Downloads, data and checkpoints live under
`work_dir` and are shared by runs; each run trains into `work_dir/runs/<run_id>`.

Trigger it from the UI (the form shows the params below), on its schedule, or with
`airflow backfill create --dag-id llama2_lora_finetune --from-date ... --to-date ...`.
This file only wires operators: parsing it imports neither MindSpore nor torch.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param

from operators.finetune import MsrunFinetuneOperator
from operators.stages import (
    AlpacaToConversationsOperator,
    FetchOperator,
    ImportCheckpointOperator,
    ShardCheckpointOperator,
    TokenizeToMindRecordOperator,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The quick start's sources; point them at your own store (s3://, hf://, a path) from the trigger form.
QUICK_START = {
    "alpaca_url": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
    "tokenizer_url": "https://ascend-repo-modelzoo.obs.cn-east-2.myhuaweicloud.com/MindFormers/llama2/tokenizer.model",
    "weights_url": "https://ascend-repo-modelzoo.obs.cn-east-2.myhuaweicloud.com/MindFormers/llama2/llama2_7b.ckpt",
}
WORK = "{{ params.work_dir }}"
DATA = f"{WORK}/data/seq{{{{ params.seq_length }}}}"

with DAG(
    dag_id="llama2_lora_finetune",
    description="Alpaca -> MindRecord -> sharded Llama 2 checkpoint -> msrun LoRA fine-tune on Ascend",
    schedule=os.environ.get("LLAMA_LORA_SCHEDULE", "@weekly") or None,  # "" = manual runs only
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one fine-tune holds a whole node's NPUs
    render_template_as_native_obj=True,  # params keep their types (ints, the overrides dict)
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["llama", "lora", "mindspore", "ascend"],
    params={
        "alpaca_url": Param(QUICK_START["alpaca_url"], type="string", description="Alpaca JSON/JSONL"),
        "alpaca_sha256": Param(None, type=["null", "string"], description="expected sha256 (optional)"),
        "tokenizer_url": Param(QUICK_START["tokenizer_url"], type="string", description="tokenizer.model"),
        "tokenizer_sha256": Param(None, type=["null", "string"]),
        "weights_url": Param(
            QUICK_START["weights_url"],
            type="string",
            description="a MindSpore .ckpt, or a Hugging Face Llama folder/repo (hf://org/name) to import",
        ),
        "weights_sha256": Param(None, type=["null", "string"]),
        "storage_conn_id": Param(
            None, type=["null", "string"], description="Airflow connection for s3:// or hf:// credentials"
        ),
        "work_dir": Param(os.environ.get("LLAMA_LORA_WORK_DIR", "/data/llama"), type="string"),
        "config": Param(str(CONFIGS / "lora_llama2_7b.yaml"), type="string", description="training YAML"),
        "overrides": Param(
            {},
            type="object",
            description='config overrides, e.g. {"runner_config.epochs": 1}; msrun starts '
            "data_parallel x model_parallel x pipeline_stage ranks",
        ),
        "seq_length": Param(4096, type="integer", minimum=8),
        "device_target": Param("Ascend", enum=["Ascend", "CPU"]),
        "master_port": Param(8118, type="integer"),
    },
) as dag:
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
        output_file=f"{DATA}/alpaca.mindrecord",
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
    finetune = MsrunFinetuneOperator(
        task_id="finetune",
        config="{{ params.config }}",
        overrides="{{ params.overrides }}",
        train_dataset_dir="{{ ti.xcom_pull(task_ids='tokenize_to_mindrecord')['output_file'] }}",
        load_checkpoint="{{ ti.xcom_pull(task_ids='shard_checkpoint')['output_dir'] }}",
        seq_length="{{ params.seq_length }}",
        output_dir=f"{WORK}/runs/{{{{ run_id }}}}",
        device_target="{{ params.device_target }}",
        master_port="{{ params.master_port }}",
        pool=os.environ.get("LLAMA_LORA_NPU_POOL", "default_pool"),
        queue=os.environ.get("LLAMA_LORA_NPU_QUEUE", "ascend"),
        retries=0,  # a failed fine-tune wants a look at the failed rank, not a blind re-launch
    )

    fetch["alpaca"] >> conversations >> mindrecord
    fetch["tokenizer"] >> mindrecord
    fetch["weights"] >> imported >> sharded
    [mindrecord, sharded] >> finetune
