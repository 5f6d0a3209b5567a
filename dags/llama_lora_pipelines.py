"""One fine-tune DAG per pipeline file in configs/pipelines/ (or the folder LLAMA_LORA_PIPELINES names).

Each `<name>.yaml` there defines a DAG (operators/pipeline.py describes the keys and the DAG's shape).
A pipeline file that cannot become a DAG shows as this file's import error, naming the pipeline
file, its DAG and the key; the other pipelines' DAGs load regardless.

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

from operators.pipeline import PipelineError, broken_pipelines_dag, build_dag, load_pipeline, pipeline_files


def _level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        raise ValueError(f"LLAMA_LORA_RANK_CHATTER_LEVEL={name!r} is not a logging level (DEBUG, INFO, ...)")
    return level


CHATTER_LEVEL = _level(os.environ.get("LLAMA_LORA_RANK_CHATTER_LEVEL", "DEBUG"))
_errors: list[str] = []
_seen: dict[str, str] = {}
for _path in pipeline_files():
    try:
        _pipeline = load_pipeline(_path)
        if _pipeline.dag_id in _seen:
            raise PipelineError(
                f"{_path}: key 'dag_id': {_pipeline.dag_id!r} is already {_seen[_pipeline.dag_id]}'s"
            )
        globals()[_pipeline.dag_id] = build_dag(_pipeline, source_file=_path, chatter_level=CHATTER_LEVEL)
        _seen[_pipeline.dag_id] = str(_path)
    except PipelineError as exc:
        _errors.append(str(exc))
if _errors:
    pipeline_errors = broken_pipelines_dag(_errors)
