"""A tiny random Hugging Face Llama for tests: 2 layers, 4 query heads, untied lm_head."""

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
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(0.5, 1.5)
                else:
                    param.normal_(0.0, 0.15)
    return model
