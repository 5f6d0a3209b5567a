"""The demo's generated inputs must be what the real ones are: Alpaca records, a Llama-style
sentencepiece model and a checkpoint Hugging Face loads as a LlamaForCausalLM."""

import json
from pathlib import Path

import pytest

from llama_core.demo import DEMO_MODEL, make_demo_inputs


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_inputs(tmp_path_factory.mktemp("demo"))


def test_alpaca_records_have_the_alpaca_keys(demo_inputs) -> None:
    records = json.loads(Path(demo_inputs.alpaca).read_text(encoding="utf-8"))
    assert len(records) == 240
    assert all(set(r) == {"instruction", "input", "output"} for r in records)
    with_input = sum(bool(r["input"]) for r in records)
    assert 0 < with_input < len(records)


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
