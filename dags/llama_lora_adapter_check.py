"""Example consumer: runs whenever the demo pipeline publishes a new adapter (its Asset).

It loads the adapter the event names, imports it back into MindSpore on its base weights and answers
the pipeline's fixed prompts, checking they match what the producing run's evaluation recorded. Copy
it and change `PIPELINE` (and `device_target`) to gate serving on your own pipeline's adapter.
"""

from __future__ import annotations

from airflow.sdk import DAG

from operators.evaluate import AdapterCheckOperator
from operators.pipeline import adapter_asset

PIPELINE = "llama2_tiny_lora_demo"

with DAG(
    dag_id="llama_lora_adapter_check",
    description=f"Loads each new adapter of pipeline {PIPELINE} and answers its prompts (example consumer).",
    schedule=[adapter_asset(PIPELINE)],
    catchup=False,
    tags=["llama", "lora", "example"],
) as dag:
    AdapterCheckOperator(task_id="answer_prompts", asset=adapter_asset(PIPELINE), device_target="CPU")
