"""MindFormers-style YAML run configs: loading, `--a.b.c value` overrides and a typed training view.

The YAML keeps MindFormers 1.3's structure and key names (`runner_config`, `optimizer`, `lr_schedule`,
`train_dataset.data_loader`, `parallel`, `parallel_config`, `model.model_config`, `callbacks`,
`context`, `runner_wrapper`, ...), so a reference config carries over. `TrainConfig.from_dict` reads
the keys the trainer uses into one typed object; a wrong type or value fails with the key's path.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama_core.errors import ConfigError

OPTIMIZER_TYPES = ("AdamW", "AdamWeightDecay", "FP32StateAdamWeightDecay")
LR_SCHEDULE_TYPES = ("CosineWithWarmUpLR", "constant")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML run config into a nested dict."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
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
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _typed(cfg: Mapping[str, Any], path: str, kind: type, default: Any) -> Any:
    value = _get(cfg, path, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {path!r} must be {kind.__name__}, got {value!r}")
    return value


def _callback(cfg: Mapping[str, Any], type_name: str) -> dict[str, Any]:
    for cb in _get(cfg, "callbacks", []) or []:
        if isinstance(cb, Mapping) and cb.get("type") == type_name:
            return dict(cb)
    return {}


@dataclass
class TrainConfig:
    """The training-relevant part of a run config, typed (MindFormers key path in each comment)."""

    seed: int = 0  # seed
    output_dir: str = "./output"  # output_dir
    run_mode: str = "finetune"  # run_mode
    load_checkpoint: str = ""  # load_checkpoint
    resume_training: bool = False  # resume_training
    use_parallel: bool = False  # use_parallel
    do_eval: bool = False  # do_eval
    eval_step_interval: int = 100  # eval_step_interval (<= 0: only at the end)
    epochs: int = 1  # runner_config.epochs
    batch_size: int = 1  # runner_config.batch_size (per device)
    sink_mode: bool = False  # runner_config.sink_mode
    sink_size: int = 1  # runner_config.sink_size
    gradient_accumulation_steps: int = 1  # runner_config.gradient_accumulation_steps
    optimizer_type: str = "FP32StateAdamWeightDecay"  # optimizer.type
    beta1: float = 0.9  # optimizer.beta1
    beta2: float = 0.999  # optimizer.beta2
    eps: float = 1e-8  # optimizer.eps
    weight_decay: float = 0.0  # optimizer.weight_decay
    lr_schedule_type: str = "CosineWithWarmUpLR"  # lr_schedule.type
    learning_rate: float = 1e-5  # lr_schedule.learning_rate
    warmup_ratio: float = 0.0  # lr_schedule.warmup_ratio
    lr_end: float = 0.0  # lr_schedule.lr_end
    total_steps: int = -1  # lr_schedule.total_steps (-1: from the dataset size)
    train_dataset_dir: str = ""  # train_dataset.data_loader.dataset_dir
    train_shuffle: bool = True  # train_dataset.data_loader.shuffle
    train_drop_remainder: bool = True  # train_dataset.drop_remainder
    input_columns: list[str] = field(default_factory=lambda: ["input_ids", "labels"])
    eval_dataset_dir: str = ""  # eval_dataset.data_loader.dataset_dir
    gradients_mean: bool = False  # parallel.gradients_mean
    parallel_mode: int = 0  # parallel.parallel_mode
    data_parallel: int = 1  # parallel_config.data_parallel
    model_parallel: int = 1  # parallel_config.model_parallel
    pipeline_stage: int = 1  # parallel_config.pipeline_stage
    scale_sense: float = 1.0  # runner_wrapper.scale_sense
    use_clip_grad: bool = True  # runner_wrapper.use_clip_grad
    max_grad_norm: float = 1.0  # runner_wrapper.max_grad_norm
    ckpt_prefix: str = "llama"  # callbacks[CheckpointMonitor].prefix
    save_checkpoint_steps: int = 100  # callbacks[CheckpointMonitor].save_checkpoint_steps
    keep_checkpoint_max: int = 5  # callbacks[CheckpointMonitor].keep_checkpoint_max
    save_trainable_params: bool = False  # callbacks[CheckpointMonitor].save_trainable_params (LoRA-only)
    mode: int = 0  # context.mode (0 graph, 1 PyNative)
    device_target: str = "CPU"  # context.device_target
    device_id: int = 0  # context.device_id
    max_device_memory: str = ""  # context.max_device_memory
    vocab_file: str = ""  # processor.tokenizer.vocab_file
    model_config: dict[str, Any] = field(default_factory=dict)  # model.model_config (incl. pet_config)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> TrainConfig:
        """Read and check the keys the trainer uses; anything wrong names its key path."""
        ckpt = _callback(cfg, "CheckpointMonitor")
        model_config = _get(cfg, "model.model_config", {})
        if not isinstance(model_config, Mapping) or not model_config:
            raise ConfigError("config key 'model.model_config' is missing or not a mapping")
        tc = cls(
            seed=_typed(cfg, "seed", int, 0),
            output_dir=str(_get(cfg, "output_dir", "./output")),
            run_mode=str(_get(cfg, "run_mode", "finetune")),
            load_checkpoint=str(_get(cfg, "load_checkpoint", "")),
            resume_training=_typed(cfg, "resume_training", bool, False),
            use_parallel=_typed(cfg, "use_parallel", bool, False),
            do_eval=_typed(cfg, "do_eval", bool, False),
            eval_step_interval=_typed(cfg, "eval_step_interval", int, 100),
            epochs=_typed(cfg, "runner_config.epochs", int, 1),
            batch_size=_typed(cfg, "runner_config.batch_size", int, 1),
            sink_mode=_typed(cfg, "runner_config.sink_mode", bool, False),
            sink_size=_typed(cfg, "runner_config.sink_size", int, 1),
            gradient_accumulation_steps=_typed(cfg, "runner_config.gradient_accumulation_steps", int, 1),
            optimizer_type=str(_get(cfg, "optimizer.type", "FP32StateAdamWeightDecay")),
            beta1=_typed(cfg, "optimizer.beta1", float, 0.9),
            beta2=_typed(cfg, "optimizer.beta2", float, 0.999),
            eps=_typed(cfg, "optimizer.eps", float, 1e-8),
            weight_decay=_typed(cfg, "optimizer.weight_decay", float, 0.0),
            lr_schedule_type=str(_get(cfg, "lr_schedule.type", "CosineWithWarmUpLR")),
            learning_rate=_typed(cfg, "lr_schedule.learning_rate", float, 1e-5),
            warmup_ratio=_typed(cfg, "lr_schedule.warmup_ratio", float, 0.0),
            lr_end=_typed(cfg, "lr_schedule.lr_end", float, 0.0),
            total_steps=_typed(cfg, "lr_schedule.total_steps", int, -1),
            train_dataset_dir=str(_get(cfg, "train_dataset.data_loader.dataset_dir", "")),
            train_shuffle=_typed(cfg, "train_dataset.data_loader.shuffle", bool, True),
            train_drop_remainder=_typed(cfg, "train_dataset.drop_remainder", bool, True),
            input_columns=list(_get(cfg, "train_dataset.input_columns", ["input_ids", "labels"])),
            eval_dataset_dir=str(_get(cfg, "eval_dataset.data_loader.dataset_dir", "")),
            gradients_mean=_typed(cfg, "parallel.gradients_mean", bool, False),
            parallel_mode=_typed(cfg, "parallel.parallel_mode", int, 0),
            data_parallel=_typed(cfg, "parallel_config.data_parallel", int, 1),
            model_parallel=_typed(cfg, "parallel_config.model_parallel", int, 1),
            pipeline_stage=_typed(cfg, "parallel_config.pipeline_stage", int, 1),
            scale_sense=_typed(cfg, "runner_wrapper.scale_sense", float, 1.0),
            use_clip_grad=_typed(cfg, "runner_wrapper.use_clip_grad", bool, True),
            max_grad_norm=_typed(cfg, "runner_wrapper.max_grad_norm", float, 1.0),
            ckpt_prefix=str(ckpt.get("prefix", "llama")),
            save_checkpoint_steps=int(ckpt.get("save_checkpoint_steps", 100)),
            keep_checkpoint_max=int(ckpt.get("keep_checkpoint_max", 5)),
            save_trainable_params=bool(ckpt.get("save_trainable_params", False)),
            mode=_typed(cfg, "context.mode", int, 0),
            device_target=str(_get(cfg, "context.device_target", "CPU")),
            device_id=_typed(cfg, "context.device_id", int, 0),
            max_device_memory=str(_get(cfg, "context.max_device_memory", "")),
            vocab_file=str(_get(cfg, "processor.tokenizer.vocab_file", "")),
            model_config=dict(model_config),
        )
        tc.validate()
        return tc

    def validate(self) -> None:
        """Reject values that cannot work, naming the key."""
        positive = {
            "runner_config.epochs": self.epochs,
            "runner_config.batch_size": self.batch_size,
            "runner_config.gradient_accumulation_steps": self.gradient_accumulation_steps,
            "parallel_config.data_parallel": self.data_parallel,
            "callbacks[CheckpointMonitor].save_checkpoint_steps": self.save_checkpoint_steps,
            "callbacks[CheckpointMonitor].keep_checkpoint_max": self.keep_checkpoint_max,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {value}")
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
        if self.model_parallel != 1 or self.pipeline_stage != 1:
            raise ConfigError(
                "only data parallelism is implemented: parallel_config.model_parallel and "
                f"parallel_config.pipeline_stage must be 1 (got {self.model_parallel}, {self.pipeline_stage})"
            )
        if list(self.input_columns) != ["input_ids", "labels"]:
            raise ConfigError(
                "config key 'train_dataset.input_columns' must be [input_ids, labels], "
                f"got {self.input_columns}"
            )

    @property
    def pet_config(self) -> dict[str, Any]:
        """model.model_config.pet_config (empty when fine-tuning all weights)."""
        return dict(self.model_config.get("pet_config") or {})

    @property
    def seq_length(self) -> int:
        return int(self.model_config["seq_length"])
