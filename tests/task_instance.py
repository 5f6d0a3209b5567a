"""A stand-in for the task instance in an operator's context, for operator tests without Airflow's
database: `xcom_pull` answers from `xcoms` (task_id -> value), `xcom_push` keeps what a task pushes as
the XCom backend stores it (JSON)."""

from __future__ import annotations

import json
from typing import Any


class TaskInstance:
    def __init__(self, xcoms: dict[str, Any]) -> None:
        self.xcoms: dict[str, Any] = xcoms
        self.pushed: dict[str, Any] = {}

    def xcom_pull(self, task_ids: str) -> Any:
        return self.xcoms.get(task_ids)

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = json.loads(json.dumps(value))
