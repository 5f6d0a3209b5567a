"""Llama 2 family model and LoRA adapters in MindSpore, with MindFormers parameter names.

The names below are imported on first use, so `llama_core.model.config` (no MindSpore) can be
imported by tools that never build the model without loading MindSpore.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule defining it
_EXPORTS = {
    "LlamaConfig": "config",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "LoraConfig": "lora_config",
    "apply_lora": "lora",
    "is_lora_parameter": "lora",
    "lora_num_parameters": "lora",
    "normalize_lora_name": "lora",
    "load_weights": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
