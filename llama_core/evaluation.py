"""Did the fine-tune help? The base and the fine-tuned model side by side, in one JSON.

Both sides get the same eval data (loss, perplexity) and the same instructions (greedy
completions, deterministic), so the JSON answers "better than the base?" at a glance and a re-run
gives the same text. One LoRA model is built and compiled once for both sides: with every LoRA B
at zero it computes the base model exactly, then the fine-tuned weights are loaded over it.

`python -m llama_core.evaluation --config CFG --base_checkpoint B --finetuned_checkpoint F
     --output_path OUT.json [--eval_data D] [--prompt P ...] [--prompts_file JSON_LIST]
     [--tokenizer T] [--chat_template NAME] [--max_new_tokens N] [--seq_length N]
     [--device_target CPU|Ascend]`

A prompt may name its expected answer (`{"prompt": ..., "expect": ...}` in the prompts file): each
side's generation then records whether it contains that text (`right`), so "did it learn the task?"
is a count, not a reading.

prints the result as its last stdout line. Cached like the other stages: `OUT.json.manifest.json`
(written last) records the key of the inputs' content and the settings; an identical re-run
returns the stored result without building the model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_core.atomic import clean_leftovers, disk_full_stage, write_json_atomic
from llama_core.cache import StageKey, manifest_path_for, write_manifest
from llama_core.checkpoint.msckpt import scan_ckpt
from llama_core.checkpoint.names import lora_pairs
from llama_core.checkpoint.unshard import complete_checkpoint
from llama_core.cli import exit_code
from llama_core.config import TrainConfig, load_config, set_key
from llama_core.data.alpaca_converter import PROMPT_NO_INPUT
from llama_core.data.chat import CHAT_TEMPLATES, ChatFormat, Message, chat_format
from llama_core.data.prompts import TEMPLATE, holds_answer, split_prompts
from llama_core.errors import ConfigError, InputError
from llama_core.results import to_jsonable
from llama_core.train.dataset import mindrecord_files
from llama_core.train.outputs import checkpoint_file

# MindSpore is imported only past the cache check: a hit builds nothing.

logger = logging.getLogger("llama_core.train")

GENERATION_ALIGN = 128  # decoding lengths are multiples of this: few graphs, little padding

STAGE = "evaluation"
FORMAT_VERSION = 2  # 2: generations record their expected answer and whether they hold it


@dataclass
class ModelEvaluation:
    """One side of the comparison."""

    checkpoint: str  # the file its weights came from
    eval_loss: float | None  # None when no eval data
    eval_perplexity: float | None
    # [{"prompt": instruction, "output": completion}], in prompt order; with an expected answer also
    # "expect" and "right" (the completion contains it)
    generations: list[dict[str, Any]]


@dataclass
class EvaluationResult:
    """The base and the fine-tuned model on the same data and prompts; also the output JSON."""

    output_path: str  # the JSON written (this result)
    eval_data: str | None
    eval_batches: int
    prompts: list[str]
    max_new_tokens: int
    base: ModelEvaluation
    finetuned: ModelEvaluation
    seconds: float
    cached: bool

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> EvaluationResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in doc.items() if k in fields}
        for side in ("base", "finetuned"):
            values[side] = ModelEvaluation(**values[side])
        return cls(**values)


# -- inputs
def eval_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files a MindRecord dataset reads: its data files and their `.db` index companions.

    A file named `<name><digits>` may be one shard of several (`--file_partition`), which MindSpore
    opens together: its sibling shards count too (more files in the key never give a false hit).
    """
    found = mindrecord_files(path)
    files = [Path(found)] if isinstance(found, str) else [Path(f) for f in found]
    if len(files) == 1 and (m := re.fullmatch(r"(.*?)\d+", files[0].name)):
        shard = re.compile(re.escape(m[1]) + r"\d+")
        files = sorted(p for p in files[0].parent.iterdir() if p.is_file() and shard.fullmatch(p.name))
    out = []
    for f in files:
        out.append(f)
        if (db := f.with_name(f.name + ".db")).is_file():
            out.append(db)
    return out


