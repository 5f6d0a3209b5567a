"""The whole DAG through Airflow (`airflow dags test`), exactly as `make demo` runs it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_OUTPUTS = [
    "data/alpaca-conversation.json",
    "data/seq160/alpaca.mindrecord",
    "checkpoint/llama2.ckpt",
    "checkpoint/transformed/manifest.json",
]


def _run_demo(out: Path) -> str:
    env = {**os.environ, "VENV": str(Path(sys.executable).parents[1])}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh"), str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (out / "dag-run.log").read_text()


@pytest.mark.slow
def test_demo_dag_trains_on_two_ranks_then_reuses_every_stage(tmp_path: Path) -> None:
    log = _run_demo(tmp_path)
    assert "state=success" in log
    # each rank's lines reach the task log under its own source
    for rank in (0, 1):
        assert re.search(rf"\[msrun\.rank_{rank}\]", log), f"no line from rank {rank}"
    assert "::group::rank 0: ok" in log and "::group::rank 1: ok" in log

    (summary_path,) = tmp_path.glob("work/runs/*/train_summary.json")
    summary = json.loads(summary_path.read_text())
    losses = [point["loss"] for point in summary["loss_series"]]
    assert summary["world_size"] == 2 and len(losses) == summary["steps"] > 0
    assert losses[-1] < losses[0] - 0.1  # it learns: supervised tokens reached the loss

    work = tmp_path / "work"
    stamps = {name: (work / name).stat().st_mtime_ns for name in STAGE_OUTPUTS}
    _run_demo(tmp_path)
    assert {name: (work / name).stat().st_mtime_ns for name in STAGE_OUTPUTS} == stamps
    assert len(list(tmp_path.glob("work/runs/*/train_summary.json"))) == 2  # a new run trains anew
