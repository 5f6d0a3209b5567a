"""LoRA hyper-parameters for the checkpoint tools: explicit values, else the run config's pet_config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from llama_core.config import load_config
from llama_core.errors import ConfigError


def pet_config(config: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`model.model_config.pet_config` of a run config (path or dict); {} without a config."""
    if config is None:
        return {}
    cfg = config if isinstance(config, Mapping) else load_config(config)
    return dict(((cfg.get("model") or {}).get("model_config") or {}).get("pet_config") or {})


def lora_alpha(explicit: float | None, config: str | os.PathLike[str] | Mapping[str, Any] | None) -> float:
    """The LoRA alpha: `explicit`, else pet_config.lora_alpha; ConfigError when neither is given."""
    if explicit is not None:
        return float(explicit)
    value = pet_config(config).get("lora_alpha")
    if value is None:
        raise ConfigError("LoRA alpha unknown: pass --lora_alpha or a --config with pet_config.lora_alpha")
    return float(value)
