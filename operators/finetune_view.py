"""The "Fine-tune" tab of a pipeline DAG run in the Airflow UI: a FastAPI app the api-server mounts
(`fastapi_apps` of the plugin in operators/plugin.py) serving one page, shown inside the run's view
(`external_views`, destination `dag_run`).

The page reads everything through Airflow's own REST API with the session of the user looking at it
(the api-server's `_token` cookie): the finetune task's `progress` XCom, which it updates while it
trains (operators/progress.py), its node task instances and their `ranks` XCom, the data task's
result, and the report task's `report` XCom: the report's data model (llama_core/report/model.py),
from which the page shows the evaluation, the stages with their cache hits and the outputs, the
figures report.md shows (the evaluate task's result only sets the chart's base-model line while the
run goes on). Nothing is read from the workers' disks, so the view works where the api-server cannot
see them. The page itself answers only a user who may read the DAG's runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "finetune_view.html"


def _can_read_runs() -> Any:
    """Airflow's dependency that authorizes reading the path's DAG runs (401 without a login, 403
    without the permission). It lives in Airflow's api_fastapi package, not in its public SDK: if a
    later Airflow moves it, the page refuses everyone (403) rather than answer without a check."""
    try:
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
        from airflow.api_fastapi.core_api.security import requires_access_dag
    except ImportError:

        def refuse() -> None:
            raise HTTPException(403, "this Airflow's authorization API is not the one the view knows")

        return refuse
    return requires_access_dag("GET", DagAccessEntity.RUN)


def create_app() -> FastAPI:
    app = FastAPI(title="llama-lora fine-tune view", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=[Depends(_can_read_runs())])
    def finetune_page(dag_id: str, run_id: str) -> HTMLResponse:
        # the page finds the DAG and run ids in its own URL: nothing of the request is echoed into it
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    return app
