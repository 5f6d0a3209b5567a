"""Llama 3.x, Qwen2/2.5 and Qwen3 beside Llama 2: the MindSpore model equals transformers (and PEFT)
on tiny random checkpoints of each family, and its checkpoints convert both ways bit for bit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ms = pytest.importorskip("mindspore")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from tiny_hf import llama3_rope, tiny_hf_family  # noqa: E402

from llama_core.checkpoint.convert import convert_hf_to_ms, convert_ms_to_hf  # noqa: E402
from llama_core.checkpoint.export_peft import export_peft  # noqa: E402
from llama_core.checkpoint.import_peft import import_peft  # noqa: E402
from llama_core.checkpoint.merge_lora import merge_lora  # noqa: E402
from llama_core.errors import ConfigError  # noqa: E402
from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora, load_weights  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE)
TOL = 1e-4
SEQ = 96  # past the rope-scaled model's original_max_position_embeddings (16)
LLAMA3_ROPE = llama3_rope(16)
# The families' distinguishing features, each on a tiny random model.
FAMILIES = {
    "llama3.1-rope-scaling": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama3.2-tied": (
        "llama",
        {"rope_parameters": {**LLAMA3_ROPE, "rope_type": "default"}, "tie_word_embeddings": True},
    ),
    "qwen2-bias": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    "qwen2.5-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-qk-norm-head-dim": (
        "qwen3",
        {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    ),
}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()


def ms_model(hf_dir: Path, ckpt: Path, lora: LoraConfig | None = None) -> LlamaForCausalLM:
    config = LlamaConfig.from_hf_config(json.loads((hf_dir / "config.json").read_text()), seq_length=SEQ)
    model = LlamaForCausalLM(config)
    if lora is not None:
        apply_lora(model, lora)
    load_weights(model, ckpt, allow_missing_lora=False)
    model.set_train(False)
    return model


def ms_logits(model: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    return model(ms.Tensor(ids, ms.int32)).asnumpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its folder, its MindSpore conversion, ids)."""
    model_type, config = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf = tiny_hf_family(model_type, seed=len(request.param), **config)
    hf.save_pretrained(folder / "hf")
    convert_hf_to_ms(folder / "hf", folder / "base.ckpt")
    ids = np.random.default_rng(0).integers(0, 256, size=(2, SEQ))
    return request.param, hf, folder, ids


def test_logits_match_transformers(family) -> None:
    name, hf, folder, ids = family
    expected = hf_logits(hf, ids)
    model = ms_model(folder / "hf", folder / "base.ckpt")
    got = ms_logits(model, ids)
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() <= TOL, name
    # the (chunked) training loss, a tied head included, is the cross-entropy of those logits
    labels = np.where(np.arange(SEQ) % 3 == 0, -100, ids)
    records = np.concatenate([ids, ids[:, :1]], axis=1), np.concatenate([labels, ids[:, :1]], axis=1)
    loss = float(model(*(ms.Tensor(r, ms.int32) for r in records)).asnumpy())
    targets, keep = records[1][:, 1:], records[1][:, 1:] != -100
    log_probs = expected - np.log(np.exp(expected - expected.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_probs -= expected.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    assert abs(loss - nll[keep & (ids != 0)].mean()) <= TOL, name


def test_hf_ms_hf_is_bit_exact(family) -> None:
    name, hf, folder, _ = family
    convert_ms_to_hf(folder / "base.ckpt", folder / "back", config=folder / "hf" / "config.json")
    original = safetensors_numpy.load_file(folder / "hf" / "model.safetensors")
    back = safetensors_numpy.load_file(folder / "back" / "model.safetensors")
    assert sorted(back) == sorted(original), name
    for key, value in original.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder / "back", attn_implementation="eager")
    assert type(reloaded) is type(hf)


def test_peft_adapter_in_merge_and_out(family) -> None:
    """A PEFT adapter on all seven projections: imported, its logits equal PEFT's; merged, equal
    PEFT's merge; exported again, PEFT on the HF model gives the same logits."""
    _, hf, folder, ids = family
    rank, alpha = 4, 8.0
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=PEFT_TARGETS)
    peft_model = peft.get_peft_model(hf, cfg).eval()
    torch.manual_seed(11)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, 0.1)
    peft_model.save_pretrained(folder / "adapter")
    expected = hf_logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert np.abs(expected - hf_logits(peft_model, ids)).max() > 0.1  # the adapter matters

    imported = import_peft(folder / "adapter", folder / "lora.ckpt", base_checkpoint=folder / "base.ckpt")
    lora = LoraConfig(
        rank=rank, alpha=alpha, dropout=0.0, target_modules=imported.pet_config["target_modules"]
    )
    assert np.abs(ms_logits(ms_model(folder / "hf", folder / "lora.ckpt", lora), ids) - expected).max() <= TOL

    merge_lora(folder / "lora.ckpt", folder / "merged.ckpt", alpha=alpha)
    merged = ms_logits(ms_model(folder / "hf", folder / "merged.ckpt"), ids)
    assert np.abs(merged - expected).max() <= TOL

    export_peft(folder / "lora.ckpt", folder / "exported", base_model=str(folder / "hf"), alpha=alpha)
    exported = peft.PeftModel.from_pretrained(
        type(hf).from_pretrained(folder / "hf", attn_implementation="eager"), folder / "exported"
    ).eval()
    assert np.abs(hf_logits(exported, ids) - expected).max() <= TOL
    peft_model.unload()  # leave the module's HF model without adapters for the other tests


