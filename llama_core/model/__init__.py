"""Llama 2 family model and LoRA adapters in MindSpore, with MindFormers parameter names."""

from llama_core.model.llama import LlamaConfig, LlamaForCausalLM, LlamaModel
from llama_core.model.lora import (
    LoraConfig,
    apply_lora,
    is_lora_parameter,
    lora_num_parameters,
    normalize_lora_name,
)
from llama_core.model.weights import load_weights

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "LoraConfig",
    "apply_lora",
    "is_lora_parameter",
    "load_weights",
    "lora_num_parameters",
    "normalize_lora_name",
]
