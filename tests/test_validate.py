"""`validate_run`: the whole request is checked up front, and each mistake names its param."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_core.errors import ConfigError
from llama_core.validate import validate_run

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "lora_llama2_tiny.yaml")


@pytest.fixture()
def params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("LLAMA_LORA_SOURCE_ROOTS", str(tmp_path))  # the sources sit beside the work root
    (tmp_path / "alpaca.json").write_text("[]")
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    (tmp_path / "hf").mkdir()
    return {
        "alpaca_url": str(tmp_path / "alpaca.json"),
        "alpaca_sha256": None,
        "tokenizer_url": f"file://{tmp_path / 'tokenizer.model'}",
        "tokenizer_sha256": "a" * 64,
        "weights_url": str(tmp_path / "hf"),
        "weights_sha256": "",
        "storage_conn_id": None,
        "work_dir": str(tmp_path / "root" / "work"),
        "config": TINY,
        "overrides": {"runner_config.epochs": 2},
        "seq_length": 32,
        "device_target": "CPU",
        "master_port": None,
    }


def test_a_good_request_passes_and_reports_the_launch(params: dict[str, Any], tmp_path: Path) -> None:
    run = validate_run(params, tmp_path / "root")
    assert run.work_dir == str((tmp_path / "root" / "work").resolve())
    assert run.world_size == 2 and run.seq_length == 32 and run.master_port is None
    assert run.overrides == {"runner_config.epochs": 2}
    assert (run.nodes, run.ranks_per_node, run.node_ranks) == (1, 2, (0,))
    assert not (tmp_path / "root").exists()  # validation writes nothing


def test_a_multi_node_request_splits_the_ranks_over_the_nodes(params: dict[str, Any], tmp_path: Path) -> None:
    overrides = {"parallel_config.data_parallel": 16}
    run = validate_run({**params, "nodes": 4, "device_target": "Ascend", "overrides": overrides}, tmp_path)
    assert (run.world_size, run.nodes, run.ranks_per_node, run.node_ranks) == (16, 4, 4, (0, 1, 2, 3))


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"work_dir": "runs/x"}, "work_dir", "must be an absolute path"),
        ({"work_dir": "/etc"}, "work_dir", "outside the allowed work root"),
        ({"config": str(REPO / "configs" / "missing.yaml")}, "config", "missing.yaml does not exist"),
        ({"config": "/nope/missing.yaml"}, "config", "outside the allowed roots"),
        ({"config": "configs/lora_llama2_tiny.yaml"}, "config", "must be an absolute path"),
        ({"overrides": {"runner_config.epoch": 1}}, "overrides", "runner_config.epoch"),
        ({"overrides": '{"runner_config.epochs": '}, "overrides", "not a JSON object"),
        ({"overrides": {"runner_config.epochs": "two"}}, "overrides", "runner_config.epochs"),
        (
            {"device_target": "Ascend", "overrides": {"parallel_config.data_parallel": 9}},
            "overrides",
            "asks for 9 ranks, 9 per node on 1 node(s); one Ascend node runs 1..8",
        ),
        (
            {"device_target": "Ascend", "overrides": {"parallel_config.data_parallel": 18}, "nodes": 2},
            "overrides",
            "asks for 18 ranks, 9 per node on 2 node(s)",
        ),
        ({"nodes": 3}, "nodes", "3 nodes cannot share the 2 ranks of parallel_config evenly"),
        ({"nodes": 0}, "nodes", "integer in 1..256"),
        ({"node_start_timeout": 1}, "node_start_timeout", "integer in 10..86400"),
        (
            {"overrides": {"parallel_config.model_parallel": 3}},
            "overrides",
            "num_heads = 4 is not divisible by parallel_config.model_parallel = 3",
        ),
        (
            {"overrides": {"parallel_config.pipeline_stage": 2}},
            "overrides",
            "pipeline parallelism is not implemented",
        ),
        (
            {
                "overrides": {"parallel_config.model_parallel": 2, "parallel_config.data_parallel": 1},
                "nodes": 2,
            },
            "nodes",
            "model_parallel = 2 must fit inside one node",
        ),
        ({"seq_length": 4}, "seq_length", "integer in 8..131072"),
        ({"seq_length": 512}, "seq_length", "exceeds model.model_config.max_position_embedding 256"),
        ({"master_port": 80}, "master_port", "integer in 1024..65535"),
        ({"device_target": "GPU"}, "device_target", "must be one of Ascend, CPU"),
        ({"alpaca_url": ""}, "alpaca_url", "is empty"),
        ({"alpaca_url": "ftp://host/a.json"}, "alpaca_url", "unsupported source scheme"),
        ({"tokenizer_url": "tokenizer.model"}, "tokenizer_url", "must be absolute"),
        ({"weights_url": "/nope/weights"}, "weights_url", "outside the allowed roots"),
        ({"weights_url": "s3:///key"}, "weights_url", "names no bucket"),
        ({"alpaca_sha256": "abc"}, "alpaca_sha256", "64 hexadecimal digits"),
        ({"prompts": ["fine", " "]}, "prompts", "prompt 1: must be a non-empty string"),
        ({"prompts": [{"prompt": "asked", "expect": ""}]}, "prompts", "prompt 0: must be a string or"),
    ],
)
def test_each_mistake_names_its_param(
    params: dict[str, Any], tmp_path: Path, change: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"param '{param}'") as info:
        validate_run({**params, **change}, tmp_path / "root")
    assert message in str(info.value)


def test_a_symlink_out_of_the_root_is_refused(params: dict[str, Any], tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside the allowed work root"):
        validate_run({**params, "work_dir": str(root / "escape" / "work")}, root)
    with pytest.raises(ConfigError, match="outside the allowed work root"):
        validate_run({**params, "work_dir": str(root / ".." / "x")}, root)


def test_remote_sources_are_checked_for_form_only(params: dict[str, Any], tmp_path: Path) -> None:
    remote = {
        "alpaca_url": "https://example.invalid/alpaca.json",
        "tokenizer_url": "s3://bucket/llama/tokenizer.model",
        "weights_url": "hf://meta-llama/Llama-2-7b-hf",
    }
    assert validate_run({**params, **remote}, tmp_path / "root").world_size == 2


def test_cli_prints_the_checked_request(params: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    cmd = [sys.executable, "-m", "llama_core.validate", "--params", str(path), "--work_root"]
    ok = subprocess.run([*cmd, str(tmp_path / "root")], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and json.loads(ok.stdout)["world_size"] == 2
    bad = subprocess.run([*cmd, str(tmp_path / "other")], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "error: param 'work_dir'" in bad.stderr
    assert "mindspore" not in bad.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_core.validate",
            "--params",
            str(tmp_path / "nope.json"),
            "--work_root",
            "/",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert (
        missing.returncode == 2 and "error: --params" in missing.stderr and "Traceback" not in missing.stderr
    )


def test_the_model_the_ranks_build_is_checked(params: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"param 'overrides'.*hidden_size 64 is not divisible by num_heads 3"
    ):
        validate_run({**params, "overrides": {"model.model_config.num_heads": 3}}, tmp_path / "root")


@pytest.mark.parametrize(
    ("model", "model_parallel", "message"),
    [
        ({"num_heads": 8}, 3, "num_heads = 8 is not divisible by parallel_config.model_parallel = 3"),
        ({"n_kv_heads": 3, "num_heads": 6, "hidden_size": 48}, 2,
         "n_kv_heads = 3 is not divisible by .*model_parallel = 2, nor is model_parallel a multiple"),
        ({"intermediate_size": 90}, 4, "FFN width .* = 90 is not divisible by .*model_parallel = 4"),
        ({"vocab_size": 511}, 2, "vocab_size = 511 is not divisible by parallel_config.model_parallel = 2"),
    ],
)  # fmt: skip
def test_a_model_that_does_not_split_over_model_parallel_is_refused(
    params: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: dict[str, Any],
    model_parallel: int,
    message: str,
) -> None:
    """Heads, kv heads (split, or model_parallel a multiple of them), FFN width and vocabulary must
    split over the ranks of a tensor-parallel group: refused in validate, naming the config."""
    import yaml

    monkeypatch.setenv("LLAMA_LORA_CONFIG_ROOTS", str(tmp_path))  # where the test writes its config

    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["model"]["model_config"].update(model)
    config = tmp_path / "split.yaml"
    config.write_text(yaml.safe_dump(cfg))
    overrides = {"parallel_config.model_parallel": model_parallel, "parallel_config.data_parallel": 1}
    with pytest.raises(ConfigError, match=rf"param 'overrides'.*{message}"):  # the split asked for
        validate_run({**params, "config": str(config), "overrides": overrides}, tmp_path / "root")
    # the same model with a model_parallel it splits over passes
    validate_run(
        {**params, "config": str(config), "overrides": {"parallel_config.data_parallel": 1}},
        tmp_path / "root",
    )
