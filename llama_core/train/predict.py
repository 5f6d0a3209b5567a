"""run_mode eval (loss/perplexity of a checkpoint on MindRecord data) and predict (greedy generation)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import mindspore as ms
import numpy as np

from llama_core.atomic import write_json_atomic
from llama_core.config import TrainConfig
from llama_core.errors import ConfigError, InputError
from llama_core.train.components import build_model, evaluate, load_base, setup_context
from llama_core.train.dataset import inspect_dataset

logger = logging.getLogger("llama_core.train")


def _model_for_inference(tc: TrainConfig) -> ms.nn.Cell:
    rt = setup_context(tc)
    ms.set_seed(tc.seed)
    model = build_model(tc)
    if not tc.load_checkpoint:
        raise ConfigError(f"run_mode {tc.run_mode} needs --load_checkpoint")
    load_base(model, tc, rt.rank)
    model.set_train(False)
    return model


def evaluate_checkpoint(tc: TrainConfig) -> tuple[float, float]:
    """Eval loss and perplexity of `load_checkpoint` on the eval dataset; writes OUTPUT/eval_summary.json."""
    if not tc.eval_dataset_dir:
        raise ConfigError("run_mode eval needs eval_dataset.data_loader.dataset_dir or --eval_dataset_dir")
    model = _model_for_inference(tc)
    loss, ppl = evaluate(model, inspect_dataset(tc.eval_dataset_dir), tc.batch_size, tc.seq_length)
    logger.info("eval loss=%.6f perplexity=%.4f", loss, ppl)
    write_json_atomic(
        Path(tc.output_dir) / "eval_summary.json",
        {
            "eval_loss": loss,
            "eval_perplexity": ppl,
            "checkpoint": tc.load_checkpoint,
            "data": tc.eval_dataset_dir,
        },
    )
    return loss, ppl


def greedy_generate(
    model: ms.nn.Cell,
    prompt_ids: list[int],
    *,
    seq_length: int,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None = None,
    stop_ids: Collection[int] = (),
    vocab_limit: int | None = None,
) -> list[int]:
    """Greedy decoding without a KV cache: the sequence is padded to `seq_length` (one compiled shape;
    causal attention makes the padding invisible to earlier positions) and the next token is the
    argmax at the last real position, over ids < `vocab_limit` (a model vocab may be padded beyond
    the tokenizer's pieces). Generation ends at `eos_id` or any of `stop_ids` (a chat format's end of
    turn). Returns only the new tokens (the stop token excluded)."""
    stops = {*stop_ids, *(() if eos_id is None else (eos_id,))}
    ids = list(prompt_ids)
    if len(ids) >= seq_length:
        raise InputError(f"prompt has {len(ids)} tokens; it must be shorter than seq_length {seq_length}")
    new: list[int] = []
    while len(new) < max_new_tokens and len(ids) < seq_length:
        buf = np.full((1, seq_length), pad_id, np.int32)
        buf[0, : len(ids)] = ids
        logits = model(ms.Tensor(buf)).asnumpy()
        nxt = int(np.argmax(logits[0, len(ids) - 1, :vocab_limit]))
        if nxt in stops:
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def predict_prompts(tc: TrainConfig, prompts: Sequence[str]) -> list[tuple[str, str]]:
    """Greedy completions of `prompts` with the sentencepiece tokenizer (bos prepended, as in training).

    Writes OUTPUT/predict_results.json and returns (prompt, completion) pairs.
    """
    import sentencepiece as spm

    if not tc.vocab_file:
        raise ConfigError("run_mode predict needs --tokenizer or processor.tokenizer.vocab_file")
    if not Path(tc.vocab_file).is_file():
        raise InputError(f"tokenizer not found: {tc.vocab_file}")
    sp = spm.SentencePieceProcessor(model_file=str(tc.vocab_file))
    mc = tc.model_config
    model = _model_for_inference(tc)
    out = []
    for prompt in prompts:
        ids = [int(mc.get("bos_token_id", 1)), *sp.encode(prompt)]
        new = greedy_generate(
            model,
            ids,
            seq_length=tc.seq_length,
            max_new_tokens=int(mc.get("max_decode_length", 128)),
            eos_id=int(mc.get("eos_token_id", 2)),
            pad_id=int(mc.get("pad_token_id", 0)),
            vocab_limit=sp.get_piece_size(),
        )
        out.append((prompt, sp.decode(new)))
    write_json_atomic(
        Path(tc.output_dir) / "predict_results.json", [{"prompt": p, "output": t} for p, t in out]
    )
    return out
