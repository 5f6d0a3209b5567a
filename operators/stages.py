"""Operators for the pipeline's data and checkpoint stages: each calls one `llama_core` function.

The stage does the work, the caching and the error reporting; the operator only renders its
arguments, calls it, and hands its result object on as the task's XCom.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook, BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from llama_core.results import to_jsonable


def resolved_config(config: str, overrides: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The YAML run config with the overrides applied: what the trainer will see."""
    from llama_core.config import apply_overrides, load_config
    from llama_core.validate import overrides_dict

    return apply_overrides(load_config(config), overrides_dict(overrides).items())


def run_config(config: str, overrides: Mapping[str, Any] | str | None, seq_length: Any) -> dict[str, Any]:
    """The config as the ranks trained with it: `resolved_config` with the run's seq_length param."""
    from llama_core.config import apply_overrides

    cfg = resolved_config(config, overrides)
    if seq_length not in (None, ""):
        cfg = apply_overrides(cfg, [("model.model_config.seq_length", int(seq_length))])
    return cfg


def allow_child_processes() -> None:
    """Let this task process start multiprocessing workers (the tokenizer's) under Celery.

    A task process forked from a worker of Celery's prefork pool (billiard) inherits that process's
    multiprocessing identity: the daemon mark, so multiprocessing refuses to start children
    ("daemonic processes are not allowed to have children"), and billiard's authkey, which refuses
    to be pickled for a spawned child. A stage waits for every worker it starts (what the daemon rule
    protects), so both are reset to plain values; elsewhere nothing changes."""
    import multiprocessing

    me = multiprocessing.current_process()
    if me.daemon:
        me.daemon = False
    plain = multiprocessing.process.AuthenticationString
    config = getattr(me, "_config", None)  # billiard's setter would wrap the key in its own type again
    if type(me.authkey) is not plain and isinstance(config, dict) and "authkey" in config:
        config["authkey"] = plain(bytes(me.authkey))


def render_dated(task: BaseOperator, text: str, context: Context) -> str:
    """A param value that is itself a template (a source URL with `{{ ds }}`) rendered with the run's
    context, so each logical date (a backfill's runs) fetches its own snapshot. A value it uses that
    this run lacks (a manual run has no logical date) fails the task naming it, instead of rendering
    as an empty string."""
    if "{{" not in text and "{%" not in text:
        return text
    from jinja2 import meta

    env = task.get_template_env()
    used = meta.find_undeclared_variables(env.parse(text))
    missing = sorted(name for name in used if context.get(name) is None and name not in env.globals)
    if missing:
        raise AirflowFailException(
            f"{text!r} uses {', '.join(missing)}, which this run does not have: a source with the logical "
            "date needs a run that has one (a scheduled run, a backfill, or a trigger with a logical date)"
        )
    return task.render_template(text, context)


class StageOperator(BaseOperator):
    """An operator over one `llama_core` stage: `run_stage` does the work.

    A deterministic error of the stage (bad input, a wrong setting: `LlamaCoreError` that is not
    `retryable`) fails the task at once with `AirflowFailException`, so its retries are not spent on an
    error that would come back; a retryable one (a network that was down) is left to the retries.

    A stage whose output is shared by runs (`output_field` names the attribute holding its path)
    holds a file lock beside that output while it runs: runs that overlap (a backfill) wait for each
    other and the later one finds the output in the cache instead of writing it a second time.

    A full disk (`DiskFullError`, also from the operator's own writes) fails the task with its message
    alone: the traceback of a write says nothing more than "no space left on <path>".
    """

    output_field: str | None = None

    def execute(self, context: Context) -> Any:
        """Run the stage; a dict result gains `stage_seconds` (the run's report lists them)."""
        t0 = time.monotonic()
        result = self._run_locked(context)
        if isinstance(result, dict):
            result["stage_seconds"] = round(time.monotonic() - t0, 3)
        return result

    def _run_locked(self, context: Context) -> Any:
        from filelock import FileLock

        from llama_core.atomic import disk_full
        from llama_core.errors import DiskFullError, LlamaCoreError

        allow_child_processes()
        lock = contextlib.nullcontext()
        output = Path(getattr(self, self.output_field)) if self.output_field else Path.cwd()
        try:
            with disk_full(self.task_id, output):
                if self.output_field:
                    output.parent.mkdir(parents=True, exist_ok=True)
                    lock = FileLock(output.parent / f".{output.name}.stage.lock")
                with lock:
                    return self.run_stage(context)
        except LlamaCoreError as exc:
            if exc.retryable:
                raise
            cause = None if isinstance(exc, DiskFullError) else exc
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from cause

    def run_stage(self, context: Context) -> Any:
        """The stage's work, defined by each operator."""
        raise NotImplementedError(f"{type(self).__name__} defines no run_stage")


