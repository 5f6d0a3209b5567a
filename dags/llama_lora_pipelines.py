"""One fine-tune DAG per pipeline file in configs/pipelines/ (or the folder LLAMA_LORA_PIPELINES names).

Each `<name>.yaml` there defines a DAG (operators/pipeline_file.py describes the keys,
operators/pipeline.py the DAG's shape).
A pipeline file that cannot become a DAG is left out here and reported by llama_lora_pipeline_errors.py
as an import error naming the file, its DAG and the key; the other pipelines' DAGs load regardless.

Deployment settings (environment of the dag-processor and the workers):
- `LLAMA_LORA_PIPELINES`: the folder of pipeline files (default: the repository's configs/pipelines).
- `LLAMA_LORA_WORK_ROOT`: every work_dir must resolve inside it (default: the pipeline's work_dir).
- `LLAMA_LORA_RANK_CHATTER_LEVEL`: the level MindSpore's distributed start-up chatter is logged at in
  the task log (default DEBUG: hidden at Airflow's default INFO; always in the rank's own file).

This file only wires: parsing it imports neither MindSpore nor torch.
"""

from __future__ import annotations

import logging
import os

from airflow.sdk import get_parsing_context

from operators.pipeline import build_dag
from operators.pipeline_file import load_pipelines


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        raise ValueError(f"LLAMA_LORA_RANK_CHATTER_LEVEL={name!r} is not a logging level (DEBUG, INFO, ...)")
    return level


CHATTER_LEVEL = _level(os.environ.get("LLAMA_LORA_RANK_CHATTER_LEVEL", "DEBUG"))
PIPELINES, _problems = load_pipelines()
# A task's process parses this file for its own DAG (Airflow's parsing context names it): building
# only that one spares every task the other pipelines' DAGs. The dag-processor builds them all.
_WANTED = get_parsing_context().dag_id
for _path, _pipeline in PIPELINES:
    if _WANTED in (None, _pipeline.dag_id):
        globals()[_pipeline.dag_id] = build_dag(_pipeline, source_file=_path, chatter_level=CHATTER_LEVEL)
