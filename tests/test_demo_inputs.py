"""The demo's generated inputs must be what the real ones are: Alpaca records, a Llama-style
sentencepiece model and a checkpoint Hugging Face loads as a LlamaForCausalLM."""

import json
from pathlib import Path

import pytest

from llama_core.demo import DEMO_MODEL, FACTS, alpaca_records, generic_records, make_demo_inputs


def test_alpaca_records_have_the_alpaca_keys(demo_inputs) -> None:
    records = json.loads(Path(demo_inputs.alpaca).read_text(encoding="utf-8"))
    assert len(records) == 240
    assert all(set(r) == {"instruction", "input", "output"} for r in records)
    with_input = sum(bool(r["input"]) for r in records)
    assert 0 < with_input < len(records)


def test_the_facts_are_taught_by_the_data_and_absent_from_the_base_models_text() -> None:
    """The fine-tune's task: the records teach each codename; the base model's pre-training never
    names one, so only the fine-tuned model can answer."""
    records = alpaca_records()
    for topic, codename in FACTS.items():
        assert sum(r["output"] == f"The codename of {topic} is {codename}." for r in records) >= 20
    pretraining = json.dumps(generic_records())
    assert not any(codename in pretraining or "codename" in pretraining for codename in FACTS.values())


def test_the_numpy_llama_is_transformers_llama_forward_and_backward() -> None:
    """The base model's pre-training (llama_core.demo_pretrain) computes Hugging Face's Llama: the same
    logits, and the gradients autograd gives."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llama_core.demo import hf_llama_weights
    from llama_core.demo_pretrain import TinyLlama

    rng = np.random.default_rng(1)
    weights = hf_llama_weights(DEMO_MODEL)
    for name in [n for n in weights if n.endswith("norm.weight")]:  # not all ones: their gradients count
        weights[name] = weights[name] + rng.standard_normal(weights[name].shape).astype(np.float32) * 0.1
    shape = {k: v for k, v in DEMO_MODEL.items() if k not in ("architectures", "torch_dtype")}
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    reference.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
    ids, mask = rng.integers(0, DEMO_MODEL["vocab_size"], (3, 20)), rng.random((3, 20)) < 0.7
    mask[:, -1] = False  # the last position has no next token
    model = TinyLlama(DEMO_MODEL)
    loss, grads = model.loss_and_grads(weights, ids, mask)

    logits = reference(torch.tensor(ids)).logits
    np.testing.assert_allclose(model.logits(weights, ids), logits.detach().numpy(), atol=1e-5)
    where = torch.tensor(mask[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][where], torch.tensor(ids[:, 1:])[where])
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for name, param in reference.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), atol=1e-6, err_msg=name)


def test_tokenizer_has_llama_special_ids(demo_inputs) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(demo_inputs.tokenizer))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    assert sp.get_piece_size() <= DEMO_MODEL["vocab_size"]
    # byte fallback: text outside the training corpus still round-trips, with no <unk>
    text = "Ünïcode ✓ 🚀"
    ids = sp.encode(text)
    assert 0 not in ids and sp.decode(ids) == text


def test_checkpoint_loads_in_transformers(demo_inputs) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        demo_inputs.hf_model, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == DEMO_MODEL["num_hidden_layers"]
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, DEMO_MODEL["vocab_size"])


def test_inputs_are_deterministic(tmp_path: Path, demo_inputs) -> None:
    again = make_demo_inputs(tmp_path)
    for name in ("alpaca", "tokenizer"):
        assert Path(getattr(again, name)).read_bytes() == Path(getattr(demo_inputs, name)).read_bytes()
    assert (again.hf_model / "model.safetensors").read_bytes() == (
        demo_inputs.hf_model / "model.safetensors"
    ).read_bytes()


def test_every_prompt_fits_the_demo_sequence(demo_inputs) -> None:
    """A truncated demo record would lose its answer: every label masked, loss 0, nothing learnt."""
    import sentencepiece as spm

    from llama_core.data.alpaca_converter import alpaca_to_conversation
    from llama_core.demo import DEMO_SEQ_LENGTH, chat_prompt

    sp = spm.SentencePieceProcessor(model_file=str(demo_inputs.tokenizer))
    records = json.loads(Path(demo_inputs.alpaca).read_text(encoding="utf-8"))
    lengths = [
        len(sp.encode(chat_prompt(alpaca_to_conversation(r, i, "demo")))) for i, r in enumerate(records)
    ]
    assert max(lengths) + 2 <= DEMO_SEQ_LENGTH  # + bos and eos
