"""Operators are thin: these tests check the glue they add (XCom values, pass-through, failure report)."""

import dataclasses
import logging
import socket
from pathlib import Path

import pytest

from operators.finetune import MsrunFinetuneOperator
from operators.stages import ImportCheckpointOperator, to_xcom

REPO = Path(__file__).resolve().parents[1]


def test_to_xcom_makes_results_json_able(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Inner:
        path: Path

    @dataclasses.dataclass
    class Result:
        inner: Inner
        files: list[Path]
        counts: dict[str, int]

    value = to_xcom(Result(Inner(tmp_path), [tmp_path / "a"], {"n": 1}))
    assert value == {"inner": {"path": str(tmp_path)}, "files": [str(tmp_path / "a")], "counts": {"n": 1}}


def test_mindspore_checkpoint_is_passed_through(tmp_path: Path) -> None:
    ckpt = tmp_path / "llama2_7b.ckpt"
    ckpt.write_bytes(b"not parsed")
    op = ImportCheckpointOperator(
        task_id="import", input_path=str(ckpt), output_path=str(tmp_path / "o.ckpt")
    )
    assert op.execute({}) == {"output_path": str(ckpt), "imported": False}
    assert not (tmp_path / "o.ckpt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_failed_ranks_fail_the_task_with_their_logs_grouped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llama_core.launch import LaunchError

    op = MsrunFinetuneOperator(
        task_id="finetune",
        config=str(REPO / "configs" / "lora_llama2_tiny.yaml"),
        train_dataset_dir=str(tmp_path / "missing.mindrecord"),
        output_dir=str(tmp_path / "run"),
        device_target="CPU",
        master_port=_free_port(),
    )
    with caplog.at_level(logging.INFO), pytest.raises(LaunchError) as failure:
        op.execute({})
    assert failure.value.rank in (0, 1)
    assert f"rank {failure.value.rank}" in str(failure.value)
    messages = [r.getMessage() for r in caplog.records]
    groups = [m for m in messages if m.startswith("::group::rank ")]
    assert groups and "FAILED" in groups[0]  # failed ranks come first
    assert any("missing.mindrecord" in m for m in messages)  # the rank's own error is in the log


def test_overrides_arrive_as_a_dict_whichever_way_they_were_rendered() -> None:
    from operators.stages import overrides_dict

    assert overrides_dict({"runner_config.epochs": 1}) == {"runner_config.epochs": 1}
    assert overrides_dict('{"runner_config.epochs": 1}') == {"runner_config.epochs": 1}
    assert overrides_dict(None) == {} and overrides_dict("") == {}
