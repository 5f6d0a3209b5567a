"""A pipeline (operators/pipeline_file.py: the file's keys) -> one Airflow DAG of the fine-tune.

The pipeline file's values become the trigger form's defaults (`Param`s, in sections); its schedule
the DAG's (none, a cron timetable that never runs a tick already past, or an Asset); its cluster
section the node tasks' queue and pool. Building a DAG imports neither MindSpore nor torch.

    validate ─▶ fetch_alpaca ─▶ alpaca_to_conversations ─▶ tokenize_to_mindrecord ─┐
             ─▶ fetch_tokenizer ───────────────────────────────┘                    ├─▶ finetune [node k]
             ─▶ fetch_weights ─▶ import_checkpoint ─▶ shard_checkpoint ─────────────┘        │
      ┌───────────────────────────────────────────────────────────────────────────────────┘
      ├─▶ evaluate (base vs fine-tuned: held-out loss, generations) ──────┐
      ├─▶ export_adapter (PEFT adapter; Asset <dag_id>.adapter) ──────────┼─▶ report (validate's teardown)
      └─▶ export_merged (merged .ckpt + HF safetensors; Asset <dag_id>.merged, when asked) ┘
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from llama_core.data.chat import CHAT_TEMPLATES
from operators.pipeline_file import SHA256_PATTERN, Pipeline, schedule_of

PROMPT_SCHEMA = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1},
        "expect": {"type": "string", "minLength": 1},
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


def adapter_asset(dag_id: str) -> Any:
    """The Asset a pipeline's export_adapter task updates, what consumers schedule on. Consumers use
    this Asset itself, not `Asset.ref(name=...)`: with a reference, Airflow 3.3.2 starts the
    consumer's run but hands it no triggering events (its scheduler reads only direct references)."""
    from airflow.sdk import Asset

    return Asset(name=f"{dag_id}.adapter", uri=f"llama-lora://{dag_id}/adapter")


def merged_asset(dag_id: str) -> Any:
    """The Asset a pipeline's export_merged task updates."""
    from airflow.sdk import Asset

    return Asset(name=f"{dag_id}.merged", uri=f"llama-lora://{dag_id}/merged")


