"""Check a whole fine-tune request before any work starts, in well under a second.

The pipeline's parameters (sources, work folder, config and overrides, sizes, launcher settings) are
checked together, so a mistake fails the run at once, naming the parameter, instead of after hours
of downloads and preprocessing. Nothing here imports MindSpore or torch, and nothing is written.

`python -m llama_core.validate --params run.json --work_root /data` checks a JSON file of parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_core.checkpoint.layout import check_layout
from llama_core.cli import exit_code
from llama_core.config import TrainConfig, apply_overrides, load_config
from llama_core.errors import ConfigError
from llama_core.fetch.source import parse_source
from llama_core.model.config import LlamaConfig
from llama_core.plan import check_fits
from llama_core.results import print_result

SOURCES = ("alpaca", "tokenizer", "weights")
DEVICE_TARGETS = ("Ascend", "CPU")
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
SEQ_LENGTH_RANGE = (8, 131072)
PORT_RANGE = (1024, 65535)
NODES_RANGE = (1, 256)
NODE_START_TIMEOUT_RANGE = (10, 86400)
# Ranks one launch starts on one node: an Ascend node has 8 NPUs; CPU ranks are processes.
MAX_RANKS = {"Ascend": 8, "CPU": 64}


@dataclass(frozen=True)
class ValidatedRun:
    """What the checks established: the resolved work folder and the launch size."""

    work_dir: str
    config: str
    overrides: dict[str, Any]
    world_size: int
    seq_length: int
    device_target: str
    master_port: int | None
    nodes: int = 1
    ranks_per_node: int = 0  # world_size // nodes
    node_ranks: tuple[int, ...] = (0,)  # what the fine-tune is mapped over: one task per node


def _param_error(name: str, problem: str) -> ConfigError:
    return ConfigError(f"param {name!r}: {problem}")


def _int_in(params: Mapping[str, Any], name: str, bounds: tuple[int, int], default: Any = None) -> int:
    """Param `name` (`default` when absent) as an integer within `bounds`."""
    value = params.get(name, default)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
        raise _param_error(name, f"must be an integer in {bounds[0]}..{bounds[1]}, got {value!r}")
    return value


def check_work_dir(work_dir: Any, work_root: str | os.PathLike[str]) -> str:
    """`work_dir` resolved (symlinks too); it must be absolute and inside `work_root`."""
    if not isinstance(work_dir, str) or not work_dir:
        raise _param_error("work_dir", f"must be an absolute path, got {work_dir!r}")
    if not os.path.isabs(work_dir):
        raise _param_error("work_dir", f"must be an absolute path, got {work_dir!r}")
    root = os.path.realpath(work_root)
    resolved = os.path.realpath(work_dir)
    if os.path.commonpath([root, resolved]) != root:
        raise _param_error(
            "work_dir",
            f"{work_dir!r} resolves to {resolved}, outside the allowed work root {root} "
            "(set LLAMA_LORA_WORK_ROOT on the workers to allow another root)",
        )
    return resolved


def check_source(params: Mapping[str, Any], name: str) -> None:
    """`<name>_url` parses as a fetchable source (a local path must be absolute and exist) and
    `<name>_sha256`, when given, is 64 hex digits."""
    url = params.get(f"{name}_url")
    if not isinstance(url, str) or not url.strip():
        raise _param_error(f"{name}_url", "is empty")
    try:
        source = parse_source(url)
    except ConfigError as exc:
        raise _param_error(f"{name}_url", str(exc)) from exc
    if source.scheme == "file":
        if not os.path.isabs(source.path):
            raise _param_error(f"{name}_url", f"a local path must be absolute, got {source.redacted!r}")
        if not os.path.exists(source.path):
            raise _param_error(f"{name}_url", f"{source.redacted} does not exist")
    digest = params.get(f"{name}_sha256")
    if digest not in (None, "") and not (isinstance(digest, str) and SHA256.match(digest)):
        raise _param_error(f"{name}_sha256", f"must be 64 hexadecimal digits or empty, got {digest!r}")


def overrides_dict(overrides: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The `overrides` param as a dict (a JSON string when rendered without native objects)."""
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides or "{}")
        except json.JSONDecodeError as exc:
            raise _param_error("overrides", f"is not a JSON object: {exc}") from exc
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise _param_error("overrides", f"must be an object of config key paths, got {overrides!r}")
    return dict(overrides)


