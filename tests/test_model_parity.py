"""The MindSpore Llama (+ LoRA) equals HF transformers (+ PEFT) on a converted random tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_hf import tiny_hf_llama  # noqa: E402

from llama_core.checkpoint.convert import convert_hf_to_ms  # noqa: E402
from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora  # noqa: E402
from llama_core.model.weights import load_weights  # noqa: E402

# PyNative mode cannot run ops with the numpy 2 in this venv; graph mode is what the trainer uses anyway.
ms.set_context(mode=ms.GRAPH_MODE)

TOL = 1e-4
HF_PROJ = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


def tiny_hf_model(kv_heads: int) -> transformers.LlamaForCausalLM:
    """MHA (4 KV heads) or GQA (2); the GQA one also has non-default RoPE theta and RMS eps."""
    gqa = kv_heads < 4
    return tiny_hf_llama(
        kv_heads=kv_heads,
        seed=kv_heads,
        hidden=64,
        ffn=160,
        vocab=256,
        rms_norm_eps=1e-6 if gqa else 1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0 if gqa else 10000.0},
        attn_implementation="eager",
        spread=True,
    )


def ms_model_from_hf(hf: transformers.LlamaForCausalLM, folder: Path) -> LlamaForCausalLM:
    """Save with save_pretrained, convert with the project's converter, build and load our model."""
    hf.save_pretrained(folder / "hf")
    convert_hf_to_ms(folder / "hf", folder / "model.ckpt", dtype="fp32")
    model = LlamaForCausalLM(LlamaConfig.from_hf_config(hf.config.to_dict(), seq_length=32))
    loaded = load_weights(model, folder / "model.ckpt", allow_missing_lora=False)
    assert len(loaded) == len(list(model.get_parameters()))
    model.set_train(False)
    return model


def ms_logits(model: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    return model(ms.Tensor(ids, ms.int32)).asnumpy()


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_logits_match_hf(tmp_path: Path, kv_heads: int) -> None:
    hf = tiny_hf_model(kv_heads)
    model = ms_model_from_hf(hf, tmp_path)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 24))
    expected = hf_logits(hf, ids)
    got = ms_logits(model, ids)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero outputs
    assert np.abs(got - expected).max() <= TOL


def test_lora_logits_match_peft(tmp_path: Path) -> None:
    rank, alpha = 4, 8  # scaling 2, so a missing alpha/r shows
    hf = tiny_hf_model(2)
    model = ms_model_from_hf(hf, tmp_path)
    apply_lora(model, LoraConfig(rank=rank, alpha=alpha, dropout=0.05))
    model.set_train(False)  # eval: dropout off, as PEFT below with lora_dropout 0

    peft_cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(HF_PROJ.values()), bias="none"
    )
    peft_model = peft.get_peft_model(hf, peft_cfg).eval()
    params = dict(model.parameters_and_names())
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in range(hf.config.num_hidden_layers):
            attn = peft_model.base_model.model.model.layers[layer].self_attn
            for ms_name, hf_name in HF_PROJ.items():
                proj = getattr(attn, hf_name)
                proj.lora_B["default"].weight.normal_(0.0, 0.1)  # non-zero B: the adapter matters
                prefix = f"model.layers.{layer}.attention.{ms_name}"
                for part, hf_part in (("a", proj.lora_A), ("b", proj.lora_B)):
                    value = hf_part["default"].weight.numpy().copy()
                    params[f"{prefix}.mindpet_delta_lora_{part}"].set_data(ms.Tensor(value))

    ids = np.random.default_rng(1).integers(0, 256, size=(2, 24))
    expected = hf_logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = hf_logits(peft_model, ids)
    assert np.abs(expected - base).max() > 0.1  # the adapter changes the output
    assert np.abs(ms_logits(model, ids) - expected).max() <= TOL


def test_bf16_checkpoint_loads_into_fp32_model(tmp_path: Path) -> None:
    hf = tiny_hf_model(2)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "bf16.ckpt", dtype="bf16")
    model = LlamaForCausalLM(LlamaConfig.from_hf_config(hf.config.to_dict(), seq_length=32))
    load_weights(model, tmp_path / "bf16.ckpt", allow_missing_lora=False)
    assert {p.dtype for p in model.get_parameters()} == {ms.float32}  # cast to the model's type
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(param.to(torch.bfloat16).float())  # the same rounding the bf16 file applied
    ids = np.random.default_rng(2).integers(0, 256, size=(1, 24))
    assert np.abs(ms_logits(model, ids) - hf_logits(hf, ids)).max() <= TOL
