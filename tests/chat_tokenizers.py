"""The tokenizers of the chat formats beside vicuna_v1.1, for tests.

- Llama 3: Meta's own tokenizer.model, as the `llama-models` package ships it (beside Meta's
  `Tokenizer` and `ChatFormat`, the reference).
- HF: a small Qwen-style tokenizer folder built here: a byte-level BPE trained on the Alpaca sample
  with Qwen2's pre-tokenizer layout (NFC, a split regex, byte-level), `<|endoftext|>`, `<|im_start|>`
  and `<|im_end|>` added after the vocabulary, eos `<|im_end|>`, and a ChatML template with a
  default system message (as Qwen's has). ChatML marks the assistant's content and its `<|im_end|>`
  with transformers' `{% generation %}` tags, so `apply_chat_template(...,
  return_assistant_tokens_mask=True)` gives the reference labels.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from llama_core.data.chat import CHATML_TEMPLATE

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# the split regex of Qwen2's tokenizer.json (digits one at a time, unlike Llama 3's \p{N}{1,3})
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SYSTEM = "You are a careful assistant. Answer the request below as well as you can."


def chatml_template(system: str | None) -> str:
    """Our own ChatML template with `system` as its default system message (as Qwen's has; none when
    None): the system turn, then the built-in ChatML (whose generation tags mark the assistant's
    content and <|im_end|>)."""
    if system is None:
        return CHATML_TEMPLATE
    turn = "{{- '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
    return "{%- if messages[0]['role'] != 'system' %}" + turn + "{%- endif %}" + CHATML_TEMPLATE


CHATML_WITH_SYSTEM = chatml_template(SYSTEM)


def llama3_model() -> Path:
    """Meta's Llama 3 tokenizer.model inside the installed llama_models package."""
    spec = importlib.util.find_spec("llama_models.llama3")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-models is not installed (pip install -e .[test])")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.model"


def build_hf_tokenizer(
    folder: Path, texts: Iterable[str], chat_template: str | None, vocab: int = 3000
) -> Path:
    """A Qwen-style HF tokenizer folder (see the module doc) trained on `texts`."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(SPECIALS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    ids = [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder
