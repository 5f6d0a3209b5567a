"""A pipeline file (`configs/pipelines/<name>.yaml`): its keys, and their checks.

A pipeline file says what to fine-tune, on what, where and when: its DAG id, sources (with sha256
where known), training config and overrides, data options, what to evaluate and export, the cluster
(device, nodes, ranks, queue, pool), the schedule (none, cron, or an Asset) and retries. Its values
are the trigger form's defaults (operators/pipeline.py builds the DAG), so a run from the UI, a
scheduled run and a backfill start from the same file. A source URL may use the logical date
(`{{ ds }}`, any Airflow template) so a backfill trains each date on that date's data.

`load_pipeline` checks a file completely with pydantic: an unknown, missing or mistyped key fails
naming its path (`cluster.nodes`), the file and the DAG. Loading imports neither MindSpore nor torch.
A file that cannot become a DAG is left out by dags/llama_lora_pipelines.py and reported as the
import error of dags/llama_lora_pipeline_errors.py: Airflow hides every DAG of a file that has an
import error, so the error must come from a file that has no DAG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llama_core.config import layout_from_config, load_config, read_yaml
from llama_core.data.chat import CHAT_TEMPLATES
from llama_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "configs" / "pipelines"
SHA256_PATTERN = "^([0-9a-fA-F]{64})?$"
DAG_ID_PATTERN = "^[A-Za-z0-9_.-]{1,200}$"


class PipelineError(ValueError):
    """A pipeline file that cannot become a DAG: the message names the file, the DAG and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    url: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str | None, Field(pattern=SHA256_PATTERN)] = None


class Sources(_Strict):
    alpaca: Source
    tokenizer: Source
    weights: Source
    storage_conn_id: str | None = None


class Training(_Strict):
    config: Annotated[str, Field(pattern=r"\.ya?ml$")]  # relative paths are relative to the repository
    overrides: dict[str, Any] = Field(default_factory=dict)
    progress_interval_s: Annotated[int, Field(ge=1, le=86400)] = 60  # a progress line in the task log


class Data(_Strict):
    seq_length: Annotated[int, Field(ge=8, le=131072)] = 4096
    layout: Literal["buckets", "packed", "padded"] = "buckets"
    holdout_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    chat_template: Literal[CHAT_TEMPLATES] | None = None  # None: the tokenizer's default


class Prompt(_Strict):
    """An evaluation prompt with the text its answer must contain (the report counts who got it right)."""

    prompt: Annotated[str, Field(min_length=1)]
    expect: Annotated[str, Field(min_length=1)] | None = None


class Evaluation(_Strict):
    prompts: list[Annotated[str, Field(min_length=1)] | Prompt] = Field(default_factory=list)
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64

    @property
    def prompt_values(self) -> list[str | dict[str, str]]:
        """The prompts as the evaluation takes them: strings, or {"prompt", "expect"} objects."""
        return [p if isinstance(p, str) else p.model_dump(exclude_none=True) for p in self.prompts]


class Export(_Strict):
    base_model: Annotated[str, Field(min_length=1)]  # the HF base the adapter applies to
    merged: bool = False


class Cluster(_Strict):
    device_target: Literal["Ascend", "CPU"] = "Ascend"
    nodes: Annotated[int, Field(ge=1, le=256)] = 1
    ranks: Annotated[int | None, Field(ge=1, le=2048)] = None  # None: the config's parallel_config
    queue: Annotated[str, Field(min_length=1)] = "ascend"
    pool: Annotated[str, Field(min_length=1)] = "default_pool"
    queue_nodes: Annotated[int, Field(ge=1)] = 1  # NPU nodes behind the queue: node tasks of this DAG at once
    node_start_timeout: Annotated[int, Field(ge=10, le=86400)] = 600
    master_port: Annotated[int | None, Field(ge=1024, le=65535)] = None


class Tracking(_Strict):
    """MLflow tracking of every run (`llama_core.tracking`): the Airflow connection whose host (or
    URI) is the tracking server, the experiment (default: the dag_id), and the registered model the
    adapter becomes a version of (none: not registered)."""

    conn_id: Annotated[str, Field(min_length=1)]
    experiment: Annotated[str, Field(min_length=1)] | None = None
    register_model: Annotated[str, Field(min_length=1)] | None = None


class AssetSchedule(_Strict):
    asset: Annotated[str, Field(min_length=1)]  # an Asset URI, e.g. the dataset's s3:// location


class Pipeline(_Strict):
    dag_id: Annotated[str, Field(pattern=DAG_ID_PATTERN)]
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    work_dir: Annotated[str, Field(pattern="^/")]
    sources: Sources
    training: Training
    data: Data = Field(default_factory=Data)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    export: Export
    cluster: Cluster = Field(default_factory=Cluster)
    tracking: Tracking | None = None  # None: runs are not tracked (mlflow is never imported)
    schedule: Annotated[str, Field(min_length=1)] | AssetSchedule | None = None  # cron/preset or {asset}
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    retry_delay_minutes: Annotated[float, Field(ge=0)] = 2.0

    @property
    def config_path(self) -> str:
        path = Path(self.training.config)
        return str(path if path.is_absolute() else REPO / path)

    @property
    def overrides(self) -> dict[str, Any]:
        """The config overrides the form starts from: the file's, and `cluster.ranks` as the
        data_parallel that fills them (ranks / model_parallel)."""
        extra = {}
        if self.cluster.ranks:
            mp = self.training.overrides.get("parallel_config.model_parallel")
            if mp is None:
                try:
                    mp = layout_from_config(load_config(self.config_path)).mp
                except ConfigError as exc:
                    raise PipelineError(f"key 'training.config': {exc}") from None
            if self.cluster.ranks % mp:
                raise PipelineError(
                    f"key 'cluster.ranks': {self.cluster.ranks} is not a multiple of the training "
                    f"config's parallel_config.model_parallel = {mp}"
                )
            extra = {"parallel_config.data_parallel": self.cluster.ranks // mp}
        return {**self.training.overrides, **extra}


def _key_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the YAML key path (`cluster.nodes`, `evaluation.prompts[1]`),
    without the union-branch names pydantic adds."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "AssetSchedule", "Prompt", "constrained-str", "function-after") or "[" in str(
            part
        ):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """The pipeline of one YAML file; any problem raises PipelineError naming the file and the key."""
    path = Path(path)
    try:
        doc = read_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PipelineError(f"{path}: not readable as YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: expected a mapping of pipeline keys, got {type(doc).__name__}")
    name = doc.get("dag_id") or path.stem
    try:
        pipeline = Pipeline.model_validate(doc)
        schedule_of(pipeline)  # a cron expression is only checked by building its timetable
        pipeline.overrides  # noqa: B018 (reads the config: cluster.ranks against its model_parallel)
    except ValidationError as exc:
        problems = sorted({f"key '{_key_path(e['loc'])}': {e['msg']}" for e in exc.errors()})
        raise PipelineError(f"{path} (DAG {name}): " + "; ".join(problems)) from None
    except PipelineError as exc:
        raise PipelineError(f"{path} (DAG {name}): {exc}") from None
    return pipeline


def load_pipelines(
    folder: str | os.PathLike[str] | None = None,
) -> tuple[list[tuple[Path, Pipeline]], list[str]]:
    """The pipelines of the folder's files that can become DAGs, with their files, and one message
    per file that cannot (naming the file, its DAG and the key), a second use of a dag_id included."""
    good: list[tuple[Path, Pipeline]] = []
    problems: list[str] = []
    owner: dict[str, Path] = {}
    for path in pipeline_files(folder):
        try:
            pipeline = load_pipeline(path)
        except PipelineError as exc:
            problems.append(str(exc))
            continue
        if pipeline.dag_id in owner:
            problems.append(
                f"{path}: key 'dag_id': {pipeline.dag_id!r} is already {owner[pipeline.dag_id]}'s"
            )
            continue
        owner[pipeline.dag_id] = path
        good.append((path, pipeline))
    return good, problems


def pipeline_files(folder: str | os.PathLike[str] | None = None) -> list[Path]:
    """The pipeline files: `LLAMA_LORA_PIPELINES` (a folder) or configs/pipelines, sorted by name."""
    folder = Path(folder or os.environ.get("LLAMA_LORA_PIPELINES") or PIPELINES)
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def schedule_of(p: Pipeline) -> Any:
    """None (manual), a cron timetable that never runs a tick already past, or an Asset."""
    if p.schedule is None:
        return None
    if isinstance(p.schedule, AssetSchedule):
        from airflow.sdk import Asset

        return [Asset(p.schedule.asset)]
    from operators.schedule import FutureTicksTimetable

    try:
        timetable = FutureTicksTimetable(p.schedule, timezone="UTC")
        timetable.validate()  # else Airflow's own error would replace this file's in the import errors
        return timetable
    except Exception as exc:  # croniter's and Airflow's own types: the message is what counts
        raise PipelineError(f"key 'schedule': {p.schedule!r} is not a cron expression: {exc}") from exc
