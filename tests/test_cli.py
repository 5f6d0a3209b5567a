"""`llama-lora`: one command over the stages, printing what the Airflow tasks put in XCom."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_core.console import STAGES

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "lora_llama2_tiny.yaml")
# Installed by `pip install -e .` ([project.scripts]) beside the interpreter running the tests.
LLAMA_LORA = Path(sys.executable).with_name("llama-lora")


def llama_lora(*args: str) -> subprocess.CompletedProcess[str]:
    assert LLAMA_LORA.exists(), f"{LLAMA_LORA} is not installed: run `pip install -e .`"
    return subprocess.run([str(LLAMA_LORA), *args], capture_output=True, text=True, cwd=REPO)


def test_help_lists_every_stage() -> None:
    done = llama_lora("--help")
    assert done.returncode == 0
    for stage in STAGES.values():
        assert f"  {stage.name:<15} {stage.summary}\n" in done.stdout
    assert len(STAGES) == 16 and "plan" in STAGES


def test_convert_alpaca_prints_the_operators_xcom(tmp_path: Path) -> None:
    from operators.stages import AlpacaToConversationsOperator

    records = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Add", "input": "1+1"},
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    args = ["--data_path", str(tmp_path / "alpaca.json"), "--on_error", "skip"]
    done = llama_lora("convert-alpaca", *args, "--output_path", str(tmp_path / "cli.json"))
    assert done.returncode == 0, done.stderr
    data, out = str(tmp_path / "alpaca.json"), str(tmp_path / "op.json")
    op = AlpacaToConversationsOperator(task_id="convert", data_path=data, output_path=out, on_error="skip")
    xcom = op.execute({})
    assert xcom.pop("stage_seconds") >= 0  # the operator times the stage for the run's report
    assert json.loads(done.stdout) == {**xcom, "output_path": str(tmp_path / "cli.json")}
    assert done.stdout == json.dumps(json.loads(done.stdout), indent=2) + "\n"
    assert xcom["records_skipped"] == 1
    assert (tmp_path / "cli.json").read_bytes() == (tmp_path / "op.json").read_bytes()


def test_validate_prints_the_checked_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from operators.validate import WORK_ROOT_ENV, ValidateParamsOperator

    params = {
        "alpaca_url": "https://example.invalid/alpaca.json",
        "tokenizer_url": "s3://bucket/llama/tokenizer.model",
        "weights_url": "hf://meta-llama/Llama-2-7b-hf",
        "work_dir": str(tmp_path / "root" / "work"),
        "config": TINY,
        "overrides": {"runner_config.epochs": 2},
        "seq_length": 32,
        "device_target": "CPU",
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    done = llama_lora(
        "validate", "--params", str(tmp_path / "params.json"), "--work_root", str(tmp_path / "root")
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.delenv(WORK_ROOT_ENV, raising=False)
    xcom = ValidateParamsOperator(task_id="validate", default_work_root=str(tmp_path / "root")).execute(
        {"params": params}
    )
    assert xcom == [{**json.loads(done.stdout), "node_rank": 0}]  # one plan per node
    assert xcom[0]["world_size"] == 2


def test_a_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Add", "input": "1+1"}]))
    args = ["--data_path", str(tmp_path / "alpaca.json"), "--output_path", str(tmp_path / "out.json")]
    done = llama_lora("convert-alpaca", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "alpaca.json" in done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "out.json").exists()


def test_an_unknown_stage_is_a_usage_error() -> None:
    done = llama_lora("train")
    assert done.returncode == 2
    assert "invalid choice: 'train'" in done.stderr