def _params(p: Pipeline) -> dict[str, Any]:
    """The trigger form, in sections, with the pipeline file's values as defaults."""
    from airflow.sdk import Param

    def source(name: str, what: str) -> dict[str, Param]:
        src = getattr(p.sources, name)
        return {
            f"{name}_url": Param(
                src.url,
                type="string",
                minLength=1,
                section="Sources",
                description=f"{what}: an absolute path, file://, http(s)://, s3://BUCKET/KEY or "
                "hf://ORG/REPO; Airflow templates such as {{ ds }} are rendered with the run's logical date",
            ),
            f"{name}_sha256": Param(
                src.sha256,
                type=["null", "string"],
                pattern=SHA256_PATTERN,
                section="Sources",
                description=f"expected sha256 of the {what.split(':')[0]} (64 hex digits); empty: unchecked",
            ),
        }

    c = p.cluster
    return {
        **source("alpaca", "Alpaca records (JSON list or JSON Lines)"),
        **source(
            "tokenizer",
            "the tokenizer: a sentencepiece or Llama 3 tokenizer.model, or an HF tokenizer folder "
            "(hf://ORG/REPO fetches only its tokenizer files)",
        ),
        **source("weights", "base weights: a MindSpore .ckpt, or a Hugging Face Llama folder or repo"),
        "storage_conn_id": Param(
            p.sources.storage_conn_id,
            type=["null", "string"],
            section="Sources",
            description="Airflow connection with the credentials for s3:// (login/password, extra "
            "endpoint_url) or hf:// (password = token); empty: none",
        ),
        "work_dir": Param(
            p.work_dir,
            type="string",
            pattern="^/",
            section="Data",
            description="absolute folder for downloads, data, checkpoints and runs/<run_id>; it must be "
            "inside the workers' LLAMA_LORA_WORK_ROOT",
        ),
        "seq_length": Param(
            p.data.seq_length,
            type="integer",
            minimum=8,
            maximum=131072,
            section="Data",
            description="tokens per record (records hold seq_length + 1 ids); the model trains on this "
            "length",
        ),
        "layout": Param(
            p.data.layout,
            enum=["buckets", "packed", "padded"],
            section="Data",
            description="buckets: records as MindFormers writes them, each batch trimmed to its length "
            "bucket (same losses, far less padding computed); packed: several conversations per row, each "
            "attending only to itself (the least work); padded: the reference's full-length records",
        ),
        "holdout_fraction": Param(
            p.data.holdout_fraction,
            type="number",
            minimum=0,
            maximum=0.5,
            section="Data",
            description="fraction of the records held out for evaluation, chosen by a hash of each record's "
            "content (the same records every run); 0: train on every record (the quick start's data)",
        ),
        "chat_template": Param(
            p.data.chat_template,
            type=["null", "string"],
            enum=[None, *CHAT_TEMPLATES],
            section="Data",
            description="how conversations become tokens, in training and evaluation: vicuna_v1.1 "
            "(MindFormers'), llama3 (Meta's header format), hf (the tokenizer's own chat_template, e.g. "
            "ChatML), chatml; empty: the tokenizer's default (vicuna_v1.1 for sentencepiece, llama3 for "
            "Llama 3's tokenizer.model, hf for an HF tokenizer with a chat_template)",
        ),
        "config": Param(
            p.config_path,
            type="string",
            pattern="^/.*\\.ya?ml$",
            section="Training",
            description="absolute path of the training YAML (MindFormers keys)",
        ),
        "overrides": Param(
            p.overrides,
            type="object",
            section="Training",
            description='config keys to override, e.g. {"runner_config.epochs": 1}; an unknown key fails '
            "the run at once",
        ),
        "prompts": Param(
            p.evaluation.prompt_values,
            type="array",
            items={"anyOf": [{"type": "string", "minLength": 1}, PROMPT_SCHEMA]},
            section="Evaluation and export",
            description="instructions the base and the fine-tuned model both answer (greedy), shown side "
            'by side in the report; {"prompt": ..., "expect": text} also checks that each answer contains '
            "the text, and the report counts the right answers before and after",
        ),
        "max_new_tokens": Param(
            p.evaluation.max_new_tokens,
            type="integer",
            minimum=1,
            maximum=4096,
            section="Evaluation and export",
            description="tokens generated per prompt",
        ),
        "base_model": Param(
            p.export.base_model,
            type="string",
            minLength=1,
            section="Evaluation and export",
            description="the Hugging Face base model the PEFT adapter names (base_model_name_or_path)",
        ),
        "export_merged": Param(
            p.export.merged,
            type="boolean",
            section="Evaluation and export",
            description="also write the merged full checkpoint (MindSpore .ckpt and HF safetensors)",
        ),
        "device_target": Param(
            c.device_target, enum=["Ascend", "CPU"], section="Cluster", description="Ascend NPUs, or CPU"
        ),
        "master_port": Param(
            c.master_port,
            type=["null", "integer"],
            minimum=1024,
            maximum=65535,
            section="Cluster",
            description="msrun's master port; empty: a free port per run",
        ),
        "nodes": Param(
            c.nodes,
            type="integer",
            minimum=1,
            maximum=256,
            section="Cluster",
            description="NPU nodes the fine-tune spans: one finetune task per node, the ranks split evenly; "
            "work_dir must be on storage every node shares",
        ),
        "node_start_timeout": Param(
            c.node_start_timeout,
            type="integer",
            minimum=10,
            maximum=86400,
            section="Cluster",
            description="seconds the node tasks wait for each other to start before failing",
        ),
    }


# Jinja the tasks share: the run's folders and what earlier tasks produced. Data is keyed by the
# fetched Alpaca file's content, so runs on different snapshots (a backfill) never share (or
# overwrite) each other's files, and the same snapshot is prepared once.
WORK = "{{ params.work_dir }}"
RUN_DIR = f"{WORK}/runs/{{{{ run_id }}}}"
DATA = f"{WORK}/data/alpaca-{{{{ ti.xcom_pull(task_ids='fetch_alpaca')['files'][0]['sha256'][:16] }}}}"
EVAL_DATA = "{{ ti.xcom_pull(task_ids='tokenize_to_mindrecord')['holdout']['output_file'] or '' }}"
TOKENIZER = "{{ ti.xcom_pull(task_ids='fetch_tokenizer')['path'] }}"
BASE = "{{ ti.xcom_pull(task_ids='import_checkpoint')['output_path'] }}"
CONFIG = {"config": "{{ params.config }}", "overrides": "{{ params.overrides }}"}


