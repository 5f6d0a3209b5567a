"""The import errors of the pipeline files (configs/pipelines/) that cannot become DAGs.

Airflow shows an exception raised while importing a DAG file as that file's import error, and marks
every DAG of the file stale. So llama_lora_pipelines.py builds the good pipelines' DAGs and leaves
the broken ones out, and this file, which holds no DAG, raises naming each broken file, its DAG and
the key ("key 'cluster.nodes': Input should be a valid integer"). Nothing is hidden by it.
"""

from __future__ import annotations

from operators.pipeline_file import PipelineError, load_pipelines

_, _problems = load_pipelines()
if _problems:
    raise PipelineError(f"{len(_problems)} pipeline file(s) cannot become DAGs:\n" + "\n".join(_problems))
