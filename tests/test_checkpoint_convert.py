"""MindSpore .ckpt format and the HF -> MindSpore import (issue 3), against MindSpore and HF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llama_core.checkpoint import msckpt
from llama_core.checkpoint.convert import convert_hf_to_ms, convert_ms_to_hf, main
from llama_core.checkpoint.msckpt import load_ckpt_dict, scan_ckpt, write_ckpt
from llama_core.cli import exit_code
from llama_core.errors import InputError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ms = pytest.importorskip("mindspore")

from tiny_hf import tiny_hf_llama  # noqa: E402

# Written out by hand from docs/REFERENCE.md, parameter names (independent of llama_core.checkpoint.names).
HF_TO_MS = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
PER_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def ms_name(hf: str) -> str:
    if hf in HF_TO_MS:
        return HF_TO_MS[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"model.layers.{i}.{PER_LAYER[rest]}"


def tiny_hf(folder: Path, kv_heads: int, shard: str | None = None, dtype=None):
    """A tiny HF Llama saved with save_pretrained (in `shard`-sized files, cast to `dtype`)."""
    model = tiny_hf_llama(kv_heads=kv_heads, seed=kv_heads, rms_norm_eps=1e-6)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return model


@pytest.fixture(scope="module")
def hf_gqa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_gqa")
    model = tiny_hf(folder, kv_heads=2, shard="20KB")
    return folder, {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ .ckpt format
def test_our_ckpt_loads_in_mindspore(tmp_path, monkeypatch):
    # A tiny chunk size forces the multi-Value layout MindSpore uses for tensors over 512 MiB.
    monkeypatch.setattr(msckpt, "CHUNK_BYTES", 40)
    w = np.arange(60, dtype=np.float32).reshape(5, 12)
    bf16_bits = np.array([0x3FC0, 0x4000, 0xC080], dtype=np.uint16)  # 1.5, 2.0, -4.0
    path = tmp_path / "ours.ckpt"
    write_ckpt(
        path, [("w", w, "F32"), ("gs", np.array(7, np.int32), "I32"), ("bf", bf16_bits, "BF16")], crc=True
    )
    loaded = ms.load_checkpoint(str(path), crc_check=True)
    np.testing.assert_array_equal(loaded["w"].asnumpy(), w)
    assert loaded["gs"].asnumpy().shape == () and int(loaded["gs"].asnumpy()) == 7
    assert loaded["bf"].dtype == ms.bfloat16
    np.testing.assert_array_equal(loaded["bf"].float().asnumpy(), [1.5, 2.0, -4.0])
    assert len(scan_ckpt(path)[0].chunks) == 6  # 240 bytes in 40-byte pieces


def test_we_read_what_mindspore_writes(tmp_path):
    path = tmp_path / "theirs.ckpt"
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    ms.save_checkpoint(
        [
            {"name": "a", "data": ms.Tensor(a)},
            {"name": "h", "data": ms.Tensor(np.ones(4, np.float16))},
            {"name": "bf", "data": ms.Tensor(np.array([1.5, -2.0], np.float32), ms.bfloat16)},
            {"name": "global_step", "data": ms.Tensor(5, ms.int32)},
        ],
        str(path),
        crc_check=True,
        append_dict={"note": "hello"},
    )
    got = load_ckpt_dict(path)
    assert list(got) == ["a", "h", "bf", "global_step", "note"]
    np.testing.assert_array_equal(got["a"], a)
    assert got["h"].dtype == np.float16 and got["h"].tolist() == [1.0] * 4
    assert got["bf"].tolist() == [0x3FC0, 0xC000]
    assert got["global_step"].shape == () and int(got["global_step"]) == 5
    assert bytes(got["note"]).decode("utf-32-le") == "hello"


def test_truncated_ckpt_is_an_input_error(tmp_path):
    path = tmp_path / "t.ckpt"
    write_ckpt(path, [("w", np.ones((4, 4), np.float32), "F32")])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated"):
        scan_ckpt(path)


# ------------------------------------------------------------------------------ HF -> MS
def test_sharded_gqa_import_is_exact_and_loads_in_mindspore(hf_gqa, tmp_path):
    folder, state = hf_gqa
    assert (folder / "model.safetensors.index.json").exists()
    out = tmp_path / "out" / "llama.ckpt"
    res = convert_hf_to_ms(folder, out)
    assert not res.cached and res.tensors == len(state) == 2 * 9 + 3
    loaded = ms.load_checkpoint(str(out))
    assert set(loaded) == {ms_name(k) for k in state}
    for hf, arr in state.items():
        np.testing.assert_array_equal(loaded[ms_name(hf)].asnumpy(), arr, err_msg=hf)
    assert loaded["model.layers.1.attention.wk.weight"].shape == (16, 32)  # 2 kv heads x 8
    # model order: embedding first, lm_head last
    names = [e.name for e in scan_ckpt(out)]
    assert names[0] == "model.tok_embeddings.embedding_weight" and names[-1] == "lm_head.weight"

    mtime = out.stat().st_mtime_ns
    again = convert_hf_to_ms(folder, out)
    assert again.cached and out.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_dtype_casts_match_torch(hf_gqa, tmp_path, dtype, torch_dtype):
    folder, state = hf_gqa
    out = tmp_path / f"{dtype}.ckpt"
    convert_hf_to_ms(folder, out, dtype=dtype)
    got = load_ckpt_dict(out)
    for hf, arr in state.items():
        expected = torch.from_numpy(arr).to(getattr(torch, torch_dtype))
        bits = expected.view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(got[ms_name(hf)].view(np.uint16), bits, err_msg=hf)


def test_bf16_source_single_file(tmp_path):
    folder = tmp_path / "hf"
    model = tiny_hf(folder, kv_heads=4, dtype=torch.bfloat16)
    assert (folder / "model.safetensors").exists()
    convert_hf_to_ms(folder, tmp_path / "o.ckpt", dtype="fp32")
    got = load_ckpt_dict(tmp_path / "o.ckpt")
    for hf, t in model.state_dict().items():
        np.testing.assert_array_equal(got[ms_name(hf)], t.float().numpy(), err_msg=hf)


def _resave(folder: Path, state: dict, tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, out / "model.safetensors"
    )
    return out


def test_wrong_shape_fails_naming_tensor_and_writes_nothing(hf_gqa, tmp_path):
    folder, state = hf_gqa
    bad = dict(state)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)  # MHA shape, config is GQA
    src = _resave(folder, bad, tmp_path)
    out = tmp_path / "o" / "x.ckpt"
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\[16, 32\]"):
        convert_hf_to_ms(src, out)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_unknown_and_missing_tensors_fail(hf_gqa, tmp_path, capsys):
    folder, state = hf_gqa
    src = _resave(
        folder, {**state, "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}, tmp_path
    )
    rc = exit_code(
        main, ["--model", "llama", "--input_path", str(src), "--output_path", str(tmp_path / "x.ckpt")]
    )
    assert rc == 2
    assert "model.layers.0.self_attn.q_norm.weight" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()

    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    src2 = tmp_path / "m"
    src2.mkdir()
    src2 = _resave(folder, missing, src2)
    with pytest.raises(InputError, match=r"model\.norm_out\.weight.*missing"):
        convert_hf_to_ms(src2, tmp_path / "y.ckpt")


def test_layer_beyond_config_fails(hf_gqa, tmp_path):
    folder, state = hf_gqa
    src = _resave(
        folder, {**state, "model.layers.2.input_layernorm.weight": np.ones(32, np.float32)}, tmp_path
    )
    with pytest.raises(InputError, match=r"model\.layers\.2\.input_layernorm\.weight.*2 layers"):
        convert_hf_to_ms(src, tmp_path / "z.ckpt")


def test_cli_help_and_run(hf_gqa, tmp_path, capsys):
    folder, _ = hf_gqa
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = tmp_path / "cli.ckpt"
    assert main(["--model", "llama", "--input_path", str(folder), "--output_path", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["tensors"] == 21 and out.exists()


# ------------------------------------------------------------------------------ MS -> HF
def _hf_state(folder: Path) -> dict:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state = {}
    for f in files:
        with safe_open(folder / f, "pt") as st:
            state.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118 - safe_open is not a dict
    return state


def test_round_trip_hf_ms_hf_is_bit_exact_and_loads_in_transformers(hf_gqa, tmp_path):
    folder, state = hf_gqa
    ckpt = tmp_path / "m.ckpt"
    convert_hf_to_ms(folder, ckpt)
    write_ckpt(
        tmp_path / "with_opt.ckpt",
        [
            *((e.name, a, e.dtype) for e, a in msckpt.CkptReader(ckpt)),
            ("global_step", np.array(3, np.int32), "I32"),
            ("adam_m.lm_head.weight", state["lm_head.weight"], "F32"),
        ],
    )
    out = tmp_path / "hf_back"
    res = convert_ms_to_hf(tmp_path / "with_opt.ckpt", out, folder / "config.json", max_shard_size="20KB")
    assert sorted(res.skipped) == ["adam_m.lm_head.weight", "global_step"]
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    back = _hf_state(out)
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], torch.from_numpy(v)), k
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, torch.from_numpy(state[k])), k
    assert convert_ms_to_hf(
        tmp_path / "with_opt.ckpt", out, folder / "config.json", max_shard_size="20KB"
    ).cached


def test_bf16_round_trip_and_yaml_config(tmp_path):
    folder = tmp_path / "hf"
    model = tiny_hf(folder, kv_heads=2, dtype=torch.bfloat16)
    convert_hf_to_ms(folder, tmp_path / "f32.ckpt")  # widen to fp32 ...
    run_cfg = {
        "model": {
            "model_config": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "n_kv_heads": 2,
                "intermediate_size": 64,
                "vocab_size": 64,
                "rms_norm_eps": 1e-6,
                "seq_length": 64,
            }
        }
    }
    out = tmp_path / "back"
    convert_ms_to_hf(tmp_path / "f32.ckpt", out, run_cfg, dtype="bf16")  # ... and back to bf16
    back = _hf_state(out)
    for k, v in model.state_dict().items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["torch_dtype"]) == (2, 64, "bfloat16")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_reversed_refuses_lora(hf_gqa, tmp_path, capsys):
    folder, _state = hf_gqa
    ckpt = tmp_path / "l.ckpt"
    write_ckpt(
        ckpt, [("model.layers.0.attention.wq.mindpet_delta_lora_a", np.zeros((2, 32), np.float32), "F32")]
    )
    argv = [
        "--reversed",
        "--input_path",
        str(ckpt),
        "--output_path",
        str(tmp_path / "o"),
        "--config",
        str(folder / "config.json"),
    ]
    assert exit_code(main, argv) == 2
    assert "mindpet_delta_lora_a" in capsys.readouterr().err and not (tmp_path / "o").exists()
