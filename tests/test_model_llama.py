"""Llama model: config rules, parameter names and counts, LoRA wiring, loss, precision paths, loading."""

from __future__ import annotations

import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from llama_core.errors import ConfigError, InputError
from llama_core.model import (
    LlamaConfig,
    LlamaForCausalLM,
    LoraConfig,
    apply_lora,
    lora_num_parameters,
    normalize_lora_name,
)
from llama_core.model import llama as llama_module
from llama_core.model.weights import load_weights

# PyNative mode cannot run ops with the numpy 2 in this venv; graph mode is what the trainer uses anyway.
ms.set_context(mode=ms.GRAPH_MODE)

TINY = {
    "seq_length": 16,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128,
    "multiple_of": 32,
}


def tiny(**overrides: object) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def expected_names(layers: int) -> list[str]:
    """docs/REFERENCE.md, parameter names, written out."""
    names = ["model.tok_embeddings.embedding_weight"]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [f"{p}.attention_norm.weight", f"{p}.ffn_norm.weight"]
        names += [f"{p}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        names += [f"{p}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    return [*names, "model.norm_out.weight", "lm_head.weight"]


# ---- config ----


@pytest.mark.parametrize(
    ("hidden", "multiplier", "multiple_of", "ffn"),
    [(4096, None, 256, 11008), (5120, None, 256, 13824), (8192, 1.3, 4096, 28672)],
    ids=["7b", "13b", "70b"],
)
def test_ffn_size_matches_published_llama2_sizes(
    hidden: int, multiplier: float, multiple_of: int, ffn: int
) -> None:
    cfg = LlamaConfig(
        hidden_size=hidden, num_heads=hidden // 128, ffn_dim_multiplier=multiplier, multiple_of=multiple_of
    )
    assert cfg.ffn_hidden_size == ffn
    assert LlamaConfig(intermediate_size=1000).ffn_hidden_size == 1000


def test_7b_parameter_counts_without_allocating() -> None:
    cfg = LlamaConfig()
    h, f, v, layers = 4096, 11008, 32000, 32
    by_hand = 2 * v * h + layers * (4 * h * h + 3 * h * f + 2 * h) + h
    assert cfg.num_parameters() == by_hand
    assert round(cfg.num_parameters() / 1e9, 2) == 6.74
    # docs/REFERENCE.md, config values: 32 x 4 x (16x4096 + 4096x16)
    assert lora_num_parameters(cfg, LoraConfig()) == 32 * 4 * (16 * 4096 + 4096 * 16)


def test_from_dict_reads_mindformers_model_config(caplog: pytest.LogCaptureFixture) -> None:
    section4 = {
        "type": "LlamaConfig",
        "batch_size": 1,
        "seq_length": 4096,
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "vocab_size": 32000,
        "multiple_of": 256,
        "rms_norm_eps": 1.0e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "ignore_token_id": -100,
        "compute_dtype": "bfloat16",
        "layernorm_compute_type": "float32",
        "softmax_compute_type": "float32",
        "rotary_dtype": "float32",
        "param_init_type": "float32",
        "use_past": False,
        "use_flash_attention": True,
        "pet_config": {"pet_type": "lora", "lora_rank": 16},
    }
    with caplog.at_level("INFO", logger="llama_core.model"):
        cfg = LlamaConfig.from_dict(section4)
    assert cfg.ffn_hidden_size == 11008 and cfg.num_kv_heads == 32 and cfg.use_flash_attention
    assert "batch_size, type, use_past" in caplog.text
    with pytest.raises(ConfigError, match="hidden_sise"):
        LlamaConfig.from_dict({**section4, "hidden_sise": 1})
    assert LlamaConfig.from_dict({**section4, "extend_method": "None", "qkv_concat": False}) == cfg
    with pytest.raises(ConfigError, match="qkv_concat=True"):  # would rename wq/wk/wv to w_qkv
        LlamaConfig.from_dict({**section4, "qkv_concat": True})
    with pytest.raises(ConfigError, match="extend_method='NTK'"):  # would change RoPE
        LlamaConfig.from_dict({**section4, "extend_method": "NTK"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, "not divisible by num_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads 3"),
        ({"compute_dtype": "float64"}, "compute_dtype"),
        ({"use_flash_attention": True}, "use_flash_attention needs compute_dtype"),
        ({"max_position_embedding": 8}, "max_position_embedding 8"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_config_validation_names_the_bad_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_from_hf_config_refuses_features_it_lacks() -> None:
    hf = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 32,
        "intermediate_size": 96,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-6,
    }
    cfg = LlamaConfig.from_hf_config(hf)
    assert (cfg.theta, cfg.rms_norm_eps, cfg.n_kv_heads, cfg.ffn_hidden_size) == (500000.0, 1e-6, None, 96)
    with pytest.raises(ConfigError, match="attention_bias"):
        LlamaConfig.from_hf_config({**hf, "attention_bias": True})
    with pytest.raises(ConfigError, match="rope_scaling"):
        LlamaConfig.from_hf_config({**hf, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


# ---- built model ----


def test_parameter_names_shapes_and_count() -> None:
    cfg = tiny()
    model = LlamaForCausalLM(cfg)
    shapes = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    assert sorted(shapes) == sorted(expected_names(2))
    assert sorted(p.name for p in model.get_parameters()) == sorted(expected_names(2))
    kv_dim = 2 * 16
    assert shapes["model.layers.1.attention.wk.weight"] == (kv_dim, 64)  # [out, in]
    assert shapes["model.layers.0.feed_forward.w2.weight"] == (64, cfg.ffn_hidden_size)
    assert shapes["model.tok_embeddings.embedding_weight"] == (128, 64)
    assert cfg.num_parameters() == sum(math.prod(s) for s in shapes.values())


def test_loss_is_masked_mean_of_section3() -> None:
    model = LlamaForCausalLM(tiny())
    model.set_train(False)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 128, size=(2, 17)).astype(np.int32)
    ids[0, 12:] = 0  # padding at the end of the first record
    labels = ids.copy()
    labels[:, :5] = -100  # prompt tokens are not learned
    labels[0, 12:] = -100
    labels[1, 9] = -100

    loss = float(model(ms.Tensor(ids), ms.Tensor(labels)).asnumpy())
    logits = model(ms.Tensor(ids[:, :-1])).asnumpy().astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    inputs, targets = ids[:, :-1], labels[:, 1:]
    mask = (inputs != 0) & (targets != -100)
    nll = -np.take_along_axis(log_probs, np.where(mask, targets, 0)[..., None], -1)[..., 0]
    expected = (nll * mask).sum() / (mask.sum() + 1e-8)
    assert mask.sum() == (11 - 4) + (16 - 4 - 1)  # counted by hand from the construction above
    assert loss == pytest.approx(expected, rel=1e-5)


# ---- LoRA ----


def test_apply_lora_names_init_and_freezing() -> None:
    cfg = tiny()
    model = LlamaForCausalLM(cfg)
    model.set_train(False)
    ids = ms.Tensor(np.arange(16, dtype=np.int32).reshape(1, 16))
    before = model(ids).asnumpy()
    lora = LoraConfig(rank=4, alpha=8)
    wrapped = apply_lora(model, lora)
    assert wrapped == [f"model.layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wk", "wv", "wo")]
    params = {p.name: p for p in model.get_parameters()}
    lora_names = {f"{n}.mindpet_delta_lora_{x}" for n in wrapped for x in ("a", "b")}
    assert set(params) == set(expected_names(2)) | lora_names  # base names unchanged
    assert {n for n, p in params.items() if p.requires_grad} == lora_names
    a = params["model.layers.0.attention.wk.mindpet_delta_lora_a"].asnumpy()
    b = params["model.layers.0.attention.wk.mindpet_delta_lora_b"].asnumpy()
    assert a.shape == (4, 64) and b.shape == (32, 4)
    # kaiming uniform with a=sqrt(5): bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in)
    assert 0.5 / 8 < np.abs(a).max() <= 1 / 8 and np.all(b == 0)
    trainable = sum(p.size for p in model.trainable_params())
    assert (
        trainable == lora_num_parameters(cfg, lora) == 2 * 4 * ((64 + 64) * 2 + (32 + 64) * 2)
    )  # 2 layers, rank 4, wq/wo 64x64, wk/wv 32x64
    np.testing.assert_allclose(model(ids).asnumpy(), before, atol=1e-6)  # B = 0: no change yet


def test_lora_target_regex_and_pet_config() -> None:
    model = LlamaForCausalLM(tiny(num_layers=1))
    assert apply_lora(model, LoraConfig(target_modules=".*wq|.*w2")) == [
        "model.layers.0.attention.wq",
        "model.layers.0.feed_forward.w2",
    ]
    with pytest.raises(ConfigError, match="matches no Linear"):
        apply_lora(LlamaForCausalLM(tiny(num_layers=1)), LoraConfig(target_modules=".*q_proj"))
    cfg = LoraConfig.from_pet_config(
        {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ".*wq"}
    )
    assert (cfg.rank, cfg.scaling, cfg.dropout) == (8, 4.0, 0.1)
    with pytest.raises(ConfigError, match="lora_rnak"):
        LoraConfig.from_pet_config({"lora_rnak": 8})
    assert normalize_lora_name("model.layers.3.attention.wq.tk_delta_lora_a") == (
        "model.layers.3.attention.wq.mindpet_delta_lora_a"
    )


# ---- precision paths (Ascend ones are built; their arithmetic is checked with CPU stand-ins) ----


def test_ascend_bf16_flash_config_builds_with_fp32_params() -> None:
    cfg = LlamaConfig.from_dict({**TINY, "compute_dtype": "bfloat16", "use_flash_attention": True})
    model = LlamaForCausalLM(cfg)
    attention = model.model.layers[0].attention
    assert attention.use_flash_attention and attention.probabilities.compute_dtype == ms.bfloat16
    assert attention.probabilities.softmax_dtype == ms.float32
    assert model.model.norm_out.norm_dtype == ms.float32
    mask = attention.flash_mask.asnumpy()
    assert mask.shape == (2048, 2048) and mask.dtype == np.uint8
    assert mask[0, 1] == 1 and mask[1, 0] == 0 and mask[5, 5] == 0  # 1 = future position, discarded
    assert {p.dtype for p in model.get_parameters()} == {ms.float32}
    assert not hasattr(LlamaForCausalLM(tiny()).model.layers[0].attention, "flash_mask")


def copy_weights(src: LlamaForCausalLM, dst: LlamaForCausalLM) -> None:
    dst_params = dict(dst.parameters_and_names())
    for name, param in src.parameters_and_names():
        dst_params[name].set_data(ms.Tensor(param.asnumpy()))


def test_fp16_compute_stays_close_to_fp32_with_fp32_logits() -> None:
    ref = LlamaForCausalLM(tiny())
    half = LlamaForCausalLM(tiny(compute_dtype="float16"))
    copy_weights(ref, half)
    ids = ms.Tensor(np.random.default_rng(5).integers(0, 128, size=(2, 16)).astype(np.int32))
    expected, got = ref(ids).asnumpy(), half(ids)
    assert got.dtype == ms.float32
    diff = np.abs(got.asnumpy() - expected).max()
    assert 0 < diff < 2e-2  # really computed in half precision, and still right


def reference_flash_attention_score(
    query,
    key,
    value,
    head_num,
    attn_mask=None,
    scalar_value=1.0,
    input_layout="BSH",
    sparse_mode=0,
    actual_seq_qlen=None,
    actual_seq_kvlen=None,
):
    """CPU stand-in for Ascend's flash_attention_score, per its documented semantics for BNSD layout
    with sparse_mode 2 (compressed 2048x2048 mask, 1 = discard, top-left aligned) and TND layout with
    sparse_mode 3 (causal inside each sequence the cumulative lengths delimit)."""
    if input_layout == "TND":
        return reference_tnd(query, key, value, head_num, scalar_value, actual_seq_qlen)
    groups = head_num // key.shape[1]
    key = ops.repeat_interleave(key, groups, 1)
    value = ops.repeat_interleave(value, groups, 1)
    seq = query.shape[2]
    scores = ops.matmul(query.astype(ms.float32), key.astype(ms.float32).transpose(0, 1, 3, 2)) * scalar_value
    discard = attn_mask[:seq, :seq].astype(ms.bool_)
    scores = ops.where(discard, ops.full_like(scores, -1e9), scores)
    return ops.matmul(ops.softmax(scores, -1), value.astype(ms.float32)).astype(query.dtype)


def reference_tnd(query, key, value, head_num, scalar_value, cumulative):
    """TND: [tokens, heads, dim]; token t belongs to the sequence of the first cumulative end above it."""
    groups = head_num // key.shape[1]
    key = ops.repeat_interleave(key, groups, 1).transpose(1, 0, 2)
    value = ops.repeat_interleave(value, groups, 1).transpose(1, 0, 2)
    tokens = query.shape[0]
    index = ops.arange(tokens)
    sequence = (cumulative.reshape(1, -1) <= index.reshape(-1, 1).astype(cumulative.dtype)).sum(-1)
    allowed = (sequence.reshape(-1, 1) == sequence.reshape(1, -1)) & (
        index.reshape(-1, 1) >= index.reshape(1, -1)
    )
    scores = ops.matmul(
        query.astype(ms.float32).transpose(1, 0, 2), key.astype(ms.float32).transpose(0, 2, 1)
    )
    scores = ops.where(allowed, scores * scalar_value, ops.full_like(scores, -1e9))
    out = ops.matmul(ops.softmax(scores, -1), value.astype(ms.float32)).transpose(1, 0, 2)
    return out.astype(query.dtype)


def test_flash_attention_branch_matches_plain_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_module.ops, "flash_attention_score", reference_flash_attention_score)
    plain = LlamaForCausalLM(tiny(compute_dtype="float16"))
    flash = LlamaForCausalLM(tiny(compute_dtype="float16", use_flash_attention=True))
    copy_weights(plain, flash)
    ids = ms.Tensor(np.random.default_rng(6).integers(0, 128, size=(2, 16)).astype(np.int32))
    np.testing.assert_allclose(flash(ids).asnumpy(), plain(ids).asnumpy(), atol=2e-2)


# ---- packed rows: documents attend only to themselves ----


def packed_batch(rng: np.random.Generator, lengths: list[list[int]], row: int) -> tuple[np.ndarray, ...]:
    """Rows of `row` ids holding documents of the given lengths (first label of each ignored, like a
    record's bos, and two more as a prompt), the documents alone, and the rows' cumulative ends
    padded with the row length."""
    ids = np.zeros((len(lengths), row), np.int32)
    labels = np.full((len(lengths), row), -100, np.int32)
    ends = np.full((len(lengths), max(map(len, lengths))), row, np.int32)
    docs = []
    for r, sizes in enumerate(lengths):
        start = 0
        for k, n in enumerate(sizes):
            doc = rng.integers(3, 128, n).astype(np.int32)
            doc_labels = doc.copy()
            doc_labels[:3] = -100
            ids[r, start : start + n], labels[r, start : start + n] = doc, doc_labels
            docs.append((r, start, doc, doc_labels))
            start += n
            ends[r, k] = start
    return ids, labels, ends, docs


def alone(doc: np.ndarray, doc_labels: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
    """A document as an unpacked record: padded with 0, labels with -100."""
    ids, labels = np.zeros((1, row), np.int32), np.full((1, row), -100, np.int32)
    ids[0, : len(doc)], labels[0, : len(doc)] = doc, doc_labels
    return ids, labels


@pytest.mark.parametrize("flash", [False, True], ids=["dot-product", "flash-TND"])
def test_packed_documents_give_the_logits_of_each_document_alone(
    flash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llama_module.ops, "flash_attention_score", reference_flash_attention_score)
    ms.set_seed(0)
    dtype = "float16" if flash else "float32"  # the flash path needs half precision
    model = LlamaForCausalLM(tiny(use_flash_attention=flash, compute_dtype=dtype))
    model.set_train(False)
    # row 0: three documents and padding; row 1: two documents filling it (the last one to the end)
    ids, _, ends, docs = packed_batch(np.random.default_rng(7), [[5, 6, 2], [9, 7]], 16)
    packed = model(ms.Tensor(ids), None, ms.Tensor(ends)).asnumpy()
    for r, start, doc, doc_labels in docs:
        single = model(ms.Tensor(alone(doc, doc_labels, 16)[0])).asnumpy()[0, : len(doc)]
        got = packed[r, start : start + len(doc)]
        scale = np.abs(single).max()
        assert np.abs(got - single).max() / scale <= (2e-3 if flash else 1e-5), (r, start)
    # the same rows without boundaries attend across documents: the comparison can fail
    unpacked = model(ms.Tensor(ids)).asnumpy()
    assert np.abs(unpacked[0, 5:11] - packed[0, 5:11]).max() > 1e-2


def test_packed_loss_is_the_supervised_token_weighted_mean_of_the_documents_losses() -> None:
    ms.set_seed(0)
    model = LlamaForCausalLM(tiny())
    model.set_train(False)
    ids, labels, ends, docs = packed_batch(np.random.default_rng(8), [[5, 6, 4], [9, 8]], 17)
    packed = float(model(ms.Tensor(ids), ms.Tensor(labels), ms.Tensor(ends)).asnumpy())
    losses, weights = [], []
    for _, _, doc, doc_labels in docs:
        one_ids, one_labels = alone(doc, doc_labels, 17)
        losses.append(float(model(ms.Tensor(one_ids), ms.Tensor(one_labels)).asnumpy()))
        weights.append(int((one_labels[:, 1:] != -100).sum()))
    assert weights == [len(doc) - 3 for _, _, doc, _ in docs]  # 3 ignored labels per document
    assert packed == pytest.approx(np.average(losses, weights=weights), rel=1e-5)
    assert np.ptp(losses) > 1e-3  # a plain mean of the documents' losses would differ


# ---- loading checkpoints ----


def save(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "w.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], str(path))
    return path


def test_load_weights_accepts_legacy_lora_names_and_skips_training_state(tmp_path: Path) -> None:
    model = LlamaForCausalLM(tiny(num_layers=1))
    apply_lora(model, LoraConfig(rank=2, target_modules=".*wq"))
    tensors = {name: np.full(p.shape, 0.5, np.float32) for name, p in model.parameters_and_names()}
    legacy = {k.replace("mindpet_delta_", "tk_delta_"): v for k, v in tensors.items()}
    legacy["global_step"] = np.array([10], np.int32)
    legacy["adam_m.lm_head.weight"] = tensors["lm_head.weight"]
    loaded = load_weights(model, save(tmp_path, legacy))
    assert sorted(loaded) == sorted(tensors)
    assert np.all(
        dict(model.parameters_and_names())["model.layers.0.attention.wq.mindpet_delta_lora_b"].asnumpy()
        == 0.5
    )


def test_load_weights_names_missing_extra_and_misshaped_tensors(tmp_path: Path) -> None:
    model = LlamaForCausalLM(tiny(num_layers=1))
    tensors = {name: np.zeros(p.shape, np.float32) for name, p in model.parameters_and_names()}
    missing = {k: v for k, v in tensors.items() if k != "model.norm_out.weight"}
    with pytest.raises(InputError, match=r"missing model\.norm_out\.weight"):
        load_weights(model, save(tmp_path, missing))
    with pytest.raises(InputError, match=r"not in the model model\.layers\.7\.ffn_norm\.weight"):
        load_weights(
            model, save(tmp_path, {**tensors, "model.layers.7.ffn_norm.weight": np.zeros(64, np.float32)})
        )
    with pytest.raises(InputError, match=r"lm_head\.weight has shape \(3, 64\)"):
        load_weights(model, save(tmp_path, {**tensors, "lm_head.weight": np.zeros((3, 64), np.float32)}))


def test_lora_dropout_only_on_the_adapter_input_and_only_in_training() -> None:
    model = LlamaForCausalLM(tiny(num_layers=1))
    apply_lora(model, LoraConfig(rank=4, alpha=4, dropout=0.5, target_modules=".*wv"))
    ids = ms.Tensor(np.arange(16, dtype=np.int32).reshape(1, 16))
    model.set_train(False)
    base = model(ids).asnumpy()
    model.set_train(True)
    np.testing.assert_array_equal(model(ids).asnumpy(), base)  # B = 0: dropout never touches W x
    b = dict(model.parameters_and_names())["model.layers.0.attention.wv.mindpet_delta_lora_b"]
    b.set_data(ms.Tensor(np.full(b.shape, 0.5, np.float32)))
    assert np.abs(model(ids).asnumpy() - model(ids).asnumpy()).max() > 0  # random masks in training
    model.set_train(False)
    np.testing.assert_array_equal(model(ids).asnumpy(), model(ids).asnumpy())
