"""MindFormers-style YAML run configs: loading, `--a.b.c value` overrides and a typed training view.

The YAML keeps MindFormers 1.3's structure and key names (`runner_config`, `optimizer`, `lr_schedule`,
`train_dataset.data_loader`, `parallel`, `parallel_config`, `model.model_config`, `callbacks`,
`context`, `runner_wrapper`, ...), so a reference config carries over. `TrainConfig.from_dict` reads
the keys the trainer uses into one typed object; a wrong type or value fails with the key's path.
`layout_from_config` reads `parallel_config` (the ranks' layout) for the trainer, the launcher and
the checkpoint tools alike; `model.model_config` is the model's (`llama_core.model.config`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import yaml

from llama_core.errors import ConfigError

OPTIMIZER_TYPES = ("AdamW", "AdamWeightDecay", "FP32StateAdamWeightDecay")
LR_SCHEDULE_TYPES = ("CosineWithWarmUpLR", "constant")

# libyaml's loader where PyYAML was built with it: every DAG parse reads each pipeline's config, and
# the pure-Python loader took most of a parse's second.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(text: str) -> Any:
    """`yaml.safe_load(text)`, through libyaml when PyYAML has it (the same documents, faster)."""
    return yaml.load(text, Loader=_YAML_LOADER)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML run config into a nested dict."""
    path = Path(path)
    try:
        data = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:  # the reason only: a decode error quotes the bytes
        raise ConfigError(f"{path}: cannot be read as a text file ({type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_scalar(text: str) -> Any:
    """Parse an override value as a YAML scalar ('1e-4' -> 1e-4, 'True' -> True, '[a, b]' -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse override value {text!r}: {exc}") from exc
    if isinstance(value, str):
        # YAML 1.1 reads '1e-4' (no dot) as a string; a number is meant.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_override_args(args: Iterable[str]) -> list[tuple[str, Any]]:
    """Turn leftover CLI words `--a.b.c value` / `--a.b.c=value` into (key path, parsed value) pairs."""
    words = list(args)
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise ConfigError(f"unexpected argument {word!r} (overrides look like --a.b.c value)")
        key = word[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words):
                raise ConfigError(f"override --{key} needs a value")
            value = words[i + 1]
            i += 2
        pairs.append((key, parse_scalar(value)))
    return pairs


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of `cfg` with each dotted key path set; an unknown path raises ConfigError.

    List items are addressed by index (`callbacks.1.save_checkpoint_steps`).
    """
    out = copy.deepcopy(dict(cfg))
    for path, value in overrides:
        node: Any = out
        parts = path.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, dict):
                if part not in node:
                    raise ConfigError(f"unknown config key {where!r} (from override --{path})")
                if last:
                    node[part] = value
                else:
                    node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                raise ConfigError(f"unknown config key {where!r} (from override --{path})")
    return out


def set_key(cfg: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted key path, creating missing mappings (used for CLI flags the config may lack)."""
    node = cfg
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _get(cfg: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """The value at a dotted key path (`callbacks[T].key`: the key of the callback of type T)."""
    node: Any = cfg
    for part in path.split("."):
        if part.startswith("callbacks["):
            node = _callback(node, part[len("callbacks[") : -1])
            continue
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _callback(cfg: Mapping[str, Any], type_name: str) -> dict[str, Any]:
    for cb in _get(cfg, "callbacks", []) or []:
        if isinstance(cb, Mapping) and cb.get("type") == type_name:
            return dict(cb)
    return {}


def _typed(value: Any, path: str, kind: type) -> Any:
    """`value` as `kind`; an int where a float is expected and 'true'/'false' for a bool are accepted."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {path!r} must be {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class Layout:
    """data_parallel x model_parallel x pipeline_stage.

    Ranks follow MindSpore's device matrix: `rank = stage * (dp * mp) + dp_index * mp + mp_index`
    (model parallel innermost, so a tensor parallel group sits on adjacent devices).
    """

    dp: int = 1
    mp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.mp * self.pp

    def rank(self, stage: int, d: int, m: int) -> int:
        return stage * self.dp * self.mp + d * self.mp + m

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (stage, dp index, mp index)."""
        stage, rest = divmod(rank, self.dp * self.mp)
        d, m = divmod(rest, self.mp)
        return stage, d, m

    def as_dict(self) -> dict[str, int]:
        return {"data_parallel": self.dp, "model_parallel": self.mp, "pipeline_stage": self.pp}


def layout_from_config(cfg: Mapping[str, Any]) -> Layout:
    """The layout of a run config's `parallel_config` (absent keys: 1); the one reader of that section."""
    pc = cfg.get("parallel_config") or {}
    values = {}
    for key in ("data_parallel", "model_parallel", "pipeline_stage"):
        value = pc.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"config key 'parallel_config.{key}' must be a positive integer, got {value!r}")
        values[key] = value
    return Layout(values["data_parallel"], values["model_parallel"], values["pipeline_stage"])