def test_both_rope_spellings_read_the_same() -> None:
    base = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 128256,
        "intermediate_size": 96,
    }
    published = {
        **base,
        "rope_theta": 500000.0,
        "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
    }
    published["rope_scaling"]["type"] = published["rope_scaling"].pop("rope_type")  # older files
    v5 = {**base, "rope_parameters": LLAMA3_ROPE}
    assert LlamaConfig.from_hf_config(published) == LlamaConfig.from_hf_config(v5)
    assert LlamaConfig.from_hf_config(v5).theta == 500000.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "mistral"}, "model_type='mistral'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_features_are_refused_by_name(change: dict, message: str) -> None:
    hf = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 32,
        "intermediate_size": 96,
        **change,
    }
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_config(hf)


def test_convert_cli_takes_the_architecture_from_config_json(tmp_path: Path) -> None:
    """`--model llama` keeps being accepted for every family: config.json decides."""
    from llama_core.checkpoint.convert import main

    hf = tiny_hf_family("qwen3", head_dim=32)
    hf.save_pretrained(tmp_path / "hf")
    args = [
        "--model",
        "llama",
        "--input_path",
        str(tmp_path / "hf"),
        "--output_path",
        str(tmp_path / "q.ckpt"),
    ]
    assert main(args) == 0
    assert main([*args[:2], "--input_path", str(tmp_path / "q.ckpt"), "--output_path", str(tmp_path / "back"),
                 "--reversed", "--config", str(tmp_path / "hf" / "config.json")]) == 0  # fmt: skip
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["model_type"], config["head_dim"]) == ("qwen3", 32)


def test_shard_for_tensor_parallel_and_back_is_exact(family) -> None:
    """model_parallel 2 x pipeline 1: biases split with their rows, q/k norms replicated, a tied
    head's table split once; unsharded, every tensor is the original."""
    from llama_core.checkpoint.msckpt import load_ckpt_dict
    from llama_core.checkpoint.shard import shard_checkpoint
    from llama_core.checkpoint.unshard import unshard_checkpoint

    name, _, folder, _ = family
    config = LlamaConfig.from_hf_config(json.loads((folder / "hf" / "config.json").read_text()))
    run_config = {
        "parallel_config": {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1},
        "model": {"model_config": dataclasses.asdict(config)},
    }
    shard_checkpoint(folder / "base.ckpt", run_config, folder / "sharded")
    rank0 = load_ckpt_dict(next((folder / "sharded" / "rank_0").glob("*.ckpt")))
    original = load_ckpt_dict(folder / "base.ckpt")
    for key, value in rank0.items():  # each rank holds half of every split tensor
        assert value.size in (original[key].size, original[key].size // 2), key
    split = {k for k, v in rank0.items() if v.size != original[k].size}
    assert {"model.layers.0.attention.wq.weight", "model.tok_embeddings.embedding_weight"} <= split
    assert ("model.layers.0.attention.wk.bias" in split) == config.qkv_has_bias
    assert ("model.layers.0.attention.q_norm.weight" in rank0) == config.qk_norm  # replicated
    unshard_checkpoint(folder / "sharded", folder / "unsharded.ckpt")
    back = load_ckpt_dict(folder / "unsharded.ckpt")
    assert sorted(back) == sorted(original), name
    assert all(np.array_equal(back[k], v) for k, v in original.items()), name
