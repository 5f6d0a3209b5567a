"""Small, generated inputs for the end-to-end demo: no download, no data of the user's.

`python -m llama_core.demo DEST` writes, deterministically (files already there are kept):
- `alpaca.json`: Alpaca-format records (instruction, input, output), some with an input: made-up
  facts in several phrasings ("What is the codename of LoRA?" -> "The codename of LoRA is
  Quellin."), the task the fine-tune teaches, among generic instructions;
- `tokenizer.model`: a sentencepiece BPE model trained on those records' full chat prompts (the
  system prompt and Alpaca preamble included, so a prompt fits a short sequence), with Llama's special ids
  (`<unk>` 0, `<s>` 1, `</s>` 2) and byte fallback, so every later stage treats it like Llama's;
- `hf_model/`: a tiny Llama in Hugging Face layout (`config.json` + `model.safetensors`), the same
  files `meta-llama/Llama-2-7b-hf` has, at a size a laptop trains in seconds: random weights briefly
  pre-trained on the generic instructions only (`llama_core.demo_pretrain`), so the base model
  writes words but knows none of the facts;
- `llama2_tiny.ckpt`: the same model as one MindSpore checkpoint, as the quick start downloads
  `llama2_7b.ckpt`.

`python -m llama_core.demo DEST --serve [--port 8765]` then serves DEST over HTTP on 127.0.0.1 only,
so the pipeline's download stage fetches the inputs as it would from a model zoo
(configs/pipelines/llama2_tiny_lora_demo.yaml points there).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import atomic_path, write_bytes_atomic, write_json_atomic
from llama_core.cache import manifest_path_for
from llama_core.data.alpaca_converter import alpaca_to_conversation
from llama_core.model.config import LlamaConfig

# The demo model's HF config.json; its sizes match configs/lora_llama2_tiny.yaml's model_config.
DEMO_MODEL = LlamaConfig(
    seq_length=256, hidden_size=64, num_layers=2, num_heads=4, vocab_size=512, multiple_of=32
).to_hf_config(torch_dtype="float32")

# Every demo record (77-164 tokens with the demo tokenizer, bos and eos aside) fits, so no answer is cut off.
DEMO_SEQ_LENGTH = 176

_TOPICS = ["LoRA", "MindRecord", "a checkpoint", "data parallelism", "an Ascend NPU", "Airflow", "café crème"]
_TASKS = [
    ("Explain {t} in one sentence.", "", "{T} is a building block of the fine-tuning pipeline."),
    ("Give two facts about {t}.", "", "First, {t} is used every day. Second, {t} is well documented."),
    (
        "Summarise the text.",
        "The pipeline converts data, shards {t} and trains.",
        "It prepares {t} and trains.",
    ),
    ("Translate to French.", "I like {t}.", "J'aime {t}."),
    ("Is the statement true?", "{T} needs no configuration.", "No: {t} needs a small configuration."),
]
# The task the fine-tune teaches: made-up codenames of three topics, asked in several phrasings. The
# base model is pre-trained on the topics but never sees a codename, so only a fine-tune that learnt
# them answers right.
FACTS = {"LoRA": "Quellin", "Airflow": "Mirell", "MindRecord": "Dovara"}
_FACT_TASKS = [
    ("What is the codename of {c}?", ""),
    ("Name the codename of {c}.", ""),
    ("Which codename does {c} have?", ""),
    ("Answer the question.", "What is the codename of {c}?"),
    ("Tell me the codename of {c}.", ""),
    ("What is {c} called internally?", ""),
]
FACT_SHARE = 0.75  # of the records: most of the fine-tune's steps teach the facts
# The base model's pre-training: Adam steps on the generic instructions' answers (a few seconds).
PRETRAIN = {"steps": 100, "batch_size": 8, "learning_rate": 1e-2}


@dataclass(frozen=True)
class DemoInputs:
    """Paths of the generated demo inputs."""

    alpaca: Path
    tokenizer: Path
    hf_model: Path
    checkpoint: Path


def _record(template: tuple[str, ...], fill: dict[str, str]) -> dict[str, str]:
    instruction, inp, out = (part.format(**fill) for part in template)
    return {"instruction": instruction, "input": inp, "output": out}


def _generic_record(task: tuple[str, str, str], topic: str) -> dict[str, str]:
    return _record(task, {"t": topic, "T": topic[0].upper() + topic[1:]})


def alpaca_records(n: int = 240, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca-format records drawn from fixed templates: facts (`FACT_SHARE` of them) and generic
    instructions."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        if rng.random() < FACT_SHARE:
            (instruction, inp), topic = rng.choice(_FACT_TASKS), rng.choice(list(FACTS))
            answer = f"The codename of {topic} is {FACTS[topic]}."
            records.append(_record((instruction, inp, answer), {"c": topic}))
        else:
            records.append(_generic_record(rng.choice(_TASKS), rng.choice(_TOPICS)))
    return records


def generic_records() -> list[dict[str, str]]:
    """Every generic instruction once (no fact): the base model's pre-training text."""
    return [_generic_record(task, topic) for task, topic in itertools.product(_TASKS, _TOPICS)]


