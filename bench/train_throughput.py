"""LoRA training throughput on CPU: our MindSpore model + TrainStep against HF transformers + PEFT.

Same model config, same random token ids (fixed seed), same optimizer work (AdamW fp32 states, weight
decay 0, global-norm clipping to 1.0), same thread count. Each engine runs in its own subprocess (so
the two runtimes' thread pools never share a process), warm-up steps excluded, then timed steps.
Also measures the machine's fp32 matmul peak and reports model FLOP utilisation (MFU).

`python -m bench.train_throughput [--steps 8 --warmup 5 --threads 2 --rounds 2 --no-write]`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from llama_core.atomic import write_json_atomic

HIDDEN, LAYERS, HEADS, VOCAB, SEQ, BATCH = 512, 8, 8, 32000, 512, 4
FFN = 1536  # Llama's multiple_of=256 rule for hidden 512: ceil(int(2 * 4 * 512 / 3) / 256) * 256
RANK, ALPHA, DROPOUT = 16, 16, 0.05
SEED = 0
COMMAND = "python -m bench.train_throughput"


def batch_ids() -> np.ndarray:
    """[BATCH, SEQ + 1] random ids in 3..VOCAB-1 (no pad 0, so every position counts in the loss)."""
    return np.random.default_rng(SEED).integers(3, VOCAB, size=(BATCH, SEQ + 1), dtype=np.int32)


def flops_per_step() -> dict[str, float]:
    """Matmul FLOPs of one LoRA training step (tokens T = BATCH*SEQ).

    Frozen Linear weights (attention, MLP, lm_head; N_f): forward 2*N_f*T, backward only the activation
    gradient 2*N_f*T (no weight gradient) -> 4*N_f*T. LoRA weights (N_l): forward 2, backward 4
    (activation + weight gradient) -> 6*N_l*T. Attention scores and weighted sum, full S x S as both
    implementations compute it: forward 4*B*S^2*H per layer, backward 8 -> 12*L*B*S^2*H. The
    embedding gather, norms, softmax and the optimizer are not counted (memory-bound, tiny FLOPs).
    """
    tokens = BATCH * SEQ
    frozen = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN) + VOCAB * HIDDEN
    lora = LAYERS * 4 * RANK * (HIDDEN + HIDDEN)
    attention = 12 * LAYERS * BATCH * SEQ * SEQ * HIDDEN
    total = 4 * frozen * tokens + 6 * lora * tokens + attention
    return {"frozen_params": frozen, "lora_params": lora, "flops": float(total)}


# ---------------------------------------------------------------- engines (run in subprocesses)


def run_mindspore(steps: int, warmup: int, threads: int) -> dict:
    import mindspore as ms
    from mindspore import nn

    from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora
    from llama_core.train.step import TrainStep

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(threads)
    ms.set_seed(SEED)
    config = LlamaConfig(
        seq_length=SEQ,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        vocab_size=VOCAB,
        multiple_of=256,
    )
    assert config.ffn_hidden_size == FFN, config.ffn_hidden_size
    model = LlamaForCausalLM(config)
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT))
    params = model.trainable_params()
    optimizer = nn.AdamWeightDecay(
        params, learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0
    )
    step = TrainStep(model, optimizer, clip_norm=1.0)
    step.set_train()
    ids = ms.Tensor(batch_ids())
    return _timed(lambda: float(step(ids, ids)[0].asnumpy()), steps, warmup, threads, len(params))


def run_torch(steps: int, warmup: int, threads: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        intermediate_size=FFN,
        max_position_embeddings=SEQ,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.from_numpy(batch_ids().astype(np.int64))
    inputs = ids[:, :-1]  # SEQ tokens, as our model's construct(ids[:, :-1]) sees

    def one_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    return _timed(one_step, steps, warmup, torch.get_num_threads(), len(params))


def _timed(one_step, steps: int, warmup: int, threads: int, n_params: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    warm = time.perf_counter() - t0
    times, cpu, losses = [], [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(one_step())
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "step_s": times,
        "cpu_s": cpu,
        "warmup_s": warm,
        "losses": losses,
        "threads": threads,
        "trainable_tensors": n_params,
    }


def matmul_peak(threads: int) -> dict:
    """Best fp32 GFLOP/s of a 2048^3 matmul, torch and numpy, with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    n = 2048
    out = {}
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(20))
    out["torch"] = 2 * n**3 / best / 1e9
    an, bn = a.numpy(), b.numpy()
    an @ bn
    best = min(_time(lambda: an @ bn) for _ in range(5))
    out["numpy"] = 2 * n**3 / best / 1e9
    return out


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------- driver


