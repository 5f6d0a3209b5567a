"""The pipeline's first task: check every parameter of the run before any work starts."""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseHook, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from llama_core.results import to_jsonable
from operators.stages import StageOperator, render_dated

WORK_ROOT_ENV = "LLAMA_LORA_WORK_ROOT"


class ValidateParamsOperator(StageOperator):
    """Check the DAG run's params with `llama_core.validate.validate_run` (a second or less).

    `work_dir` must resolve inside the worker's `LLAMA_LORA_WORK_ROOT` (else `default_work_root`), so a
    typo or a `../..` cannot make the pipeline write elsewhere; `storage_conn_id`, when set, must name
    an existing Airflow connection. A violation fails the run at once, naming the param, without
    retries. Returns what was established (resolved work_dir, world size, nodes) once per node with
    its `node_rank`: the list the fine-tune is mapped over.
    """

    ui_color = "#e8f8e0"

    def __init__(self, *, default_work_root: str, **kwargs: Any) -> None:
        kwargs.setdefault("retries", 0)  # a wrong param stays wrong
        super().__init__(**kwargs)
        self.default_work_root = default_work_root

    def run_stage(self, context: Context) -> dict[str, Any]:
        from llama_core.validate import validate_run

        params = dict(context["params"])
        for name in ("alpaca_url", "tokenizer_url", "weights_url"):  # as the fetch tasks will see them
            if isinstance(params.get(name), str):
                params[name] = render_dated(self, params[name], context)
        root = os.environ.get(WORK_ROOT_ENV) or self.default_work_root
        run = validate_run(params, root)
        validated = to_jsonable(run)
        conn_id = params.get("storage_conn_id")
        if conn_id:
            try:
                BaseHook.get_connection(conn_id)
            except AirflowNotFoundException as exc:  # only "no such connection" is the param's fault
                raise AirflowFailException(f"param 'storage_conn_id': {exc}") from exc
        self.log.info("params checked: %s (work root %s)", validated, root)
        # one plan per node: the fine-tune is mapped over this list (a task per node)
        return [{**validated, "node_rank": node} for node in run.node_ranks]
