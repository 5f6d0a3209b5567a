"""merge_lora, export_peft and import_peft against the MindSpore LoRA model and HF PEFT (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ms = pytest.importorskip("mindspore")

from tiny_hf import tiny_hf_llama  # noqa: E402

from llama_core.checkpoint.convert import convert_hf_to_ms  # noqa: E402
from llama_core.checkpoint.export_peft import export_peft  # noqa: E402
from llama_core.checkpoint.export_peft import main as export_main  # noqa: E402
from llama_core.checkpoint.import_peft import import_peft  # noqa: E402
from llama_core.checkpoint.merge_lora import main as merge_main  # noqa: E402
from llama_core.checkpoint.merge_lora import merge_lora  # noqa: E402
from llama_core.checkpoint.msckpt import load_ckpt_dict, write_ckpt  # noqa: E402
from llama_core.cli import exit_code  # noqa: E402
from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora, load_weights  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE)  # as the model tests: PyNative cannot run with numpy 2 here
TOL = 1e-4
RANK, ALPHA = 4, 8.0
IDS = np.array([[1, 7, 33, 2, 60, 11, 5, 9]], np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """HF base, its MindSpore conversion, a LoRA model with random non-zero A and B, its checkpoint."""
    d = tmp_path_factory.mktemp("lora")
    hf = tiny_hf_llama(kv_heads=2, seed=3, spread=True, attn_implementation="eager")
    hf.save_pretrained(d / "hf")
    convert_hf_to_ms(d / "hf", d / "base.ckpt")

    model = LlamaForCausalLM(LlamaConfig.from_hf_config(hf.config.to_dict(), seq_length=16))
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0))
    load_weights(model, d / "base.ckpt")
    rng = np.random.default_rng(0)
    lora = {}
    for p in model.get_parameters():
        if "mindpet_delta_lora" in p.name:
            value = rng.normal(0, 0.2, p.shape).astype(np.float32)
            p.set_data(ms.Tensor(value))
            lora[p.name] = value
    model.set_train(False)
    logits = model(ms.Tensor(IDS)).asnumpy()
    # a full training checkpoint: base + LoRA + optimizer state + step counter
    base = load_ckpt_dict(d / "base.ckpt")
    items = [(k, v, "F32") for k, v in base.items()] + [(k, v, "F32") for k, v in lora.items()]
    items += [("adam_m." + k, np.zeros_like(v), "F32") for k, v in lora.items()]
    items += [("global_step", np.array(10, np.int32), "I32")]
    write_ckpt(d / "full.ckpt", items)
    write_ckpt(d / "lora_only.ckpt", [(k, v, "F32") for k, v in lora.items()])
    return d, hf, logits, lora


def _ms_logits(ckpt, lora: bool = False) -> np.ndarray:
    model = LlamaForCausalLM(
        LlamaConfig(
            seq_length=16,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            n_kv_heads=2,
            vocab_size=64,
            intermediate_size=64,
        )
    )
    if lora:
        apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0))
    load_weights(model, ckpt, allow_missing_lora=False)
    model.set_train(False)
    return model(ms.Tensor(IDS)).asnumpy()


def test_merge_gives_the_lora_models_logits(setup, tmp_path):
    d, _, logits, lora = setup
    res = merge_lora(d / "full.ckpt", tmp_path / "merged.ckpt", alpha=ALPHA)
    assert len(res.merged) == 8  # q, k, v, o of 2 layers
    merged = load_ckpt_dict(tmp_path / "merged.ckpt")
    assert not any("lora" in k or k.startswith("adam_") for k in merged) and "global_step" not in merged
    assert len(res.dropped) == 2 * len(lora) + 1
    # hand check of one weight: W + B @ A * alpha / r
    base = load_ckpt_dict(d / "base.ckpt")
    n = "model.layers.1.attention.wo"
    want = (
        base[n + ".weight"]
        + lora[n + ".mindpet_delta_lora_b"] @ lora[n + ".mindpet_delta_lora_a"] * ALPHA / RANK
    )
    np.testing.assert_allclose(merged[n + ".weight"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        merged["model.layers.0.feed_forward.w2.weight"], base["model.layers.0.feed_forward.w2.weight"]
    )
    np.testing.assert_allclose(_ms_logits(tmp_path / "merged.ckpt"), logits, atol=TOL, rtol=0)


def test_merge_from_separate_lora_checkpoint_with_config_alpha(setup, tmp_path, capsys):
    d, _, _, _ = setup
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model:\n  model_config:\n    pet_config:\n      lora_rank: {RANK}\n      lora_alpha: {ALPHA}\n"
    )
    argv = [
        "--base_checkpoint",
        str(d / "base.ckpt"),
        "--lora_checkpoint",
        str(d / "lora_only.ckpt"),
        "--output_path",
        str(tmp_path / "m2.ckpt"),
        "--config",
        str(cfg),
    ]
    assert merge_main(argv) == 0
    merge_lora(d / "full.ckpt", tmp_path / "m1.ckpt", alpha=ALPHA)
    assert (tmp_path / "m1.ckpt").read_bytes() == (tmp_path / "m2.ckpt").read_bytes()
    # no alpha anywhere: a clear error, nothing written
    assert exit_code(merge_main, [*argv[:-2], "--output_path", str(tmp_path / "m3.ckpt")]) == 2
    assert "lora_alpha" in capsys.readouterr().err and not (tmp_path / "m3.ckpt").exists()


def test_peft_export_gives_the_lora_models_logits_and_imports_back(setup, tmp_path):
    d, hf, logits, lora = setup
    out = tmp_path / "adapter"
    res = export_peft(d / "full.ckpt", out, base_model="tiny/llama", alpha=ALPHA, dropout=0.05)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["task_type"]) == (
        RANK,
        ALPHA,
        0.05,
        "CAUSAL_LM",
    )
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"] == res.target_modules
    assert cfg["base_model_name_or_path"] == "tiny/llama"
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        got = peft_model(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(got, logits, atol=TOL, rtol=0)

    back = import_peft(out, tmp_path / "imported.ckpt")
    assert back.pet_config == {
        "pet_type": "lora",
        "lora_rank": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "target_modules": ".*wk|.*wo|.*wq|.*wv",
    }
    imported = load_ckpt_dict(tmp_path / "imported.ckpt")
    assert set(imported) == set(lora)
    for k, v in lora.items():
        np.testing.assert_array_equal(imported[k], v, err_msg=k)

    full = import_peft(out, tmp_path / "with_base.ckpt", base_checkpoint=d / "base.ckpt")
    assert full.tensors == len(load_ckpt_dict(d / "base.ckpt")) + len(lora)
    np.testing.assert_allclose(_ms_logits(tmp_path / "with_base.ckpt", lora=True), logits, atol=TOL, rtol=0)


def test_import_refuses_rslora(setup, tmp_path):
    d, _, _, _ = setup
    out = tmp_path / "adapter"
    assert (
        export_main(
            [
                "--load_checkpoint",
                str(d / "lora_only.ckpt"),
                "--output_dir",
                str(out),
                "--base_model",
                "x",
                "--lora_alpha",
                "8",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    from llama_core.errors import ConfigError

    with pytest.raises(ConfigError, match="use_rslora"):
        import_peft(out, tmp_path / "x.ckpt")