class FetchOperator(StageOperator):
    """Download (or reuse from the cache) one source: a path, http(s)://, s3:// or hf:// URL.

    `conn_id` names an Airflow connection whose credentials are handed to the fetch: an AWS
    connection (login = access key, password = secret, extra `endpoint_url` for OBS/MinIO) for
    s3://, or any connection whose password is a Hugging Face token for hf://. `tokenizer`: the
    source is a tokenizer, so an hf:// repo fetches only its tokenizer files (`tokenizer_source`).
    `source_roots` (validate's: a list, or colon-separated): a local source must resolve inside them,
    each file checked as it is opened, so a symlink changed since validate cannot point elsewhere.
    `source_hosts` (validate's `LLAMA_LORA_SOURCE_HOSTS`; empty: any): the hosts an http(s) source and
    its redirects may name.
    """

    template_fields: Sequence[str] = ("source", "dest", "sha256", "conn_id", "source_roots", "source_hosts")
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        source: str,
        dest: str,
        sha256: str | None = None,
        conn_id: str | None = None,
        tokenizer: bool = False,
        source_roots: Sequence[str] | str | None = None,
        source_hosts: Sequence[str] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source, self.dest, self.sha256, self.conn_id = source, dest, sha256, conn_id
        self.tokenizer, self.source_roots, self.source_hosts = tokenizer, source_roots, source_hosts

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.fetch import Credentials, fetch
        from llama_core.fetch.hf import tokenizer_source

        source = render_dated(self, self.source, context)
        if self.tokenizer:
            source = tokenizer_source(source)
        credentials = None
        if self.conn_id:
            conn = BaseHook.get_connection(self.conn_id)
            extra = conn.extra_dejson
            credentials = Credentials(
                key=conn.login or None,
                secret=conn.password or None,
                token=extra.get("token") or conn.password or None,
                endpoint_url=extra.get("endpoint_url") or conn.host or None,
            )
        roots = self.source_roots.split(":") if isinstance(self.source_roots, str) else self.source_roots
        hosts = (
            self.source_hosts.split(",") if isinstance(self.source_hosts, str) else self.source_hosts or ()
        )
        return to_jsonable(
            fetch(
                source,
                self.dest,
                sha256=self.sha256 or None,
                credentials=credentials,
                local_roots=[r for r in roots if r] if roots else None,
                allowed_hosts=[h.strip() for h in hosts if h.strip()],
            )
        )


