"""Confinement (issue 21, point 1): whoever may trigger a run sets its params, so `validate` refuses
params that read outside the allowed folders, write outside the run folder, or break the run, each
naming its param, in well under a second; the fetch checks local files again as it opens them."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llama_core.confine import open_confined
from llama_core.errors import ConfigError
from llama_core.fetch import fetch
from llama_core.validate import validate_run

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "lora_llama2_tiny.yaml")
SECRET = "aws_secret_access_key: AKIA-DO-NOT-LEAK-1234567890"
ENV = (
    "LLAMA_LORA_SOURCE_ROOTS",
    "LLAMA_LORA_CONFIG_ROOTS",
    "LLAMA_LORA_PIPELINES",
    "LLAMA_LORA_SOURCE_HOSTS",
)


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The work root, holding the inputs; the roots' variables unset (their defaults apply)."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    inputs = tmp_path / "root" / "inputs"
    (inputs / "hf").mkdir(parents=True)
    (inputs / "alpaca.json").write_text("[]")
    (inputs / "tokenizer.model").write_bytes(b"x")
    (inputs / "hf" / "config.json").write_text("{}")
    (tmp_path / "secret.json").write_text(SECRET)
    return tmp_path / "root"


@pytest.fixture()
def params(root: Path) -> dict[str, Any]:
    return {
        "alpaca_url": str(root / "inputs" / "alpaca.json"),
        "tokenizer_url": f"file://{root / 'inputs' / 'tokenizer.model'}",
        "weights_url": str(root / "inputs" / "hf"),
        "work_dir": str(root / "work"),
        "config": TINY,
        "overrides": {},
        "seq_length": 32,
        "device_target": "CPU",
        "master_port": None,
    }


def refused(params: dict[str, Any], root: Path, param: str, *message: str) -> str:
    """The refusal of `params`: it names `param`, says each of `message`, and comes at once."""
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        validate_run(params, root)
    assert time.monotonic() - t0 < 0.5
    text = str(info.value)
    assert text.startswith(f"param '{param}': "), text
    for part in message:
        assert part in text, text
    return text


def cli(params: dict[str, Any], root: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    cmd = [sys.executable, "-m", "llama_core.validate", "--params", str(path), "--work_root", str(root)]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=60
    )


def test_inputs_inside_the_work_root_pass_by_default(params: dict[str, Any], root: Path) -> None:
    run = validate_run(params, root)
    assert run.source_roots == (str(root.resolve()),) and run.world_size == 2


# ---------------------------------------------------------------- local sources


@pytest.mark.parametrize("name", ["alpaca_url", "tokenizer_url", "weights_url"])
def test_a_source_outside_the_roots_is_refused(
    params: dict[str, Any], root: Path, tmp_path: Path, name: str
) -> None:
    refused({**params, name: str(tmp_path / "secret.json")}, root, name, "outside the allowed roots")


def test_a_symlink_inside_the_root_pointing_out_is_refused(params: dict[str, Any], root: Path) -> None:
    link = root / "inputs" / "link.json"
    link.symlink_to(root.parent / "secret.json")
    text = refused({**params, "alpaca_url": str(link)}, root, "alpaca_url", "outside the allowed roots")
    assert str(root.parent / "secret.json") in text  # the resolved path is named, never the content
    assert "AKIA" not in text


@pytest.mark.parametrize(
    "url",
    [
        "{root}/inputs/../../secret.json",
        "file://{root}/inputs/../../secret.json",
        "file://{root}/../secret.json",
    ],
)
def test_dot_dot_escapes_are_refused(params: dict[str, Any], root: Path, url: str) -> None:
    refused({**params, "alpaca_url": url.format(root=root)}, root, "alpaca_url", "outside the allowed roots")


def test_file_urls_are_confined_like_paths(params: dict[str, Any], root: Path) -> None:
    secret = root.parent / "secret.json"
    refused({**params, "tokenizer_url": f"file://{secret}"}, root, "tokenizer_url", "outside")
    assert validate_run({**params, "alpaca_url": f"file://{root}/inputs/alpaca.json"}, root)


def test_devices_fifos_and_sockets_are_refused(
    params: dict[str, Any], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused({**params, "weights_url": "/dev/zero"}, root, "weights_url", "outside the allowed roots")
    monkeypatch.setenv("LLAMA_LORA_SOURCE_ROOTS", f"/dev:{root}")  # even inside a root
    refused({**params, "weights_url": "/dev/zero"}, root, "weights_url", "not a regular file or a folder")
    fifo = root / "inputs" / "fifo"
    os.mkfifo(fifo)
    refused({**params, "alpaca_url": str(fifo)}, root, "alpaca_url", "not a regular file")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "inputs" / "sock"))
        refused({**params, "alpaca_url": str(root / "inputs" / "sock")}, root, "alpaca_url", "not a regular")


@pytest.mark.parametrize("name", ["alpaca_url", "config", "work_dir"])
def test_a_nul_byte_is_refused_not_a_crash(params: dict[str, Any], root: Path, name: str) -> None:
    refused({**params, name: f"{root}/inputs/a\0b"}, root, name)


def test_a_missing_source_inside_the_roots_is_named(params: dict[str, Any], root: Path) -> None:
    refused({**params, "weights_url": str(root / "inputs" / "nope")}, root, "weights_url", "does not exist")


def test_source_roots_are_colon_separated(
    params: dict[str, Any], root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "alpaca.json").write_text("[]")
    moved = {**params, "alpaca_url": str(tmp_path / "shared" / "alpaca.json")}
    refused(moved, root, "alpaca_url", "LLAMA_LORA_SOURCE_ROOTS")
    monkeypatch.setenv("LLAMA_LORA_SOURCE_ROOTS", f"{tmp_path / 'shared'}:{root}")
    assert validate_run(moved, root).source_roots == (str(tmp_path / "shared"), str(root))


# ---------------------------------------------------------------- the training config


@pytest.fixture()
def outside_config(tmp_path: Path) -> Path:
    """A config outside the roots: a secret-looking line in a file that is not even valid YAML."""
    path = tmp_path / "evil.yaml"
    path.write_text(f"{SECRET}\n  - : [unclosed\n")
    return path


def test_a_config_outside_the_roots_is_refused_without_quoting_it(
    params: dict[str, Any], root: Path, tmp_path: Path, outside_config: Path
) -> None:
    text = refused({**params, "config": str(outside_config)}, root, "config", "outside the allowed roots")
    assert "AKIA" not in text and "aws_secret" not in text
    done = cli({**params, "config": str(outside_config)}, root, tmp_path)
    assert done.returncode == 2 and "error: param 'config'" in done.stderr
    assert "AKIA" not in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_a_config_symlink_escaping_its_root_is_refused(
    params: dict[str, Any], root: Path, tmp_path: Path, outside_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "run.yaml").symlink_to(outside_config)
    monkeypatch.setenv("LLAMA_LORA_CONFIG_ROOTS", str(configs))
    text = refused(
        {**params, "config": str(configs / "run.yaml")}, root, "config", "outside the allowed roots"
    )
    assert "AKIA" not in text
    refused({**params, "config": f"{configs}/../evil.yaml"}, root, "config", "outside")
    refused({**params, "config": TINY}, root, "config", "outside")  # the variable replaces the defaults


def test_a_config_must_be_a_regular_file(
    params: dict[str, Any], root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused({**params, "config": "/dev/zero"}, root, "config", "outside the allowed roots")
    os.mkfifo(tmp_path / "fifo.yaml")
    monkeypatch.setenv("LLAMA_LORA_CONFIG_ROOTS", f"{tmp_path}:/dev")
    refused({**params, "config": str(tmp_path / "fifo.yaml")}, root, "config", "is not a regular file")
    refused({**params, "config": "/dev/zero"}, root, "config", "is not a regular file")
    refused({**params, "config": str(tmp_path)}, root, "config", "is not a regular file")


def test_the_pipelines_folder_is_a_config_root(
    params: dict[str, Any], root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "tiny.yaml").write_text(Path(TINY).read_text())
    refused({**params, "config": str(pipelines / "tiny.yaml")}, root, "config", "LLAMA_LORA_CONFIG_ROOTS")
    monkeypatch.setenv("LLAMA_LORA_PIPELINES", str(pipelines))
    assert validate_run({**params, "config": str(pipelines / "tiny.yaml")}, root).world_size == 2


def test_the_config_a_pipeline_file_names_is_trusted(
    params: dict[str, Any], root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from operators.validate import ValidateParamsOperator

    own = tmp_path / "own.yaml"
    own.write_text(Path(TINY).read_text())
    monkeypatch.setenv("LLAMA_LORA_WORK_ROOT", str(root))
    op = ValidateParamsOperator(task_id="validate", default_work_root="/nonexistent", trusted_config=str(own))
    assert op.retries == 0
    (plan,) = op.execute({"params": {**params, "config": str(own)}})
    assert plan["source_roots"] == [str(root)]
    with pytest.raises(AirflowFailException, match=r"param 'config'.*outside the allowed roots"):
        op.execute({"params": {**params, "config": str(tmp_path / "secret.json")}})


# ---------------------------------------------------------------- overrides that become paths


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"callbacks.1.prefix": "../../../../x"}, "callbacks.1.prefix"),
        ({"callbacks.1.prefix": "a/b"}, "callbacks.1.prefix"),
        ({"callbacks.1.prefix": "/tmp/x"}, "callbacks.1.prefix"),
        ({"callbacks.1.prefix": ".."}, "callbacks.1.prefix"),
        ({"callbacks.1.prefix": ".hidden"}, "callbacks.1.prefix"),
        ({"callbacks.1.prefix": "x\0y"}, "callbacks.1.prefix"),
        ({"callbacks.1.prefix": ""}, "callbacks.1.prefix"),
        ({"callbacks.1.prefix": ["x"]}, "callbacks.1.prefix"),
        ({"callbacks.1": {"type": "CheckpointMonitor", "prefix": "../x"}}, "callbacks.1.prefix"),
        ({"callbacks": [{"type": "MFLossMonitor"}, {"prefix": "/x"}]}, "callbacks.1.prefix"),
        ({"output_dir": "/tmp/elsewhere"}, "output_dir"),
        ({"output_dir": "../../x"}, "output_dir"),
        ({"load_checkpoint": "/etc"}, "load_checkpoint"),
        ({"src_strategy_path_or_dir": "../s"}, "src_strategy_path_or_dir"),
        ({"train_dataset.data_loader.dataset_dir": "/data/other"}, "train_dataset.data_loader.dataset_dir"),
        ({"processor.tokenizer.vocab_file": "/etc/passwd"}, "processor.tokenizer.vocab_file"),
        ({"parallel.strategy_ckpt_config.save_file": "../s.ckpt"}, "parallel.strategy_ckpt_config.save_file"),
        ({"model.model_config.checkpoint_name_or_path": "/x"}, "model.model_config.checkpoint_name_or_path"),
    ],
)
def test_an_override_that_becomes_a_path_must_be_a_plain_name(
    params: dict[str, Any], root: Path, overrides: dict[str, Any], key: str
) -> None:
    refused({**params, "overrides": overrides}, root, "overrides", f"config key {key!r}", "plain name")


def test_plain_names_stay_allowed(params: dict[str, Any], root: Path) -> None:
    overrides = {"callbacks.1.prefix": "my_lora-v2.1", "output_dir": "output"}
    assert validate_run({**params, "overrides": overrides}, root).overrides == overrides


# ---------------------------------------------------------------- numbers that break a run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr_schedule.learning_rate": -1e-4}, "'lr_schedule.learning_rate' must be a finite number > 0"),
        ({"lr_schedule.learning_rate": 0}, "'lr_schedule.learning_rate' must be a finite number > 0"),
        ({"lr_schedule.learning_rate": math.nan}, "'lr_schedule.learning_rate' must be a finite number > 0"),
        ({"lr_schedule.learning_rate": math.inf}, "'lr_schedule.learning_rate' must be a finite number > 0"),
        ({"lr_schedule.learning_rate": "fast"}, "'lr_schedule.learning_rate' must be float"),
        ({"lr_schedule.lr_end": 1.0}, "'lr_schedule.lr_end' must be a finite number in [0, learning_rate"),
        ({"lr_schedule.lr_end": -1.0}, "'lr_schedule.lr_end'"),
        ({"lr_schedule.warmup_ratio": 1.0}, "'lr_schedule.warmup_ratio' must be in [0, 1)"),
        ({"lr_schedule.warmup_ratio": math.nan}, "'lr_schedule.warmup_ratio' must be in [0, 1)"),
        ({"lr_schedule.total_steps": 0}, "'lr_schedule.total_steps' must be -1"),
        ({"model.model_config.pet_config.lora_rank": 0}, "pet_config.lora_rank must be a positive integer"),
        ({"model.model_config.pet_config.lora_rank": 2.5}, "pet_config.lora_rank must be a positive integer"),
        ({"model.model_config.pet_config.lora_alpha": 0}, "pet_config.lora_alpha must be a positive number"),
        ({"model.model_config.pet_config.lora_alpha": math.inf}, "pet_config.lora_alpha"),
        ({"model.model_config.pet_config.lora_alpha": "x"}, "pet_config.lora_alpha"),
        ({"model.model_config.pet_config.lora_dropout": 1.0}, "pet_config.lora_dropout must be in [0, 1)"),
        ({"model.model_config.pet_config.lora_dropout": -0.1}, "pet_config.lora_dropout must be in [0, 1)"),
        ({"model.model_config.pet_config.target_modules": ".*q_proj"}, "'.*q_proj' matches no Linear layer"),
        ({"model.model_config.pet_config.target_modules": ["nothing"]}, "matches no Linear layer"),
        ({"model.model_config.pet_config.target_modules": "(("}, "is not a regex"),
        ({"model.model_config.pet_config.target_modules": [1]}, "must be a regex or a list of them"),
        ({"runner_config.batch_size": 0}, "'runner_config.batch_size' must be >= 1"),
        ({"runner_config.epochs": 0}, "'runner_config.epochs' must be >= 1"),
        ({"runner_config.gradient_accumulation_steps": 0}, "gradient_accumulation_steps' must be >= 1"),
        ({"runner_config.sink_size": 0}, "'runner_config.sink_size' must be >= 1"),
        ({"optimizer.weight_decay": -0.1}, "'optimizer.weight_decay' must be a finite number >= 0"),
        ({"optimizer.beta1": 1.0}, "'optimizer.beta1' must be a finite number in [0, 1)"),
        ({"optimizer.eps": 0}, "'optimizer.eps' must be a finite number > 0"),
        ({"runner_wrapper.max_grad_norm": 0}, "'runner_wrapper.max_grad_norm' must be a finite number > 0"),
        ({"runner_wrapper.max_grad_norm": math.nan}, "'runner_wrapper.max_grad_norm'"),
        ({"eval_step_interval": 0}, "'eval_step_interval' must be >= 1"),
        ({"callbacks.1.save_checkpoint_steps": 0}, "save_checkpoint_steps' must be >= 1"),
        ({"model.model_config.num_layers": 0}, "model_config.num_layers must be a positive integer"),
        ({"model.model_config.rms_norm_eps": math.nan}, "rms_norm_eps and theta must be positive"),
        ({"model.model_config.rms_norm_eps": "abc"}, "not supported between"),  # a type no check expected
    ],
)
def test_numbers_that_break_a_run_are_refused(
    params: dict[str, Any], root: Path, overrides: dict[str, Any], message: str
) -> None:
    refused({**params, "overrides": overrides}, root, "overrides", message)


@pytest.mark.parametrize("targets", [".*w1", [".*wq", ".*w2"], "model.layers.0.attention.wv"])
def test_target_modules_that_match_a_linear_are_accepted(
    params: dict[str, Any], root: Path, targets: Any
) -> None:
    overrides = {"model.model_config.pet_config.target_modules": targets}
    assert validate_run({**params, "overrides": overrides}, root).world_size == 2


def test_validate_and_apply_lora_pick_targets_with_one_function() -> None:
    from llama_core.model.config import LlamaConfig
    from llama_core.model.lora_config import LoraConfig

    model = LlamaConfig(num_layers=1, hidden_size=64, num_heads=4, vocab_size=128, seq_length=32)
    assert LoraConfig(target_modules=[".*wq", ".*w2"]).targets(model.linear_shapes()) == [
        "model.layers.0.attention.wq",
        "model.layers.0.feed_forward.w2",
    ]
    with pytest.raises(ConfigError, match="matches no Linear layer"):
        LoraConfig(target_modules=".*q_proj").targets(model.linear_shapes())


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"layout": "sideways"}, "layout"),
        ({"chat_template": "{{ evil }}"}, "chat_template"),
        ({"holdout_fraction": 0.9}, "holdout_fraction"),
        ({"holdout_fraction": math.nan}, "holdout_fraction"),
        ({"holdout_fraction": "0.1"}, "holdout_fraction"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": "one prompt"}, "prompts"),
        ({"prompts": ["ok", ""]}, "prompts"),
    ],
)
def test_data_and_evaluation_params_are_held_to_the_forms_schema(
    params: dict[str, Any], root: Path, change: dict[str, Any], param: str
) -> None:
    refused({**params, **change}, root, param)


def test_the_forms_values_pass(params: dict[str, Any], root: Path) -> None:
    form = {"layout": "packed", "chat_template": None, "holdout_fraction": 0.1, "max_new_tokens": 8,
            "prompts": ["Explain LoRA."]}  # fmt: skip
    assert validate_run({**params, **form}, root).world_size == 2


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("change", "param", "detail"),
    [
        ({"overrides": {"callbacks.1.prefix": "../../../../x"}}, "overrides", "'callbacks.1.prefix'"),
        ({"overrides": {"lr_schedule.learning_rate": -1}}, "overrides", "'lr_schedule.learning_rate'"),
        ({"overrides": {"model.model_config.pet_config.lora_rank": 0}}, "overrides", "pet_config.lora_rank"),
        ({"alpaca_url": "/dev/zero"}, "alpaca_url", "outside the allowed roots"),
        ({"weights_url": "{tmp}/secret.json"}, "weights_url", "outside the allowed roots"),
    ],
)
def test_the_cli_refuses_hostile_params(
    params: dict[str, Any], root: Path, tmp_path: Path, change: dict[str, Any], param: str, detail: str
) -> None:
    change = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in change.items()}
    t0 = time.monotonic()
    done = cli({**params, **change}, root, tmp_path, LLAMA_LORA_SOURCE_ROOTS=str(root))
    assert done.returncode == 2, done.stderr
    assert f"error: param '{param}': " in done.stderr and detail in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - t0 < 30
    assert "AKIA" not in done.stdout + done.stderr


def test_the_cli_takes_the_source_roots_from_the_environment(
    params: dict[str, Any], root: Path, tmp_path: Path
) -> None:
    beside = {**params, "alpaca_url": str(tmp_path / "secret.json")}
    assert cli(beside, root, tmp_path).returncode == 2
    done = cli(beside, root, tmp_path, LLAMA_LORA_SOURCE_ROOTS=f"{root}:{tmp_path}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source_roots"] == [str(root), str(tmp_path)]


# ---------------------------------------------------------------- remote hosts


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("http://169.254.169.254/latest/meta-data/iam", "data.example.com"),  # a cloud metadata address
        ("https://data.example.com:8443/a.json", "data.example.com:443"),  # another port
        ("https://data.example.com.evil.net/a.json", "data.example.com,*.example.com"),
        ("https://data.example.com@evil.net/a.json", "data.example.com"),  # userinfo, not the host
        ("https://evil.net\\@data.example.com/a.json", "data.example.com"),  # urllib3 would ask evil.net
        ("http://[::1]:8080/a.json", "[::1]:9090"),
    ],
)
def test_an_http_source_must_name_an_allowed_host(
    params: dict[str, Any], root: Path, monkeypatch: pytest.MonkeyPatch, url: str, hosts: str
) -> None:
    monkeypatch.setenv("LLAMA_LORA_SOURCE_HOSTS", hosts)
    text = refused({**params, "weights_url": f"{url}?token=SECRET-1"}, root, "weights_url")
    assert "LLAMA_LORA_SOURCE_HOSTS" in text or "not a plain host" in text, text
    assert "SECRET-1" not in text and "/latest" not in text  # the host is named, not the rest of the URL


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("https://data.example.com/a.json", "data.example.com"),
        ("https://data.example.com:8443/a.json", "data.example.com:8443"),
        ("http://a.b.example.com/a.json", "other.org, *.example.com"),
        ("http://[::1]:8080/a.json", "[::1]:8080"),
        ("http://anything.else/a.json", ""),  # unset: any host
    ],
)
def test_a_listed_host_passes_and_the_list_reaches_the_fetch_tasks(
    params: dict[str, Any], root: Path, monkeypatch: pytest.MonkeyPatch, url: str, hosts: str
) -> None:
    monkeypatch.setenv("LLAMA_LORA_SOURCE_HOSTS", hosts)
    run = validate_run({**params, "alpaca_url": url}, root)
    assert run.source_hosts == tuple(h.strip() for h in hosts.split(",") if h.strip())


def test_a_malformed_host_list_is_named(
    params: dict[str, Any], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_LORA_SOURCE_HOSTS", "data.example.com:http")
    with pytest.raises(
        ConfigError, match=r"LLAMA_LORA_SOURCE_HOSTS: 'data\.example\.com:http' is not a host"
    ):
        validate_run(params, root)


def test_a_redirect_to_another_host_is_refused_before_it_is_followed(tmp_path: Path) -> None:
    from tests.fetch_server import FetchServer

    with FetchServer() as allowed, FetchServer() as internal:
        secret = internal.add("/admin/keys", SECRET.encode())
        url = allowed.add("/a.json", b"", redirect=secret)
        host = allowed.base.removeprefix("http://")
        with pytest.raises(ConfigError, match="redirects to another host") as info:
            fetch(url, tmp_path / "d", allowed_hosts=[host])
        assert "AKIA" not in str(info.value)
        assert not internal.log, internal.log  # the internal host was never asked
        kept = [
            p.name for p in (tmp_path / "d").rglob("*") if p.is_file() and not p.name.endswith(".fetch.lock")
        ]
        assert not kept, kept
        # without a host list the same redirect is followed (a library call; validate sets the list)
        assert fetch(url, tmp_path / "any").path.read_bytes() == SECRET.encode()
        with pytest.raises(ConfigError, match=r"host 127\.0\.0\.1:\d+ is not among"):
            fetch(internal.base + "/admin/keys", tmp_path / "d", allowed_hosts=[host])


# ---------------------------------------------------------------- the fetch checks again


def test_a_symlink_swapped_after_validate_does_not_escape_the_fetch(
    params: dict[str, Any], root: Path
) -> None:
    link = root / "inputs" / "data.json"
    link.symlink_to(root / "inputs" / "alpaca.json")
    run = validate_run({**params, "alpaca_url": str(link)}, root)
    link.unlink()
    link.symlink_to(root.parent / "secret.json")  # swapped between validate and the fetch
    dest = root / "work" / "downloads" / "alpaca"
    with pytest.raises(ConfigError, match="outside the allowed roots") as info:
        fetch(str(link), dest, local_roots=run.source_roots)
    assert "AKIA" not in str(info.value)
    assert not any("AKIA" in p.read_text() for p in dest.rglob("*") if p.is_file())


def test_the_fetch_checks_each_file_it_opens(root: Path) -> None:
    """A listing made while the file was inside, the file swapped before it is opened."""
    from llama_core.fetch.remote import LocalReader
    from llama_core.fetch.source import Credentials, FetchRequest, RetryPolicy, Timeouts, parse_source

    folder = root / "inputs" / "hf"
    (folder / "weights.bin").symlink_to(folder / "config.json")
    req = FetchRequest(
        parse_source(str(folder)), Credentials(), None, RetryPolicy(), Timeouts(), 5.0, (str(root),)
    )
    reader = LocalReader(req)
    listed = {f.rel: f for f in reader.listing()}
    (folder / "weights.bin").unlink()
    (folder / "weights.bin").symlink_to(root.parent / "secret.json")
    with pytest.raises(ConfigError, match="outside the allowed roots"):
        reader.open(listed["weights.bin"], 0)
    assert b"".join(reader.open(listed["config.json"], 0).chunks) == b"{}"


def test_the_fetch_refuses_a_folder_with_a_link_out(root: Path) -> None:
    (root / "inputs" / "hf" / "leak.json").symlink_to(root.parent / "secret.json")
    with pytest.raises(ConfigError, match="outside the allowed roots"):
        fetch(str(root / "inputs" / "hf"), root / "work" / "downloads" / "weights", local_roots=[str(root)])
    fetch(str(root / "inputs" / "hf"), root / "work" / "unconfined")  # a library call without roots: any


def test_open_confined_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="not a regular file"):
        open_confined(str(tmp_path / "fifo"), [str(tmp_path)])
    assert time.monotonic() - t0 < 0.5
    (tmp_path / "ok.json").write_text("[]")
    with open_confined(str(tmp_path / "ok.json"), [str(tmp_path)]) as f:
        assert f.read() == b"[]"
    with pytest.raises(ConfigError, match="outside the allowed roots"):
        open_confined(str(tmp_path / "ok.json"), [str(tmp_path / "other")])


def test_the_fetch_operator_confines_local_sources(root: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from operators.stages import FetchOperator

    secret = root.parent / "secret.json"
    op = FetchOperator(task_id="fetch", source=str(secret), dest=str(root / "d"), source_roots=[str(root)])
    with pytest.raises(AirflowFailException, match="outside the allowed roots"):
        op.execute({})
    inside = FetchOperator(
        task_id="fetch",
        source=str(root / "inputs" / "alpaca.json"),
        dest=str(root / "d"),
        source_roots=str(root),
    )
    assert Path(inside.execute({})["path"]).read_text() == "[]"


def test_the_dag_hands_validates_roots_to_the_fetch_tasks() -> None:
    from operators.pipeline import build_dag
    from operators.pipeline_file import PIPELINES, load_pipeline

    pipeline = load_pipeline(PIPELINES / "llama2_tiny_lora_demo.yaml")
    dag = build_dag(pipeline)
    assert dag.get_task("validate").trusted_config == pipeline.config_path

    class ValidateOutput:
        def xcom_pull(self, task_ids: str) -> list[dict[str, Any]]:
            assert task_ids == "validate"
            return [
                {"source_roots": ["/data", "/mnt/shared"], "source_hosts": ["hub.internal"], "node_rank": 0}
            ]

    for name in ("alpaca", "tokenizer", "weights"):
        task = dag.get_task(f"fetch_{name}")
        assert task.render_template(task.source_roots, {"ti": ValidateOutput()}) == ["/data", "/mnt/shared"]
        assert task.render_template(task.source_hosts, {"ti": ValidateOutput()}) == ["hub.internal"]


def test_a_bad_number_in_the_config_file_itself_is_blamed_on_the_config(
    params: dict[str, Any], root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overrides that change something else do not take the blame for the file's own value."""
    import yaml

    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["model"]["model_config"]["pet_config"]["lora_rank"] = 0
    config = tmp_path / "configs" / "bad_rank.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("LLAMA_LORA_CONFIG_ROOTS", str(config.parent))
    change = {"config": str(config), "overrides": {"runner_config.epochs": 1}}
    refused({**params, **change}, root, "config", "pet_config.lora_rank must be a positive integer")
