"""Tiny random Hugging Face models for tests (Llama, Qwen2, Qwen3): 2 layers, 4 query heads."""

from __future__ import annotations

from typing import Any

import torch
import transformers


def tiny_hf_llama(
    *,
    kv_heads: int = 4,
    hidden: int = 32,
    ffn: int = 64,
    vocab: int = 64,
    max_positions: int = 64,
    rms_norm_eps: float = 1e-5,
    seed: int = 0,
    spread: bool = False,
    **config: Any,
) -> transformers.LlamaForCausalLM:
    """The model in eval mode, its weights drawn after `torch.manual_seed(seed)`.

    `spread`: weights ~ N(0, 0.15) and norm weights ~ U(0.5, 1.5) instead of HF's small init, so
    that a wrong wiring shows in the logits. `config`: further `LlamaConfig` fields.
    """
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=False,
        **config,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if spread:
        spread_weights(model)
    return model


def spread_weights(model: torch.nn.Module) -> None:
    """Weights ~ N(0, 0.15), norm weights ~ U(0.5, 1.5): a wrong wiring shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)


HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_hf_family(model_type: str, *, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny model of an HF family in eval mode with spread weights (see `tiny_hf_llama`), eager
    attention; `config` sets or overrides that family's config fields."""
    config_class, model_class = HF_CLASSES[model_type]
    values: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
    }
    values.update(config)
    torch.manual_seed(seed)
    model = model_class(config_class(**values)).eval()
    spread_weights(model)
    return model


def llama3_rope(original_max_positions: int) -> dict[str, Any]:
    """Llama 3.1's RoPE parameters (theta 5e5, scaling factor 8) for a tiny model whose positions go
    past `original_max_positions`, so the scaled frequency band matters."""
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_positions,
    }