def check_config(
    config: Any, overrides: Mapping[str, Any], seq_length: int, device_target: str, nodes: int = 1
) -> tuple[dict[str, Any], int]:
    """The run config with overrides applied, and its world size (split evenly over `nodes`); every
    key and size checked, and on Ascend the memory plan held to `context.max_device_memory` (CPU
    ranks are processes: MindSpore applies no such limit there)."""
    if not isinstance(config, str) or not os.path.isabs(config):
        raise _param_error("config", f"must be an absolute path to a training YAML, got {config!r}")
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _param_error("config", str(exc)) from exc
    try:
        cfg = apply_overrides(cfg, overrides.items())
    except ConfigError as exc:
        raise _param_error("overrides", str(exc)) from exc
    max_positions = (cfg.get("model") or {}).get("model_config", {}).get("max_position_embedding")
    if isinstance(max_positions, int) and seq_length > max_positions:
        raise _param_error(
            "seq_length", f"{seq_length} exceeds model.model_config.max_position_embedding {max_positions}"
        )
    try:  # as the ranks will see it: the finetune task sets the model's seq_length to the records'
        cfg = apply_overrides(cfg, [("model.model_config.seq_length", seq_length)])
        layout = TrainConfig.from_dict(cfg).layout
        model = LlamaConfig.from_run_config(cfg)
        model.validate()
        check_layout(layout, model.dims)  # heads, kv heads, FFN and vocabulary split over model_parallel
    except ConfigError as exc:
        raise _param_error("config", f"{config} with the overrides: {exc}") from exc
    if layout.world_size % nodes:
        raise _param_error(
            "nodes", f"{nodes} nodes cannot share the {layout.world_size} ranks of parallel_config evenly"
        )
    if (layout.world_size // nodes) % layout.mp:
        raise _param_error(
            "nodes",
            f"parallel_config.model_parallel = {layout.mp} must fit inside one node: {nodes} node(s) "
            f"of {layout.world_size // nodes} ranks cannot hold whole tensor-parallel groups",
        )
    if not 1 <= layout.world_size // nodes <= MAX_RANKS[device_target]:
        raise _param_error(
            "config",
            f"parallel_config asks for {layout.world_size} ranks, {layout.world_size // nodes} per node on "
            f"{nodes} node(s); one {device_target} node runs 1..{MAX_RANKS[device_target]}",
        )
    if device_target == "Ascend":
        try:
            check_fits(cfg, device_target)
        except ConfigError as exc:
            raise _param_error("config", str(exc)) from exc
    return cfg, layout.world_size


def validate_run(params: Mapping[str, Any], work_root: str | os.PathLike[str]) -> ValidatedRun:
    """Check the pipeline's parameters together; the first problem raises ConfigError naming it."""
    for name in SOURCES:
        check_source(params, name)
    work_dir = check_work_dir(params.get("work_dir"), work_root)
    device_target = params.get("device_target")
    if device_target not in DEVICE_TARGETS:
        raise _param_error(
            "device_target", f"must be one of {', '.join(DEVICE_TARGETS)}, got {device_target!r}"
        )
    seq_length = _int_in(params, "seq_length", SEQ_LENGTH_RANGE)
    port = None if params.get("master_port") in (None, "") else _int_in(params, "master_port", PORT_RANGE)
    overrides = overrides_dict(params.get("overrides"))
    nodes = _int_in(params, "nodes", NODES_RANGE, default=1)
    _int_in(params, "node_start_timeout", NODE_START_TIMEOUT_RANGE, default=600)
    _cfg, world_size = check_config(params.get("config"), overrides, seq_length, device_target, nodes)
    return ValidatedRun(
        work_dir, params["config"], overrides, world_size, seq_length, device_target, port,
        nodes=nodes, ranks_per_node=world_size // nodes, node_ranks=tuple(range(nodes)),
    )  # fmt: skip


def build_parser(prog: str = "python -m llama_core.validate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="JSON file of the pipeline's parameters")
    parser.add_argument("--work_root", required=True, help="work_dir must resolve inside this folder")
    return parser


def stage_from_args(args: argparse.Namespace) -> ValidatedRun:
    """The checked request of the parsed command line's params file."""
    try:
        params = json.loads(Path(args.params).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--params {args.params}: cannot read a JSON object: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"--params {args.params}: expected a JSON object of params")
    return validate_run(params, args.work_root)


def main(argv: Sequence[str] | None = None) -> int:
    print_result(stage_from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