def _key(path: str, default: Any) -> Any:
    """A TrainConfig field read from the run config's key `path`, `default` when absent or null.

    (Fields with a mutable default spell out `field(default_factory=..., metadata={"key": path})`.)
    """
    return field(default=default, metadata={"key": path})


@dataclass
class TrainConfig:
    """The training-relevant part of a run config, typed; each field names its MindFormers key path.

    `from_dict` reads every field from its key by the field's type: int, float and bool values are
    checked (naming the key), str and list values converted; `parallel_config` is read by
    `layout_from_config`.
    """

    # the model's own keys (pet_config included), read by LlamaConfig.from_dict and LoraConfig
    model_config: dict[str, Any] = field(default_factory=dict, metadata={"key": "model.model_config"})
    seed: int = _key("seed", 0)
    output_dir: str = _key("output_dir", "./output")
    run_mode: str = _key("run_mode", "finetune")
    load_checkpoint: str = _key("load_checkpoint", "")
    resume_training: bool = _key("resume_training", False)
    use_parallel: bool = _key("use_parallel", False)
    do_eval: bool = _key("do_eval", False)
    eval_step_interval: int = _key("eval_step_interval", 100)  # with do_eval; and at the end
    epochs: int = _key("runner_config.epochs", 1)
    batch_size: int = _key("runner_config.batch_size", 1)  # per device
    sink_mode: bool = _key("runner_config.sink_mode", False)
    sink_size: int = _key("runner_config.sink_size", 1)
    gradient_accumulation_steps: int = _key("runner_config.gradient_accumulation_steps", 1)
    # not MindFormers keys: trim each global batch's trailing padding to the smallest bucket that
    # holds its longest record (results unchanged); [] = powers of two from 128 up, plus seq_length
    length_buckets: bool = _key("runner_config.length_buckets", True)
    length_bucket_sizes: list[int] = field(
        default_factory=list, metadata={"key": "runner_config.length_bucket_sizes"}
    )
    optimizer_type: str = _key("optimizer.type", "FP32StateAdamWeightDecay")
    beta1: float = _key("optimizer.beta1", 0.9)
    beta2: float = _key("optimizer.beta2", 0.999)
    eps: float = _key("optimizer.eps", 1e-8)
    weight_decay: float = _key("optimizer.weight_decay", 0.0)
    lr_schedule_type: str = _key("lr_schedule.type", "CosineWithWarmUpLR")
    learning_rate: float = _key("lr_schedule.learning_rate", 1e-5)
    warmup_ratio: float = _key("lr_schedule.warmup_ratio", 0.0)
    lr_end: float = _key("lr_schedule.lr_end", 0.0)
    total_steps: int = _key("lr_schedule.total_steps", -1)  # -1: from the dataset size
    train_dataset_dir: str = _key("train_dataset.data_loader.dataset_dir", "")
    train_shuffle: bool = _key("train_dataset.data_loader.shuffle", True)
    train_drop_remainder: bool = _key("train_dataset.drop_remainder", True)
    input_columns: list[str] = field(
        default_factory=lambda: ["input_ids", "labels"], metadata={"key": "train_dataset.input_columns"}
    )
    eval_dataset_dir: str = _key("eval_dataset.data_loader.dataset_dir", "")
    gradients_mean: bool = _key("parallel.gradients_mean", False)
    parallel_mode: int = _key("parallel.parallel_mode", 0)
    layout: Layout = field(default_factory=Layout, metadata={"key": "parallel_config"})
    scale_sense: float = _key("runner_wrapper.scale_sense", 1.0)
    use_clip_grad: bool = _key("runner_wrapper.use_clip_grad", True)
    max_grad_norm: float = _key("runner_wrapper.max_grad_norm", 1.0)
    # activation recomputation: whole decoder layers, or only the attention probabilities and the
    # FFN's activation (MindFormers' per-stage lists need pipeline stages, which are not here)
    recompute: bool = _key("recompute_config.recompute", False)
    select_recompute: bool = _key("recompute_config.select_recompute", False)
    ckpt_prefix: str = _key("callbacks[CheckpointMonitor].prefix", "llama")
    save_checkpoint_steps: int = _key("callbacks[CheckpointMonitor].save_checkpoint_steps", 100)
    keep_checkpoint_max: int = _key("callbacks[CheckpointMonitor].keep_checkpoint_max", 5)
    # LoRA weights only
    save_trainable_params: bool = _key("callbacks[CheckpointMonitor].save_trainable_params", False)
    mode: int = _key("context.mode", 0)  # 0 graph, 1 PyNative
    device_target: str = _key("context.device_target", "CPU")
    device_id: int = _key("context.device_id", 0)
    max_device_memory: str = _key("context.max_device_memory", "")
    vocab_file: str = _key("processor.tokenizer.vocab_file", "")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> TrainConfig:
        """Read and check the keys the trainer uses; anything wrong names its key path."""
        types = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            path, kind = f.metadata["key"], get_origin(types[f.name]) or types[f.name]
            default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            if kind is Layout:
                values[f.name] = layout_from_config(cfg)
                continue
            value = _get(cfg, path, default)
            if kind is dict:
                if not isinstance(value, Mapping) or not value:
                    raise ConfigError(f"config key {path!r} is missing or not a mapping")
                values[f.name] = dict(value)
            elif kind in (str, list):
                values[f.name] = kind(value)
            else:
                values[f.name] = _typed(value, path, kind)
        tc = cls(**values)
        tc.validate()
        return tc

    def validate(self) -> None:
        """Reject values that cannot work, naming the key."""
        positive = {
            "runner_config.epochs": self.epochs,
            "runner_config.batch_size": self.batch_size,
            "runner_config.gradient_accumulation_steps": self.gradient_accumulation_steps,
            "callbacks[CheckpointMonitor].save_checkpoint_steps": self.save_checkpoint_steps,
            "callbacks[CheckpointMonitor].keep_checkpoint_max": self.keep_checkpoint_max,
            "runner_config.sink_size": self.sink_size,
            "eval_step_interval": self.eval_step_interval,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {value}")
        if self.total_steps != -1 and self.total_steps < 1:
            raise ConfigError(
                "config key 'lr_schedule.total_steps' must be -1 (from the data) or >= 1, "
                f"got {self.total_steps}"
            )
        self._check_numbers()
        if self.optimizer_type not in OPTIMIZER_TYPES:
            raise ConfigError(
                f"config key 'optimizer.type' must be one of {OPTIMIZER_TYPES}, got {self.optimizer_type!r}"
            )
        if self.lr_schedule_type not in LR_SCHEDULE_TYPES:
            raise ConfigError(
                f"config key 'lr_schedule.type' must be one of {LR_SCHEDULE_TYPES}, "
                f"got {self.lr_schedule_type!r}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(
                f"config key 'lr_schedule.warmup_ratio' must be in [0, 1), got {self.warmup_ratio}"
            )
        if self.mode not in (0, 1):
            raise ConfigError(f"config key 'context.mode' must be 0 (graph) or 1 (PyNative), got {self.mode}")
        if self.device_target not in ("CPU", "Ascend", "GPU"):
            raise ConfigError(
                f"config key 'context.device_target' must be CPU, Ascend or GPU, got {self.device_target!r}"
            )
        if self.pipeline_stage != 1:
            raise ConfigError(
                "pipeline parallelism is not implemented: parallel_config.pipeline_stage must be 1 "
                f"(got {self.pipeline_stage}); use parallel_config.model_parallel to split a model"
            )
        if self.model_parallel > 1 and not self.pet_config and self.model_config.get("qk_norm"):
            # q/k norm weights are shared by heads that ranks split: their gradients would be partial
            raise ConfigError(
                "parallel_config.model_parallel > 1 trains a q/k-norm model (Qwen3) with LoRA only: "
                "set model.model_config.pet_config"
            )
        for size in self.length_bucket_sizes:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(
                    "config key 'runner_config.length_bucket_sizes' must list positive integers, "
                    f"got {self.length_bucket_sizes}"
                )
        if list(self.input_columns) != ["input_ids", "labels"]:
            raise ConfigError(
                "config key 'train_dataset.input_columns' must be [input_ids, labels], "
                f"got {self.input_columns}"
            )

    def _check_numbers(self) -> None:
        """The optimizer's and schedule's numbers: finite and in the range a step can use (NaN fails
        every comparison, so it is refused too)."""
        lr = self.learning_rate
        ranges = [  # key, value, whether it is in range, the range
            ("lr_schedule.learning_rate", lr, lr > 0, "> 0"),
            ("lr_schedule.lr_end", self.lr_end, 0 <= self.lr_end <= lr, f"in [0, learning_rate {lr}]"),
            ("optimizer.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("optimizer.beta1", self.beta1, 0 <= self.beta1 < 1, "in [0, 1)"),
            ("optimizer.beta2", self.beta2, 0 <= self.beta2 < 1, "in [0, 1)"),
            ("optimizer.eps", self.eps, self.eps > 0, "> 0"),
            ("runner_wrapper.max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "> 0"),
            ("runner_wrapper.scale_sense", self.scale_sense, self.scale_sense > 0, "> 0"),
        ]
        for key, value, ok, want in ranges:
            if not (ok and math.isfinite(value)):
                raise ConfigError(f"config key {key!r} must be a finite number {want}, got {value}")

    @property
    def data_parallel(self) -> int:
        return self.layout.dp

    @property
    def model_parallel(self) -> int:
        return self.layout.mp

    @property
    def pipeline_stage(self) -> int:
        return self.layout.pp

    @property
    def pet_config(self) -> dict[str, Any]:
        """model.model_config.pet_config (empty when fine-tuning all weights)."""
        return dict(self.model_config.get("pet_config") or {})

    @property
    def seq_length(self) -> int:
        return int(self.model_config["seq_length"])