def _engine(name: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        "-m",
        "bench.train_throughput",
        "--engine",
        name,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} engine failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per engine and round")
    # MindSpore's first 4 or so steps after compiling were measured ~30% slower than its steady state
    # (torch shows no such ramp): a training run lives in the steady state, so both skip 5
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph compile etc.)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the engines this many times")
    parser.add_argument("--no-write", action="store_true", help="print only; don't update docs/BENCHMARKS.md")
    parser.add_argument("--engine", choices=["mindspore", "torch", "peak"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        fn = {"mindspore": run_mindspore, "torch": run_torch}.get(args.engine)
        res = matmul_peak(args.threads) if fn is None else fn(args.steps, args.warmup, args.threads)
        print(json.dumps(res))
        return 0

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"mindspore": [], "torch": []}
    for _ in range(args.rounds):
        for name in runs:
            runs[name].append(_engine(name, args))
            print(name, json.dumps(runs[name][-1]), flush=True)
    peak = _engine("peak", args)
    load_after = os.getloadavg()[0]
    fl = flops_per_step()
    tokens = BATCH * SEQ
    peak_gflops = max(peak.values())
    rows = {}
    for name, results in runs.items():
        times = [t for r in results for t in r["step_s"]]
        med = statistics.median(times)
        rows[name] = {
            "median_s": med,
            "min_s": min(times),
            "cpu_s": statistics.median(c for r in results for c in r["cpu_s"]),
            "tok_s": tokens / med,
            "tok_s_best": tokens / min(times),
            "mfu": fl["flops"] / med / 1e9 / peak_gflops,
            "threads": results[0]["threads"],
            "first_loss": results[0]["losses"][0],
            "warmup_s": results[0]["warmup_s"],
            "n": len(times),
        }
    speedup = rows["mindspore"]["tok_s"] / rows["torch"]["tok_s"]
    summary = {
        "rows": rows,
        "speedup": speedup,
        "speedup_best": rows["mindspore"]["tok_s_best"] / rows["torch"]["tok_s_best"],
        "speedup_cpu": rows["torch"]["cpu_s"] / rows["mindspore"]["cpu_s"],
        "peak_gflops": peak,
        "flops": fl,
        "load": [load_before, load_after],
    }
    print(json.dumps(summary, indent=1))
    from bench.report import WORK_DIR

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    write_json_atomic(WORK_DIR / "train_throughput.json", {"runs": runs, "summary": summary})
    if not args.no_write:
        from bench.report import update_section

        update_section("train_throughput", "LoRA training throughput (CPU)", COMMAND, _body(summary, args))
    return 0


def _body(s: dict, args: argparse.Namespace) -> str:
    r, fl = s["rows"], s["flops"]
    label = {
        "mindspore": "llama_core (MindSpore 2.10 graph mode, TrainStep)",
        "torch": "HF transformers 5.24 + PEFT 0.21 (torch 2.13, eager, sdpa)",
    }
    lines = [
        f"Model: hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, FFN {FFN}, vocab {VOCAB}, seq {SEQ}, "
        f"batch {BATCH} ({BATCH * SEQ} tokens/step), fp32; LoRA r{RANK}/alpha{ALPHA}/dropout {DROPOUT} on "
        f"q,k,v,o ({fl['lora_params']:,} trainable, {fl['frozen_params']:,} frozen matmul weights). "
        f"AdamW fp32 states, weight decay 0, clip 1.0. Same random ids (seed {SEED}). "
        f"{args.warmup} warm-up steps excluded (MindSpore's first steps after compiling run ~30% slower "
        f"than its steady state; torch has no such ramp), {args.steps} timed steps x {args.rounds} round(s) "
        f"per engine, "
        f"engines in separate processes, run one after the other. 1-min load {s['load'][0]:.2f} before, "
        f"{s['load'][1]:.2f} after.",
        "",
        "| engine | threads | median step s | min step s | median CPU s/step | tokens/s (median) | "
        "tokens/s (best step) | MFU (median) | warm-up s | first loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r.items():
        lines.append(
            f"| {label[name]} | {row['threads']} | {row['median_s']:.2f} | {row['min_s']:.2f} | "
            f"{row['cpu_s']:.2f} | {row['tok_s']:.0f} | {row['tok_s_best']:.0f} | {row['mfu']:.1%} | "
            f"{row['warmup_s']:.1f} | {row['first_loss']:.3f} |"
        )
    goal = "met on these medians, see the cores-busy line" if s["speedup"] >= 1.2 else "NOT met"
    lines += [
        "",
        f"Speed-up ours / HF+PEFT: **{s['speedup']:.2f}x** on median step time (goal >= 1.2x: {goal}); "
        f"{s['speedup_best']:.2f}x on the best (least disturbed) step; {s['speedup_cpu']:.2f}x on median "
        "process CPU time per step (user+sys of all threads: less sensitive to other load, but counts "
        "spin-waits). With other jobs on the 2 cores, wall times vary 2-4x from step to step: read the "
        "load figures above before trusting a ratio; MFU is also only as good as the peak measured "
        "under the same load.",
        "",
        "Cores kept busy (median CPU s / median wall s per step): "
        + ", ".join(f"{label[n].split(' (')[0]} {row['cpu_s'] / row['median_s']:.2f}" for n, row in r.items())
        + f" of {args.threads} threads.",
        "",
        f"MFU = FLOPs per step / step time / measured peak. Peak: best fp32 2048^3 matmul with "
        f"{args.threads} threads: torch {s['peak_gflops']['torch']:.1f} GFLOP/s, numpy "
        f"{s['peak_gflops']['numpy']:.1f} GFLOP/s; the higher is used. FLOPs per step "
        f"{fl['flops'] / 1e9:.0f} G = 4*N_frozen*T (forward 2 + activation-gradient 2; frozen weights get "
        f"no weight gradient) + 6*N_lora*T + 12*L*B*S^2*H (attention scores and weighted sum, forward 4 + "
        f"backward 8, full S x S as computed), T = tokens per step.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