def build_dag(p: Pipeline, source_file: str | os.PathLike[str] | None = None, chatter_level: int = 10) -> Any:
    """The fine-tune DAG of pipeline `p`: preparation, the fine-tune (a task per node), its outputs,
    and the report."""
    from airflow.sdk import DAG

    when = {
        type(None): "manual runs only (set `schedule` in the pipeline file to retrain on a schedule)",
        str: f"scheduled: {p.schedule} (UTC)",
    }.get(type(p.schedule), f"runs when Asset {getattr(p.schedule, 'asset', '')} is updated")
    tracking = (
        {**p.tracking.model_dump(), "experiment": p.tracking.experiment or p.dag_id} if p.tracking else None
    )
    with DAG(
        dag_id=p.dag_id,
        description=(p.description.strip() + " " if p.description else "") + when[0].upper() + when[1:] + ".",
        doc_md=f"Built from pipeline file `{source_file}`." if source_file else None,
        schedule=schedule_of(p),
        catchup=False,
        max_active_runs=1,  # one fine-tune holds a whole node's NPUs (backfills: see finetune's pool)
        render_template_as_native_obj=True,  # params keep their types (ints, the overrides dict)
        default_args={"retries": p.retries, "retry_delay": timedelta(minutes=p.retry_delay_minutes)},
        tags=[*p.tags, "llama", "lora", "pipeline"],
        params=_params(p),
    ) as dag:
        validate, mindrecord, sharded = _preparation_tasks(p)
        finetune = _finetune_task(p, validate, chatter_level, tracking)
        outputs = _output_tasks(p)
        report = _report_task(source_file, tracking)
        [mindrecord, sharded] >> finetune >> outputs
        # The report is validate's teardown: it runs once the rest is done, failed or not (a failed run
        # gets its report too, and stays failed: a teardown does not decide the run's state); it does
        # not run when validate refused the request (nothing was done, and work_dir may be refused).
        # Not on_failure_fail_dagrun: that would make the report a leaf whose success passes a run whose
        # fine-tune failed (seen with 3 nodes on 2 hosts); a report that fails shows red on its own.
        outputs >> report.as_teardown(setups=validate)
    return dag


def _preparation_tasks(p: Pipeline) -> tuple[Any, Any, Any]:
    """validate, the fetches, the data stages and the checkpoint stages, wired; returns validate and
    the two tasks the fine-tune waits for (the MindRecord and the sharded checkpoint)."""
    from operators.stages import (
        AlpacaToConversationsOperator,
        FetchOperator,
        ImportCheckpointOperator,
        ShardCheckpointOperator,
        TokenizeToMindRecordOperator,
    )
    from operators.validate import ValidateParamsOperator

    validate = ValidateParamsOperator(
        task_id="validate",
        default_work_root=p.work_dir,
        trusted_config=p.config_path,
        trusted_conn_id=p.sources.storage_conn_id,
    )
    fetch = {
        name: FetchOperator(
            task_id=f"fetch_{name}",
            source=f"{{{{ params.{name}_url }}}}",
            dest=f"{WORK}/downloads/{name}",
            sha256=f"{{{{ params.{name}_sha256 or '' }}}}",
            conn_id="{{ params.storage_conn_id or '' }}",
            tokenizer=name == "tokenizer",  # hf://ORG/REPO: its tokenizer files, not its weights
            source_roots="{{ ti.xcom_pull(task_ids='validate')[0]['source_roots'] }}",
            source_hosts="{{ ti.xcom_pull(task_ids='validate')[0]['source_hosts'] }}",
        )
        for name in ("alpaca", "tokenizer", "weights")
    }
    conversations = AlpacaToConversationsOperator(
        task_id="alpaca_to_conversations",
        data_path="{{ ti.xcom_pull(task_ids='fetch_alpaca')['path'] }}",
        output_path=f"{DATA}/alpaca-conversation.json",
    )
    layout = "{{ '-packed' if params.layout == 'packed' else '' }}"
    holdout = "{{ '-holdout%g' % params.holdout_fraction if params.holdout_fraction else '' }}"
    mindrecord = TokenizeToMindRecordOperator(
        task_id="tokenize_to_mindrecord",
        input_glob="{{ ti.xcom_pull(task_ids='alpaca_to_conversations')['output_path'] }}",
        model_file=TOKENIZER,
        seq_length="{{ params.seq_length }}",
        packing="{{ 'pack' if params.layout == 'packed' else 'none' }}",
        holdout_fraction="{{ params.holdout_fraction }}",
        chat_template="{{ params.chat_template }}",
        **CONFIG,  # its pad_token_id pads the records
        # each layout and split keeps its own file: switching back and forth re-tokenizes nothing
        output_file=f"{DATA}/seq{{{{ params.seq_length }}}}/alpaca{layout}{holdout}.mindrecord",
    )
    imported = ImportCheckpointOperator(
        task_id="import_checkpoint",
        input_path="{{ ti.xcom_pull(task_ids='fetch_weights')['path'] }}",
        output_path=f"{WORK}/checkpoint/llama2.ckpt",
    )
    sharded = ShardCheckpointOperator(
        task_id="shard_checkpoint",
        load_checkpoint=BASE,
        **CONFIG,
        output_dir=f"{WORK}/checkpoint/transformed",
    )
    validate >> list(fetch.values())
    fetch["alpaca"] >> conversations >> mindrecord
    fetch["tokenizer"] >> mindrecord
    fetch["weights"] >> imported >> sharded
    return validate, mindrecord, sharded