def require_lora(path: Path) -> int:
    """The number of LoRA-adapted linears in a checkpoint; InputError naming it when it has none."""
    pairs = lora_pairs({e.name: tuple(e.shape) for e in scan_ckpt(path)})
    if not pairs:
        raise InputError(
            f"{path}: no LoRA weights (mindpet_delta_lora_a/b) found: not a LoRA fine-tuned checkpoint"
        )
    return len(pairs)


def instruction_messages(instruction: str) -> list[Message]:
    """An instruction as the model saw it in training: the Alpaca preamble around it (as
    `alpaca_to_conversation` writes a record without input), as the user's message."""
    return [{"role": "user", "content": PROMPT_NO_INPUT.format_map({"instruction": instruction})}]


def encode_prompts(fmt: ChatFormat, prompts: Sequence[str], seq_length: int) -> list[list[int]]:
    """Token ids of each prompt in chat format `fmt`, the assistant's turn opened (as in training:
    vicuna_v1.1 gives "<s>... USER: Below is an instruction ... ASSISTANT:"); a prompt that leaves no
    room to generate within seq_length fails naming its index."""
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i}: must be a string, got {type(prompt).__name__}")
        ids = fmt.encode_prompt(instruction_messages(prompt))
        if len(ids) >= seq_length:
            raise InputError(
                f"prompt {i}: {len(ids)} tokens with the {fmt.name} template; it must be shorter than "
                f"seq_length {seq_length} to leave room for the answer"
            )
        out.append(ids)
    return out


def resolve_config(
    config: str | os.PathLike[str] | Mapping[str, Any], seq_length: int | None, device_target: str | None
) -> TrainConfig:
    """The run config with the overrides applied, on one device (model_parallel 1)."""
    cfg = copy.deepcopy(dict(config)) if isinstance(config, Mapping) else load_config(config)
    if seq_length is not None:
        if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 2:
            raise ConfigError(f"seq_length must be an integer >= 2, got {seq_length!r}")
        set_key(cfg, "model.model_config.seq_length", seq_length)
    if device_target is not None:
        set_key(cfg, "context.device_target", device_target)
    set_key(cfg, "use_parallel", False)
    # one process on the whole checkpoint, whatever layout the fine-tune trained with
    set_key(cfg, "parallel_config.model_parallel", 1)
    return TrainConfig.from_dict(cfg)


# -- the model
def _zero_lora_b(model: Any) -> int:
    """Set every LoRA B to zero; return how many were not zero already.

    LoRA adds B(A(x)) * alpha / r to each adapted linear: with B = 0 that term is exactly zero,
    so the LoRA model computes the base model bit for bit (whatever A holds) and one model, one
    compiled graph, serves both sides. B starts at zero, but a base checkpoint may carry an
    adapter (a full training checkpoint passed as the base): zeroing makes the base side the
    base model either way.
    """
    import mindspore as ms
    import numpy as np

    changed = 0
    for param in model.get_parameters():
        if param.name.endswith("lora_b"):
            if np.any(param.asnumpy() != 0):
                changed += 1
            param.set_data(ms.Tensor(np.zeros(param.shape, np.float32), dtype=param.dtype))
    return changed