class AlpacaToConversationsOperator(StageOperator):
    """Alpaca records -> the conversation JSON the tokenizer stage reads (MindFormers' format)."""

    template_fields: Sequence[str] = ("data_path", "output_path")
    output_field = "output_path"

    def __init__(self, *, data_path: str, output_path: str, on_error: str = "raise", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_path, self.output_path, self.on_error = data_path, output_path, on_error

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.data.alpaca_converter import convert_alpaca

        return to_jsonable(convert_alpaca(self.data_path, self.output_path, on_error=self.on_error))


class TokenizeToMindRecordOperator(StageOperator):
    """Conversations -> MindRecord `input_ids`/`labels`, token-identical to MindFormers; `packing`
    "pack" packs several conversations per row instead; `holdout_fraction` > 0 writes a held-out
    evaluation split (chosen by record content) to a second file; `chat_template` picks the chat
    format (empty: the tokenizer's default). Records are padded with the pad_token_id of the run
    config (`config` + `overrides`) when given, so the trainer finds the padding by it."""

    template_fields: Sequence[str] = (
        "input_glob", "model_file", "seq_length", "output_file", "packing", "holdout_fraction",
        "chat_template", "config", "overrides",
    )  # fmt: skip
    output_field = "output_file"

    def __init__(
        self,
        *,
        input_glob: str,
        model_file: str,
        output_file: str,
        seq_length: int | str = 4096,
        dataset_type: str = "qa",
        packing: str = "none",
        holdout_fraction: float | str = 0.0,
        chat_template: str | None = None,
        config: str | None = None,
        overrides: Mapping[str, Any] | str | None = None,
        file_partition: int = 1,
        workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config, self.overrides = config, overrides
        self.input_glob, self.model_file, self.output_file = input_glob, model_file, output_file
        self.seq_length, self.dataset_type, self.packing = seq_length, dataset_type, packing
        self.file_partition, self.workers = file_partition, workers
        self.holdout_fraction, self.chat_template = holdout_fraction, chat_template

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.data.llama_preprocess import preprocess
        from llama_core.model.config import LlamaConfig

        pad_id = 0
        if self.config:
            pad_id = LlamaConfig.from_run_config(resolved_config(self.config, self.overrides)).pad_token_id
        result = preprocess(
            dataset_type=self.dataset_type,
            input_glob=self.input_glob,
            model_file=self.model_file,
            seq_length=int(self.seq_length),
            output_file=self.output_file,
            file_partition=self.file_partition,
            workers=self.workers,
            packing=self.packing,
            holdout_fraction=float(self.holdout_fraction or 0),
            chat_template=self.chat_template or None,  # a null param may render as ""
            pad_id=pad_id,
        )
        return to_jsonable(result)


class ImportCheckpointOperator(StageOperator):
    """A Hugging Face Llama folder -> one MindSpore .ckpt; a .ckpt input is passed on unchanged."""

    template_fields: Sequence[str] = ("input_path", "output_path")
    output_field = "output_path"

    def __init__(self, *, input_path: str, output_path: str, dtype: str = "fp32", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_path, self.output_path, self.dtype = input_path, output_path, dtype

    def run_stage(self, context: Context) -> dict[str, Any]:
        source = Path(self.input_path)
        if source.is_file() and source.suffix == ".ckpt":
            self.log.info("%s is already a MindSpore checkpoint: nothing to import", source)
            return {"output_path": str(source), "imported": False, "cached": True}  # nothing to do
        from llama_core.checkpoint.convert import convert_hf_to_ms

        return {**to_jsonable(convert_hf_to_ms(source, self.output_path, dtype=self.dtype)), "imported": True}


class ShardCheckpointOperator(StageOperator):
    """A complete (or distributed) checkpoint -> `rank_<i>/checkpoint_<i>.ckpt` for the config's layout."""

    template_fields: Sequence[str] = ("load_checkpoint", "config", "overrides", "output_dir")
    output_field = "output_dir"

    def __init__(
        self,
        *,
        load_checkpoint: str,
        config: str,
        output_dir: str,
        overrides: Mapping[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.load_checkpoint, self.config = load_checkpoint, config
        self.output_dir, self.overrides = output_dir, overrides

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.checkpoint.shard import shard_checkpoint

        config = resolved_config(self.config, self.overrides)
        return to_jsonable(shard_checkpoint(self.load_checkpoint, config, self.output_dir))