def _finetune_task(p: Pipeline, validate: Any, chatter_level: int, tracking: dict[str, Any] | None) -> Any:
    """The fine-tune: one msrun task per node, mapped over validate's per-node plans."""
    from operators.finetune import MsrunFinetuneOperator

    return MsrunFinetuneOperator.partial(
        task_id="finetune",
        map_index_template="node {{ task.node_rank }}",
        **CONFIG,
        train_dataset_dir="{{ ti.xcom_pull(task_ids='tokenize_to_mindrecord')['output_file'] }}",
        eval_dataset_dir=EVAL_DATA,  # the held-out split: eval loss during training, on the curve
        load_checkpoint="{{ ti.xcom_pull(task_ids='shard_checkpoint')['output_dir'] }}",
        seq_length="{{ params.seq_length }}",
        output_dir=RUN_DIR,
        device_target="{{ params.device_target }}",
        master_port="{{ params.master_port }}",
        length_buckets="{{ params.layout != 'padded' }}",
        nodes="{{ params.nodes }}",
        node_start_timeout="{{ params.node_start_timeout }}",
        # A pool with one slot per NPU node serialises fine-tunes across DAGs and backfills;
        # max_active_tis_per_dag does so for this DAG even in the default pool.
        max_active_tis_per_dag=p.cluster.queue_nodes,
        retries=0,  # a failed fine-tune wants a look at the failed rank, not a blind re-launch
        rank_chatter_level=chatter_level,
        progress_interval_s=p.training.progress_interval_s,
        tracking=tracking,
        queue=p.cluster.queue,
        pool=p.cluster.pool,
    ).expand(node_rank=validate.output.map(node_rank_of))


def _output_tasks(p: Pipeline) -> list[Any]:
    """What the fine-tuned run becomes: the evaluation (on an NPU node), the PEFT adapter and the
    merged checkpoint, each export updating its Asset."""
    from operators.evaluate import EvaluateOperator
    from operators.export import ExportAdapterOperator, ExportMergedOperator

    generation = {
        "tokenizer": TOKENIZER,
        "chat_template": "{{ params.chat_template }}",
        "prompts": "{{ params.prompts }}",
        "max_new_tokens": "{{ params.max_new_tokens }}",
    }
    evaluate = EvaluateOperator(
        task_id="evaluate",
        **CONFIG,
        base_checkpoint=BASE,
        run_dir=RUN_DIR,
        eval_data=EVAL_DATA,
        **generation,
        seq_length="{{ params.seq_length }}",
        device_target="{{ params.device_target }}",
        queue=p.cluster.queue,
        pool=p.cluster.pool,
    )
    adapter = ExportAdapterOperator(
        task_id="export_adapter",
        run_dir=RUN_DIR,
        **CONFIG,
        base_model="{{ params.base_model }}",
        base_checkpoint=BASE,
        seq_length="{{ params.seq_length }}",
        **generation,
        outlets=[adapter_asset(p.dag_id)],
    )
    merged = ExportMergedOperator(
        task_id="export_merged",
        enabled="{{ params.export_merged }}",
        run_dir=RUN_DIR,
        **CONFIG,
        base_checkpoint=BASE,
        seq_length="{{ params.seq_length }}",
        outlets=[merged_asset(p.dag_id)],
    )
    return [evaluate, adapter, merged]


def _report_task(source_file: str | os.PathLike[str] | None, tracking: dict[str, Any] | None) -> Any:
    from operators.report import ReportOperator

    return ReportOperator(
        task_id="report", run_dir=RUN_DIR, **CONFIG, pipeline_file=str(source_file or ""), tracking=tracking
    )


def node_rank_of(plan: dict) -> int:
    """The node rank of one of validate's per-node plans (the fine-tune is mapped over them)."""
    return plan["node_rank"]