def _side(model: Any, plan: _Plan, checkpoint: Path, data: Any, stop_ids: frozenset[int]) -> ModelEvaluation:
    """Eval loss and completions of the weights the model holds now."""
    from llama_core.train.components import evaluate
    from llama_core.train.predict import greedy_generate

    tc, tok = plan.tc, plan.fmt.tok if plan.fmt is not None else None  # no tokenizer: no prompts
    loss = ppl = None
    if data is not None:
        loss, ppl = evaluate(model, data, tc.batch_size, tc.seq_length)
    model.set_train(False)  # evaluate leaves the model in training mode (LoRA dropout on)
    generations = []
    # Decoding pads every step to one length (one compiled graph), so the length is what each new token
    # costs: the longest prompt plus its answer, rounded up to 128, instead of a 4096-token sequence.
    longest = max((len(ids) for ids in plan.prompt_ids), default=0) + plan.new_tokens
    length = min(tc.seq_length, -(-longest // GENERATION_ALIGN) * GENERATION_ALIGN)
    for prompt, expect, ids in zip(plan.prompts, plan.expected, plan.prompt_ids, strict=True):
        new = greedy_generate(
            model,
            ids,
            seq_length=length,
            max_new_tokens=plan.new_tokens,
            stop_ids=stop_ids,
            pad_id=int(tc.model_config.get("pad_token_id", 0)),
            vocab_limit=tok.vocab_size,
        )
        output = tok.decode(new)
        generations.append({"prompt": prompt, "output": output})
        if expect is not None:
            generations[-1] |= {"expect": expect, "right": holds_answer(output, expect)}
    return ModelEvaluation(str(checkpoint), loss, ppl, generations)


# -- the stage
@dataclass
class _Plan:
    """A checked evaluation request: config, inputs, encoded prompts and cache key."""

    tc: TrainConfig
    out: Path
    base_file: Path
    tuned_file: Path
    eval_data: str | os.PathLike[str] | None
    prompts: list[str]
    expected: list[str | None]  # per prompt: the answer it must contain (None: unchecked)
    new_tokens: int
    fmt: ChatFormat | None  # None: no tokenizer (then no prompts)
    prompt_ids: list[list[int]]
    key: StageKey


@disk_full_stage("evaluate", "output_path")
def evaluate_finetune(
    config: str | os.PathLike[str] | Mapping[str, Any],
    base_checkpoint: str | os.PathLike[str],
    finetuned_checkpoint: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    eval_data: str | os.PathLike[str] | None = None,
    prompts: Sequence[str | Mapping[str, Any]] = (),
    tokenizer: str | os.PathLike[str] | None = None,
    chat_template: str | None = None,
    max_new_tokens: int | None = None,
    seq_length: int | None = None,
    device_target: str | None = None,
) -> EvaluationResult:
    """Evaluate the base and the fine-tuned model side by side; write the result JSON at
    `output_path` (atomic, cached) and return it.

    `prompts` are instructions, or `{"prompt", "expect"}` objects naming the answer each must
    contain (`split_prompts`). `tokenizer` (any `open_tokenizer` reads) defaults to the config's
    processor.tokenizer.vocab_file; `chat_template` (how prompts are wrapped, what ends an answer) to
    the tokenizer's (`default_chat_template`); `max_new_tokens` to model_config.max_decode_length.
    """
    t0 = time.monotonic()
    plan = _plan(config, base_checkpoint, finetuned_checkpoint, output_path, eval_data, prompts, tokenizer,
                 chat_template, max_new_tokens, seq_length, device_target)  # fmt: skip
    if (cached := _cached_result(plan)) is not None:
        return cached
    clean_leftovers(plan.out.parent, plan.out.name)
    manifest_path_for(plan.out).unlink(missing_ok=True)  # the output is about to change
    base, tuned, eval_batches = _compare(plan)
    result = EvaluationResult(
        output_path=str(plan.out),
        eval_data=str(eval_data) if eval_data is not None else None,
        eval_batches=eval_batches,
        prompts=plan.prompts,
        max_new_tokens=plan.new_tokens,
        base=base,
        finetuned=tuned,
        seconds=round(time.monotonic() - t0, 3),
        cached=False,
    )
    _log_comparison(result)
    write_json_atomic(plan.out, to_jsonable(result))
    write_manifest(manifest_path_for(plan.out), stage=STAGE, key=plan.key.value(), outputs=[plan.out])
    return result


def _plan(
    config: str | os.PathLike[str] | Mapping[str, Any],
    base_checkpoint: str | os.PathLike[str],
    finetuned_checkpoint: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    eval_data: str | os.PathLike[str] | None,
    prompts: Sequence[str | Mapping[str, Any]],
    tokenizer: str | os.PathLike[str] | None,
    chat_template: str | None,
    max_new_tokens: int | None,
    seq_length: int | None,
    device_target: str | None,
) -> _Plan:
    """Check every argument (before any model is built) and compute the cache key."""
    tc = resolve_config(config, seq_length, device_target)
    mc = tc.model_config
    if not tc.pet_config:
        raise ConfigError("model.model_config.pet_config is empty: a LoRA config is needed to compare")
    prompts, expected = split_prompts(prompts)
    new_tokens = int(max_new_tokens if max_new_tokens is not None else mc.get("max_decode_length", 128))
    if new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {new_tokens}")
    tokenizer = tokenizer or tc.vocab_file or None
    if prompts and tokenizer is None:
        raise ConfigError("prompts need a tokenizer: pass --tokenizer or set processor.tokenizer.vocab_file")
    fmt = None
    if tokenizer is not None:
        from llama_core.data.tokenizer import open_tokenizer

        fmt = chat_format(open_tokenizer(tokenizer), chat_template)
    prompt_ids = encode_prompts(fmt, prompts, tc.seq_length) if fmt is not None else []
    base_file = checkpoint_file(base_checkpoint, "base checkpoint")
    tuned_file = complete_checkpoint(finetuned_checkpoint, "fine-tuned checkpoint")
    require_lora(tuned_file)
    data_files = eval_data_files(eval_data) if eval_data is not None else []
    out = Path(output_path)
    params = {
        "prompts": prompts,
        "expected": expected,
        "max_new_tokens": new_tokens,
        "seq_length": tc.seq_length,
        "model_config": mc,
        "pet_config": tc.pet_config,
        "batch_size": tc.batch_size,  # the eval loss is a mean over batches
        "device_target": tc.device_target,
        "template": fmt.name if fmt is not None else TEMPLATE,  # without a tokenizer there are no prompts
        "eval_files": len(data_files),
        "tokenizer": bool(tokenizer),
    }
    inputs = [base_file, tuned_file, *data_files, *(fmt.tok.files if fmt is not None else ())]
    key = StageKey(manifest_path_for(out), STAGE, FORMAT_VERSION, inputs, params)
    return _Plan(
        tc, out, base_file, tuned_file, eval_data, prompts, expected, new_tokens, fmt, prompt_ids, key
    )


def _cached_result(plan: _Plan) -> EvaluationResult | None:
    """The stored result when the key hits and the output reads back."""
    if plan.key.hit() is None:
        return None
    try:
        result = EvaluationResult.from_dict(json.loads(plan.out.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: cached result unreadable (%s); evaluating again", plan.out, exc)
        return None
    logger.info("%s is up to date (cache hit, key %s): nothing to do", plan.out, plan.key.value()[:12])
    result.output_path, result.cached = str(plan.out), True
    return result


def _compare(plan: _Plan) -> tuple[ModelEvaluation, ModelEvaluation, int]:
    """Both sides on one compiled LoRA model (LoRA B zeroed for the base); and the eval batches."""
    import mindspore as ms

    from llama_core.model.weights import load_weights
    from llama_core.train.components import build_model, setup_context
    from llama_core.train.dataset import inspect_dataset

    tc = plan.tc
    setup_context(tc)
    ms.set_seed(tc.seed)
    data = inspect_dataset(plan.eval_data) if plan.eval_data is not None else None
    model = build_model(tc)  # the LoRA model: one graph for both sides
    model.set_train(False)
    # the model's own eos ends an answer too (vicuna_v1.1's only stop, as before chat formats)
    stop_ids = frozenset(
        {int(tc.model_config.get("eos_token_id", 2)), *(plan.fmt.stop_ids if plan.fmt else ())}
    )

    load_weights(model, plan.base_file)
    if changed := _zero_lora_b(model):
        logger.warning(
            "%s holds %d non-zero LoRA B weights: ignored, the base side is the model without adapter",
            plan.base_file,
            changed,
        )
    base = _side(model, plan, plan.base_file, data, stop_ids)
    load_weights(model, plan.tuned_file, lora_over_base=True)
    tuned = _side(model, plan, plan.tuned_file, data, stop_ids)
    return base, tuned, math.ceil(data.num_records / tc.batch_size) if data is not None else 0


def _log_comparison(result: EvaluationResult) -> None:
    base, tuned = result.base, result.finetuned
    if base.eval_loss is not None and tuned.eval_loss is not None:
        logger.info(
            "eval loss base %.6f (perplexity %.4f) -> fine-tuned %.6f (perplexity %.4f), %+.6f on %s",
            base.eval_loss,
            base.eval_perplexity,
            tuned.eval_loss,
            tuned.eval_perplexity,
            tuned.eval_loss - base.eval_loss,
            result.eval_data,
        )
    for i, (b, t) in enumerate(zip(base.generations, tuned.generations, strict=True)):
        logger.info("prompt %d %r: base %r | fine-tuned %r", i, b["prompt"], b["output"], t["output"])
    checked = [
        (b["right"], t["right"])
        for b, t in zip(base.generations, tuned.generations, strict=True)
        if "right" in b
    ]
    if checked:
        n = len(checked)
        right_base, right_tuned = sum(b for b, _ in checked), sum(t for _, t in checked)
        logger.info("answers holding their expected text: base %d/%d, fine-tuned %d/%d", right_base, n,
                    right_tuned, n)  # fmt: skip


# -- CLI
def read_prompts_file(path: str | os.PathLike[str]) -> list[str | dict[str, Any]]:
    """A JSON list of instructions: strings, or `{"prompt", "expect"}` objects (`split_prompts`)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: prompts file not readable ({exc})") from exc
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, list) or not all(isinstance(p, (str, dict)) for p in doc):
        raise InputError(f"{path}: must be a JSON list of strings or {{prompt, expect}} objects")
    return doc


def build_parser(prog: str = "python -m llama_core.evaluation") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compare the base and the fine-tuned model: eval loss/perplexity and greedy completions.",
    )
    p.add_argument("--config", required=True, help="training YAML (model_config, pet_config, batch_size)")
    p.add_argument("--base_checkpoint", required=True, help="base .ckpt, or folder with rank_<i>/")
    p.add_argument(
        "--finetuned_checkpoint",
        required=True,
        help="training .ckpt, rank_<i>/ folder, or a run's checkpoint/ folder (rank 0's newest)",
    )
    p.add_argument("--output_path", required=True, help="result JSON to write")
    p.add_argument("--eval_data", help="MindRecord file or folder (llama_preprocess output)")
    p.add_argument("--prompt", action="append", default=[], help="an instruction (repeatable)")
    p.add_argument(
        "--prompts_file",
        help='JSON list of instructions, or {"prompt": ..., "expect": answer text} objects (after the '
        "--prompt ones)",
    )
    p.add_argument(
        "--tokenizer",
        help="sentencepiece or Llama 3 tokenizer.model, or HF tokenizer folder (default: "
        "processor.tokenizer.vocab_file)",
    )
    p.add_argument(
        "--chat_template",
        choices=CHAT_TEMPLATES,
        help="chat format of the prompts and their stop tokens (default: the tokenizer's, as in training)",
    )
    p.add_argument("--max_new_tokens", type=int, help="default: model_config.max_decode_length")
    p.add_argument("--seq_length", type=int, help="overrides model.model_config.seq_length")
    p.add_argument(
        "--device_target", choices=["CPU", "Ascend", "GPU"], help="overrides context.device_target"
    )
    return p


def stage_from_args(args: argparse.Namespace) -> EvaluationResult:
    """The evaluation the parsed command line asks for."""
    prompts = [*args.prompt, *(read_prompts_file(args.prompts_file) if args.prompts_file else [])]
    return evaluate_finetune(
        args.config,
        args.base_checkpoint,
        args.finetuned_checkpoint,
        args.output_path,
        eval_data=args.eval_data,
        prompts=prompts,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        max_new_tokens=args.max_new_tokens,
        seq_length=args.seq_length,
        device_target=args.device_target,
    )


def main(argv: Sequence[str] | None = None) -> int:
    result = stage_from_args(build_parser().parse_args(argv))
    # the last stdout line, one line of JSON: what a caller running this as a subprocess reads
    print(json.dumps(to_jsonable(result), ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
