"""What this project adds to every Airflow component that installs it (the `airflow.plugins` entry
point in pyproject.toml): the timetable of scheduled pipelines, and the "Fine-tune" tab of a DAG run,
a page the api-server serves under /llama-lora (operators/finetune_view.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from operators.schedule import FutureTicksTimetable

VIEW_PREFIX = "/llama-lora"


class _BuiltOnFirstRead:
    """A class attribute built when first read. Only the api-server reads `fastapi_apps`; building
    the app imports Airflow's API security (seconds) that schedulers, dag-processors and every task
    process, which load plugins for the timetable, must not pay."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build, self.value = build, None

    def __get__(self, obj: object, owner: type) -> Any:
        if self.value is None:
            self.value = self.build()
        return self.value


def _view_apps() -> list[dict[str, Any]]:
    from operators.finetune_view import create_app

    return [{"app": create_app(), "url_prefix": VIEW_PREFIX, "name": "llama-lora fine-tune view"}]


class LlamaLoraPlugin(AirflowPlugin):
    name = "llama_lora"
    timetables = [FutureTicksTimetable]  # noqa: RUF012 (Airflow reads these class attributes)
    fastapi_apps = _BuiltOnFirstRead(_view_apps)
    external_views = [  # noqa: RUF012
        {
            "name": "Fine-tune",
            "href": VIEW_PREFIX + "/runs/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "fine-tune",  # shown inside the run's page, as a tab
        }
    ]
