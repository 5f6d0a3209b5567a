"""Check a whole fine-tune request before any work starts, in well under a second.

The pipeline's parameters (sources, work folder, config and overrides, sizes, launcher settings) are
checked together, so a mistake fails the run at once, naming the parameter, instead of after hours
of downloads and preprocessing. Whoever may trigger a run sets its params, so where they may point
(source and config roots, plain names for overrides that become paths) is held by `llama_core.confine`.
Nothing here imports MindSpore or torch, and nothing is written.

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
from llama_core.config import Layout, TrainConfig, apply_overrides, load_config
from llama_core.confine import (
    CONFIG_ROOTS_ENV,
    SOURCE_ROOTS_ENV,
    check_host,
    check_path_overrides,
    config_roots,
    confined,
    source_hosts,
    source_roots,
)
from llama_core.data.chat import CHAT_TEMPLATES
from llama_core.data.prompts import split_prompts
from llama_core.errors import ConfigError, InputError
from llama_core.fetch.source import parse_source
from llama_core.model.config import LlamaConfig
from llama_core.model.lora_config import LoraConfig
from llama_core.plan import check_fits
from llama_core.results import print_result
from llama_core.space import check_free_space

SOURCES = ("alpaca", "tokenizer", "weights")
DEVICE_TARGETS = ("Ascend", "CPU")
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
SEQ_LENGTH_RANGE = (8, 131072)
PORT_RANGE = (1024, 65535)
NODES_RANGE = (1, 256)
NODE_START_TIMEOUT_RANGE = (10, 86400)
MAX_NEW_TOKENS_RANGE = (1, 4096)
HOLDOUT_FRACTION_MAX = 0.5
LAYOUTS = ("buckets", "packed", "padded")
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
    source_roots: tuple[str, ...] = ()  # where the fetch tasks may read a local source
    source_hosts: tuple[str, ...] = ()  # the hosts an http(s) source may name; empty: any


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
    if not os.path.isabs(work_dir) or "\0" in work_dir:
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


def check_source(
    params: Mapping[str, Any], name: str, roots: Sequence[str], hosts: Sequence[str] = ()
) -> None:
    """`<name>_url` parses as a fetchable source (a local path must be absolute and resolve to a file
    or folder inside `roots`; an http(s) URL must name one of `hosts`, when given) and `<name>_sha256`,
    when given, is 64 hex digits."""
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
        try:
            confined(source.path, roots, SOURCE_ROOTS_ENV)
        except ConfigError as exc:
            raise _param_error(f"{name}_url", str(exc)) from exc
    if source.scheme == "http":
        try:
            check_host(source.url, hosts)
        except ConfigError as exc:
            raise _param_error(f"{name}_url", str(exc)) from exc
    digest = params.get(f"{name}_sha256")
    if digest not in (None, "") and not (isinstance(digest, str) and SHA256.match(digest)):
        raise _param_error(f"{name}_sha256", f"must be 64 hexadecimal digits or empty, got {digest!r}")


def check_options(params: Mapping[str, Any]) -> None:
    """The data and evaluation params, when given, as the trigger form's schema has them (a run from
    the command line or the API gets the same checks)."""
    if "layout" in params and params["layout"] not in LAYOUTS:
        raise _param_error("layout", f"must be one of {', '.join(LAYOUTS)}, got {params['layout']!r}")
    if params.get("chat_template") not in (None, "", *CHAT_TEMPLATES):
        raise _param_error(
            "chat_template",
            f"must be empty or one of {', '.join(CHAT_TEMPLATES)}, got {params['chat_template']!r}",
        )
    fraction = params.get("holdout_fraction", 0.0)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 <= fraction <= HOLDOUT_FRACTION_MAX
    ):
        raise _param_error(
            "holdout_fraction", f"must be a number in [0, {HOLDOUT_FRACTION_MAX}], got {fraction!r}"
        )
    if params.get("max_new_tokens") is not None:
        _int_in(params, "max_new_tokens", MAX_NEW_TOKENS_RANGE)
    prompts = params.get("prompts") or []
    try:
        if not isinstance(prompts, list):
            raise InputError(f"got {prompts!r}")
        split_prompts(prompts)
    except InputError as exc:
        raise _param_error(
            "prompts", f"must be a list of non-empty instructions or {{prompt, expect}} objects: {exc}"
        ) from None


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


def _checked_run_config(
    cfg: dict[str, Any], seq_length: int, param: str, context: str
) -> tuple[dict[str, Any], Layout]:
    """`cfg` as the ranks will see it (the finetune task sets the model's seq_length to the records'),
    its training, model, layout and LoRA settings checked; a problem is blamed on `param`."""
    try:
        cfg = apply_overrides(cfg, [("model.model_config.seq_length", seq_length)])
        train = TrainConfig.from_dict(cfg)
        model = LlamaConfig.from_run_config(cfg)
        model.validate()
        check_layout(train.layout, model.dims)  # heads, kv heads, FFN and vocabulary over model_parallel
        if train.pet_config:  # the Linears LoRA wraps, picked as apply_lora picks them
            LoraConfig.from_pet_config(train.pet_config).targets(model.linear_shapes())
    except (ConfigError, TypeError) as exc:  # TypeError: a value of a type a check cannot compare
        raise _param_error(param, f"{context}{exc}") from exc
    return cfg, train.layout


def check_config(
    config: Any,
    overrides: Mapping[str, Any],
    seq_length: int,
    device_target: str,
    nodes: int = 1,
    roots: Sequence[str] | None = None,
) -> tuple[dict[str, Any], int]:
    """The run config with overrides applied, and its world size (split evenly over `nodes`); the config
    must resolve inside `roots` (default: `config_roots()`), every key, size and LoRA setting is
    checked, and on Ascend the memory plan held to `context.max_device_memory` (CPU ranks are
    processes: MindSpore applies no such limit there)."""
    if not isinstance(config, str) or not os.path.isabs(config):
        raise _param_error("config", f"must be an absolute path to a training YAML, got {config!r}")
    try:  # confined before it is read: nothing of a file outside the roots reaches a message
        base = load_config(
            confined(config, config_roots() if roots is None else roots, CONFIG_ROOTS_ENV, False)
        )
    except ConfigError as exc:
        raise _param_error("config", str(exc)) from exc
    try:
        check_path_overrides(overrides)
        with_overrides = apply_overrides(base, overrides.items())
    except ConfigError as exc:
        raise _param_error("overrides", str(exc)) from exc
    max_positions = (with_overrides.get("model") or {}).get("model_config", {}).get("max_position_embedding")
    if isinstance(max_positions, int) and seq_length > max_positions:
        raise _param_error(
            "seq_length", f"{seq_length} exceeds model.model_config.max_position_embedding {max_positions}"
        )
    try:
        cfg, layout = _checked_run_config(
            with_overrides,
            seq_length,
            "overrides" if overrides else "config",
            f"{config} with the overrides: ",
        )
    except ConfigError:
        if overrides:  # the file alone, so a bad value the trigger's overrides brought in is blamed on them
            _checked_run_config(base, seq_length, "config", f"{config}: ")
        raise
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
        sized_by = "overrides" if any(str(k).startswith("parallel_config.") for k in overrides) else "config"
        raise _param_error(
            sized_by,
            f"parallel_config asks for {layout.world_size} ranks, {layout.world_size // nodes} per node on "
            f"{nodes} node(s); one {device_target} node runs 1..{MAX_RANKS[device_target]}",
        )
    if device_target == "Ascend":
        try:
            check_fits(cfg, device_target)
        except ConfigError as exc:
            raise _param_error("config", str(exc)) from exc
    return cfg, layout.world_size


def validate_run(
    params: Mapping[str, Any],
    work_root: str | os.PathLike[str],
    *,
    config_root_dirs: Sequence[str] | None = None,
) -> ValidatedRun:
    """Check the pipeline's parameters together; the first problem raises ConfigError naming it.

    Local sources must resolve inside `source_roots(work_root)`, the config inside `config_root_dirs`
    (default: `config_roots()`)."""
    sources, hosts = source_roots(work_root), source_hosts()
    for name in SOURCES:
        check_source(params, name, sources, hosts)
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
    check_options(params)
    cfg, world_size = check_config(
        params.get("config"), overrides, seq_length, device_target, nodes, config_root_dirs
    )
    check_free_space(work_dir, params, cfg)  # last: it sizes the run from the checked config
    return ValidatedRun(
        work_dir, params["config"], overrides, world_size, seq_length, device_target, port,
        nodes=nodes, ranks_per_node=world_size // nodes, node_ranks=tuple(range(nodes)), source_roots=sources,
        source_hosts=hosts,
    )  # fmt: skip


def build_parser(prog: str = "python -m llama_core.validate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="JSON file of the pipeline's parameters")
    parser.add_argument(
        "--work_root",
        required=True,
        help=f"work_dir must resolve inside this folder; local sources too, unless {SOURCE_ROOTS_ENV} is set",
    )
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