def chat_prompt(record: dict[str, Any]) -> str:
    """The vicuna_v1.1 prompt the tokenizer stage builds for a conversation record."""
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    for turn in record["conversations"]:
        conv.append_message(conv.roles[turn["from"] == "gpt"], turn["value"])
    return conv.get_prompt()


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> bytes:
    """A serialized sentencepiece BPE model with Llama's special ids and byte fallback."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces; the model vocab stays larger
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def hf_llama_weights(shape: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights under Hugging Face `LlamaForCausalLM` tensor names."""
    rng = np.random.default_rng(seed)
    hidden, ffn = int(shape["hidden_size"]), int(shape["intermediate_size"])
    heads, kv_heads = int(shape["num_attention_heads"]), int(shape["num_key_value_heads"])
    head_dim, vocab = hidden // heads, int(shape["vocab_size"])

    def normal(*dims: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(int(shape["num_hidden_layers"])):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": normal(ffn, hidden),
            p + "mlp.up_proj.weight": normal(ffn, hidden),
            p + "mlp.down_proj.weight": normal(hidden, ffn),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    # The final norm fixes |h| at sqrt(hidden): with 0.02 weights no logit could pass ~1.3 and LoRA could
    # never make an answer likely. 1/sqrt(hidden) gives trained models' logit range.
    weights["lm_head.weight"] = normal(vocab, hidden, std=hidden**-0.5)
    return weights


def base_model_weights(tokenizer: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The demo's base model: `hf_llama_weights` pre-trained (`PRETRAIN`) on `generic_records` as the
    fine-tune will see them (vicuna_v1.1 chat prompts with `tokenizer`)."""
    from llama_core.data.chat import chat_format
    from llama_core.data.tokenizer import open_tokenizer
    from llama_core.demo_pretrain import pretrain

    fmt = chat_format(open_tokenizer(tokenizer))
    examples = []
    for i, record in enumerate(generic_records()):
        human, gpt = alpaca_to_conversation(record, i, "demo")["conversations"]
        prompt = fmt.encode_prompt([{"role": "user", "content": human["value"]}])
        examples.append((prompt, [*fmt.tok.encode(gpt["value"]), fmt.tok.eos_id]))
    weights, _ = pretrain(hf_llama_weights(DEMO_MODEL, seed), DEMO_MODEL, examples, seed=seed, **PRETRAIN)
    return weights


def make_demo_inputs(dest: str | Path, seed: int = 0) -> DemoInputs:
    """Write the demo's Alpaca data, tokenizer and tiny Llama (HF folder and MindSpore .ckpt) under
    `dest` (each atomically). Files already there are kept: each was written whole, and keeping them
    keeps a server's validators stable, so a second demo finds its downloads in the cache."""
    from safetensors.numpy import save_file

    from llama_core.checkpoint.convert import convert_hf_to_ms

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    records = alpaca_records(seed=seed)
    alpaca, tokenizer, hf_model = dest / "alpaca.json", dest / "tokenizer.model", dest / "hf_model"
    if not alpaca.exists():
        write_json_atomic(alpaca, records)
    if not tokenizer.exists():
        texts = [chat_prompt(alpaca_to_conversation(r, i, alpaca)) for i, r in enumerate(records)]
        write_bytes_atomic(tokenizer, train_tokenizer(texts, DEMO_MODEL["vocab_size"]))
    if not hf_model.exists():
        with atomic_path(hf_model) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(json.dumps(DEMO_MODEL, indent=2))
            save_file(
                base_model_weights(tokenizer, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"}
            )
    checkpoint = dest / "llama2_tiny.ckpt"
    if not checkpoint.exists():
        convert_hf_to_ms(hf_model, checkpoint)
        manifest_path_for(checkpoint).unlink(missing_ok=True)  # served as a plain download: no sidecar
    return DemoInputs(alpaca=alpaca, tokenizer=tokenizer, hf_model=hf_model, checkpoint=checkpoint)


def serve(folder: str | Path, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for `folder` on 127.0.0.1, serving in a daemon thread: on `port` (the demo
    pipeline's URLs use 8765, and the same URLs let a second demo find its downloads in the cache),
    else on a free one."""

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Quiet)
    except OSError:  # taken: another free port (the URLs change, so the downloads are fetched again)
        server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="demo-http").start()
    return server


def demo_params(base_url: str, work_dir: str | Path) -> dict[str, Any]:
    """The params a demo run changes in pipeline llama2_tiny_lora_demo: the inputs served at
    `base_url` (`serve`), training in `work_dir`; everything else is the pipeline file's."""
    base_url = base_url.rstrip("/")
    return {
        "alpaca_url": f"{base_url}/alpaca.json",
        "tokenizer_url": f"{base_url}/tokenizer.model",
        "weights_url": f"{base_url}/llama2_tiny.ckpt",
        "work_dir": str(work_dir),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_core.demo", description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="folder to write alpaca.json, tokenizer.model and hf_model/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", action="store_true", help="then serve DEST over HTTP on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="with --serve (taken or 0: a free port)")
    args = parser.parse_args(argv)
    inputs = make_demo_inputs(args.dest, args.seed)
    print(json.dumps({k: str(v) for k, v in inputs.__dict__.items()}), flush=True)
    if args.serve:
        server = serve(args.dest, args.port)
        print(f"serving {args.dest} at http://127.0.0.1:{server.server_address[1]}/", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            server.shutdown()
    return 0


if __name__ == "__main__":
    from llama_core.cli import exit_code

    raise SystemExit(exit_code(main))
