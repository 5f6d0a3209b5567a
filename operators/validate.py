"""The pipeline's first task: check every parameter of the run before any work starts."""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseHook, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from llama_core.results import to_jsonable
from operators.stages import StageOperator, render_dated

WORK_ROOT_ENV = "LLAMA_LORA_WORK_ROOT"
# Connections a trigger may name besides its pipeline's own: a param could otherwise borrow any
# connection's credentials (a database's, another team's bucket's) for the fetch.
STORAGE_CONNECTIONS_ENV = "LLAMA_LORA_STORAGE_CONNECTIONS"


class ValidateParamsOperator(StageOperator):
    """Check the DAG run's params with `llama_core.validate.validate_run` (a second or less).

    `work_dir` must resolve inside the worker's `LLAMA_LORA_WORK_ROOT` (else `default_work_root`), so a
    typo or a `../..` cannot make the pipeline write elsewhere; local sources inside
    `LLAMA_LORA_SOURCE_ROOTS` (else that work root), the config inside `LLAMA_LORA_CONFIG_ROOTS` (else
    configs/ and the pipelines folder) or be `trusted_config`, the one its pipeline file names (pipeline
    files are trusted like DAG files); `storage_conn_id`, when set, must be the pipeline file's own
    (`trusted_conn_id`) or listed in `LLAMA_LORA_STORAGE_CONNECTIONS` (comma-separated), and exist. A
    violation fails the run at once, naming the param, whatever the task's retries
    (`AirflowFailException`): those are for a control plane that failed the task before it ran (an
    api-server too slow to answer its start), which would otherwise fail the run. Returns what was
    established (resolved work_dir, world size, nodes) once per node with its `node_rank`: the list the
    fine-tune is mapped over.
    """

    ui_color = "#e8f8e0"

    def __init__(
        self,
        *,
        default_work_root: str,
        trusted_config: str | None = None,
        trusted_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.default_work_root = default_work_root
        self.trusted_config = trusted_config
        self.trusted_conn_id = trusted_conn_id

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.confine import config_roots
        from llama_core.validate import validate_run

        params = dict(context["params"])
        for name in ("alpaca_url", "tokenizer_url", "weights_url"):  # as the fetch tasks will see them
            if isinstance(params.get(name), str):
                params[name] = render_dated(self, params[name], context)
        root = os.environ.get(WORK_ROOT_ENV) or self.default_work_root
        trusted = (self.trusted_config,) if self.trusted_config else ()
        run = validate_run(params, root, config_root_dirs=config_roots(*trusted))
        validated = to_jsonable(run)
        conn_id = params.get("storage_conn_id")
        if conn_id:
            allowed = {c.strip() for c in os.environ.get(STORAGE_CONNECTIONS_ENV, "").split(",") if c.strip()}
            allowed |= {self.trusted_conn_id} if self.trusted_conn_id else set()
            if conn_id not in allowed:
                raise AirflowFailException(
                    f"param 'storage_conn_id': {conn_id!r} is neither this pipeline's connection nor listed "
                    f"in {STORAGE_CONNECTIONS_ENV} on the workers ({', '.join(sorted(allowed)) or 'none'})"
                )
            try:
                BaseHook.get_connection(conn_id)
            except AirflowNotFoundException as exc:  # only "no such connection" is the param's fault
                raise AirflowFailException(f"param 'storage_conn_id': {exc}") from exc
        self.log.info("params checked: %s (work root %s)", validated, root)
        # one plan per node: the fine-tune is mapped over this list (a task per node)
        return [{**validated, "node_rank": node} for node in run.node_ranks]
