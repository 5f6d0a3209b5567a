"""Peak memory and time of the loss step: whole-batch fp32 logits against ChunkedCrossEntropy.

One forward + backward of the loss alone (hidden states -> lm_head -> masked mean cross-entropy) at
seq 4096, batch 1, with Llama 3's 128,256-entry vocabulary on a tiny hidden size (64: the head weight
is then 33 MB and the [tokens, vocab] tensors, 2.1 GB each in fp32, are what counts). fp32, graph mode
(the trainer's), 2 threads. Each variant runs in a fresh process; its peak RSS is the process's
VmHWM, its baseline the RSS once inputs and head exist (MindSpore imported, nothing compiled).

Variants:
- unchunked: the model's loss today (fp32 logits of the whole batch, log-softmax, gather);
- chunked-C: `ChunkedCrossEntropy(C)` (custom bprop, C tokens of logits at a time);
- recompute-C: the alternative it was measured against: per-chunk cells with `Cell.recompute()`;
- `frozen`: a frozen head (LoRA training): gradients of the hidden states only;
- `lora`: a LoRA-wrapped head (rank 16), gradients of the hidden states and the adapter;
- `h512`: hidden size 512, where the head matmuls weigh more against the softmax passes.

`python -m bench.loss_memory [--steps 3] [--no-write]`
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
from pathlib import Path

import numpy as np

COMMAND = "python -m bench.loss_memory"
SEQ, HIDDEN, VOCAB, THREADS = 4096, 64, 128256, 2
VARIANTS = (
    "unchunked",
    "chunked-2048",
    "chunked-1024",
    "chunked-512",
    "recompute-1024",
    "unchunked frozen",
    "chunked-1024 frozen",
    "unchunked lora",
    "chunked-1024 lora",
    "unchunked frozen h512",
    "chunked-1024 frozen h512",
)


def _status_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(line for line in status if line.startswith(field))
    return int(line.split()[1]) / 1024


def run_variant(variant: str, steps: int) -> dict:
    """One variant in this process: seconds per step, baseline and peak RSS (MiB), the loss."""
    import mindspore as ms
    from mindspore import nn, ops

    from llama_core.model import LlamaConfig, LoraConfig
    from llama_core.model.llama import Linear
    from llama_core.model.lora import LoraLinear
    from llama_core.model.loss import ChunkedCrossEntropy

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(THREADS)
    ms.set_seed(0)
    kind, *flags = variant.split()
    hidden_size = next((int(f[1:]) for f in flags if f.startswith("h")), HIDDEN)
    config = LlamaConfig(seq_length=SEQ, hidden_size=hidden_size, num_layers=1, num_heads=1, vocab_size=VOCAB)
    head = Linear(hidden_size, VOCAB, config)
    if "lora" in flags:
        head = LoraLinear(head, LoraConfig(rank=16, alpha=16, dropout=0.0, target_modules="lm_head"), config)
        head.weight.requires_grad = False

    def nll_sum(logits: ms.Tensor, targets: ms.Tensor, mask: ms.Tensor) -> ms.Tensor:
        nll = -ops.gather_elements(ops.log_softmax(logits, -1), -1, targets.expand_dims(-1)).squeeze(-1)
        return ops.sum(nll * mask)

    class ChunkNll(nn.Cell):
        def construct(
            self, x: ms.Tensor, weight: ms.Tensor, targets: ms.Tensor, mask: ms.Tensor
        ) -> ms.Tensor:
            return nll_sum(ops.matmul(x, weight.T).astype(ms.float32), targets, mask)

    class Loss(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.head = head
            name, _, size = kind.partition("-")
            self.chunk = int(size or 0)
            self.chunked = ChunkedCrossEntropy(self.chunk) if name == "chunked" else None
            self.per_chunk = ChunkNll() if name == "recompute" else None
            if self.per_chunk is not None:
                self.per_chunk.recompute()  # its activations are recomputed in the backward pass

        def construct(self, hidden: ms.Tensor, targets: ms.Tensor, mask: ms.Tensor) -> ms.Tensor:
            if self.chunked is not None:
                return self.chunked(hidden, self.head, targets, mask)
            if self.per_chunk is None:
                total = nll_sum(self.head(hidden).astype(ms.float32), targets, mask)
            else:
                total = ops.zeros((), ms.float32)
                for s in range(0, hidden.shape[0], self.chunk):
                    chunk = slice(s, s + self.chunk)
                    total = total + self.per_chunk(
                        hidden[chunk], self.head.weight, targets[chunk], mask[chunk]
                    )
            return total / (ops.sum(mask) + 1e-8)

    rng = np.random.default_rng(0)
    hidden = ms.Tensor(rng.normal(size=(SEQ, hidden_size)).astype(np.float32))
    targets = ms.Tensor(rng.integers(0, VOCAB, size=SEQ).astype(np.int32))
    mask = ms.Tensor((rng.random(SEQ) > 0.1).astype(np.float32))  # a tenth of the tokens unsupervised
    params = head.trainable_params()
    grad_fn = ops.value_and_grad(Loss(), 0, None if "frozen" in flags else params)
    baseline = _status_mib("VmRSS")
    wall, cpu = [], []
    for _ in range(steps + 1):  # the first call compiles
        t0, c0 = time.perf_counter(), time.process_time()
        loss, grads = grad_fn(hidden, targets, mask)
        loss = float(loss.asnumpy())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    d_hidden = grads if "frozen" in flags else grads[0]
    return {
        "variant": variant,
        "loss": loss,
        "d_hidden_abs_sum": float(np.abs(d_hidden.asnumpy()).sum()),
        "baseline_mib": baseline,
        "peak_mib": _status_mib("VmHWM"),
        "first_call_s": wall[0],
        "step_s": wall[1:],
        "cpu_s": cpu[1:],
    }


def _variant(variant: str, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, "-m", "bench.loss_memory", "--variant", variant, "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _body(results: list[dict], steps: int, load: tuple[float, float]) -> str:
    full_gb = SEQ * VOCAB * 4 / 1e9
    by_name = {r["variant"]: r for r in results}

    def ratio(key: str, chunked: str, unchunked: str) -> float:
        value = {"peak": lambda r: r["peak_mib"], "step": lambda r: statistics.median(r["step_s"])}[key]
        return value(by_name[chunked]) / value(by_name[unchunked])

    lines = [
        f"One forward + backward of the loss alone: hidden states [{SEQ}, {HIDDEN}] (batch 1, seq {SEQ}) "
        f"-> lm_head [{VOCAB}, {HIDDEN}] -> masked mean cross-entropy (10% of tokens masked), fp32, "
        f"MindSpore graph mode, {THREADS} threads. Gradients of the hidden states and the head weight "
        "(`frozen`: the hidden states only, as in LoRA training; `lora`: a rank-16 LoRA head, hidden "
        "states and adapter; `h512`: hidden size 512). `chunked-C` is `llama_core.model.loss."
        "ChunkedCrossEntropy(C)` (custom bprop); `recompute-C` the alternative it was measured against, "
        f"per-chunk cells with `Cell.recompute()`. One [tokens, vocab] fp32 tensor is {full_gb:.2f} GB. "
        "Each variant in a fresh process; peak = the process's VmHWM, baseline = its RSS before the "
        f"first call (MindSpore imported, inputs made). Time: median of {steps} steps after the compiling "
        "first call; CPU = process CPU seconds per step (less sensitive to other load). 1-min load "
        f"{load[0]:.2f} before, {load[1]:.2f} after.",
        "",
        "| variant | peak RSS MiB | peak - baseline MiB | median step s | median CPU s/step | first call s "
        "| loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['baseline_mib']:.0f} "
            f"| {statistics.median(r['step_s']):.2f} | {statistics.median(r['cpu_s']):.2f} "
            f"| {r['first_call_s']:.1f} | {r['loss']:.6f} |"
        )
    lines += [
        "",
        f"Chunked-1024 / unchunked: peak RSS x{ratio('peak', 'chunked-1024', 'unchunked'):.2f} "
        f"(frozen head x{ratio('peak', 'chunked-1024 frozen', 'unchunked frozen'):.2f}), step time "
        f"x{ratio('step', 'chunked-1024', 'unchunked'):.2f} with the head's weight gradient, "
        f"x{ratio('step', 'chunked-1024 frozen', 'unchunked frozen'):.2f} frozen at hidden {HIDDEN}, "
        f"x{ratio('step', 'chunked-1024 frozen h512', 'unchunked frozen h512'):.2f} frozen at hidden 512. "
        "The chunked backward recomputes each chunk's logits and softmax: one more head matmul (2 -> 3 "
        "with a frozen head, 3 -> 4 with its weight gradient) plus a softmax pass; at hidden 64 the "
        "passes over [tokens, vocab] dominate, at real hidden sizes the matmuls do. A frozen head's "
        "weight gradient is pruned from the chunked backward (less CPU than with it). The peak falls "
        "with the chunk: a few [chunk, vocab] fp32 tensors instead of several [tokens, vocab] ones.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after the first call")
    parser.add_argument("--no-write", action="store_true", help="print only; don't update docs/BENCHMARKS.md")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps)))
        return 0
    load_before = os.getloadavg()[0]
    results = []
    for variant in VARIANTS:
        results.append(_variant(variant, args.steps))
        print(json.dumps(results[-1]), flush=True)
    body = _body(results, args.steps, (load_before, os.getloadavg()[0]))
    print(body)
    if not args.no_write:
        from bench.report import update_section

        update_section("loss_memory", "Loss memory: whole-batch vs chunked logits (CPU)", COMMAND, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
