"""One epoch of LoRA fine-tuning over the 999-record Alpaca sample at seq 4096, three data layouts:

- padded: the reference layout, every record padded to 4096 (`runner_config.length_buckets False`);
- buckets: the same records, each global batch trimmed to its length bucket (the default);
- packed: `llama_preprocess --packing pack`, conversations packed whole into rows of 4097;
- packed-1024: the same into rows of 1025 (the longest conversation, 836 tokens, still fits): on CPU
  each row computes its whole rows x rows attention, so shorter rows compute less.

The model is the bench model shrunk to keep the bench near 10 minutes on 2 cores (hidden 256, 2
layers, the Llama 2 vocabulary of 32000 and its lm_head), LoRA on wq/wk/wv/wo, batch 2 per step like
the quick start's per-device batch, random base weights (the cost does not depend on them), data in
file order. Buckets and packed run the whole epoch. Padded steps all have one shape, so its epoch
time is its median step time x its steps, measured on the first `--padded-steps` steps; those steps'
losses are compared with the buckets run's (same records, same learning rates).

Also the 7B quick start on paper: the tokens each layout computes per epoch of the 52,002-record
Alpaca set, from the sample's lengths, at MindFormers' published 5,217 tokens/s/NPU on 8 NPUs.

`python -m bench.layouts [--padded-steps 6] [--no-write]`
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import REPO_ROOT, SHARED_DIR, WORK_DIR, update_section

COMMAND = "python -m bench.layouts"
SEQ, BATCH = 4096, 2
MODEL = {
    "hidden_size": 256, "num_layers": 2, "num_heads": 4, "vocab_size": 32000,
    "multiple_of": 256, "seq_length": SEQ, "max_position_embedding": SEQ,
}  # fmt: skip
ALPACA_RECORDS, NPUS, TOKENS_PER_S_NPU, GLOBAL_BATCH_7B = 52002, 8, 5217, 16  # docs/REFERENCE.md


def prepare(work: Path) -> dict[str, Path]:
    """The sample as conversations, then MindRecord unpacked and packed (cached by the stages)."""
    from llama_core.data.alpaca_converter import convert_alpaca
    from llama_core.data.llama_preprocess import preprocess

    alpaca = SHARED_DIR / "data" / "alpaca_en_demo.json"
    tokenizer = SHARED_DIR / "data" / "llama2-tokenizer.model"
    if not alpaca.exists() or not tokenizer.exists():
        sys.exit(f"the bench needs {alpaca} and {tokenizer}")
    work.mkdir(parents=True, exist_ok=True)
    convert_alpaca(alpaca, work / "conversations.json")
    out = {}
    for name, packing, seq in (("none", "none", SEQ), ("pack", "pack", SEQ), ("pack1024", "pack", 1024)):
        out[name] = work / f"alpaca-{name}.mindrecord"
        preprocess("qa", str(work / "conversations.json"), tokenizer, out[name], seq, packing=packing)
    return out


def train(name: str, data: Path, work: Path, extra: list[str]) -> dict[str, Any]:
    """One `llama_core.run` process; its summary, per-step times and wall time."""
    overrides = [arg for key, value in MODEL.items() for arg in (f"--model.model_config.{key}", str(value))]
    pet = "--model.model_config.pet_config."
    config = REPO_ROOT / "configs" / "lora_llama2_tiny.yaml"
    # fmt: off
    cmd = [sys.executable, "-m", "llama_core.run", "--config", str(config),
           "--run_mode", "train", "--train_dataset_dir", str(data), "--batch_size", str(BATCH),
           "--output_dir", str(work / name), "--train_dataset.data_loader.shuffle", "False",
           f"{pet}lora_dropout", "0", f"{pet}lora_rank", "16", f"{pet}lora_alpha", "16",
           "--lr_schedule.learning_rate", "1e-3", "--callbacks.1.save_checkpoint_steps", "100000",
           *overrides, *extra]
    # fmt: on
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
    summary = json.loads((work / name / "train_summary.json").read_text())
    times = [float(t) for t in re.findall(r" step_time=([0-9.]+)s", proc.stderr)]
    seqs = [int(s.split(",")[0]) for s in re.findall(r" seq=([0-9,]+)", proc.stderr)]
    print(f"{name}: {len(times)} steps in {wall:.0f} s", file=sys.stderr)
    return {"summary": summary, "step_times": times, "seqs": seqs, "wall": wall}


def supervised(data: Path, rows: int) -> int:
    """Supervised targets (the loss mask of docs/REFERENCE.md) of the first `rows` rows."""
    import mindspore.dataset as ds

    from llama_core.train.dataset import supervised_tokens

    reader = ds.MindDataset(str(data), columns_list=["input_ids", "labels"], shuffle=False)
    total = 0
    for i, (ids, labels) in enumerate(reader.create_tuple_iterator(output_numpy=True, num_epochs=1)):
        if i >= rows:
            break
        total += supervised_tokens(ids[None], labels[None])
    return total


def record_lengths(data: Path) -> np.ndarray:
    """Tokens of each unpacked record (up to its last non-pad id)."""
    import mindspore.dataset as ds

    reader = ds.MindDataset(str(data), columns_list=["input_ids"], shuffle=False)
    return np.array(
        [int(np.flatnonzero(ids)[-1]) + 1 for (ids,) in reader.create_tuple_iterator(output_numpy=True)]
    )


def quick_start_on_paper(lengths: np.ndarray, fill_ratio: float) -> list[dict[str, Any]]:
    """Tokens computed per epoch of the 52,002 Alpaca records, by layout, and the NPU time at the
    published throughput. Buckets: global batches of 16 drawn at random from the sample's lengths
    (seed 0), each computing 16 x its bucket; packed: the records' tokens over the sample's fill."""
    from llama_core.train.dataset import bucket_sizes, choose_bucket

    rng = np.random.default_rng(0)
    steps = ALPACA_RECORDS // GLOBAL_BATCH_7B
    inputs = np.minimum(lengths, SEQ + 1) - 1  # input positions a record's loss can count
    draws = rng.choice(inputs, size=(steps, GLOBAL_BATCH_7B))
    buckets = [choose_bucket(batch, bucket_sizes(SEQ)) for batch in draws]
    layouts = {
        "padded": steps * GLOBAL_BATCH_7B * SEQ,
        "buckets": int(sum(b * GLOBAL_BATCH_7B for b in buckets)),
        "packed": int(ALPACA_RECORDS * lengths.mean() / fill_ratio),
    }
    return [
        {"layout": name, "tokens": tokens, "hours": tokens / (TOKENS_PER_S_NPU * NPUS) / 3600}
        for name, tokens in layouts.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--padded-steps", type=int, default=6)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    work = WORK_DIR / "layouts"
    data = prepare(work)
    unpacked_rows = json.loads((work / "alpaca-none.mindrecord.report.json").read_text())["result"]
    packing = json.loads((work / "alpaca-pack.mindrecord.report.json").read_text())["result"]["packing"]
    packing["rows_1024"] = json.loads((work / "alpaca-pack1024.mindrecord.report.json").read_text())[
        "result"
    ]["records_written"]
    epoch_steps = unpacked_rows["records_written"] // BATCH

    # padded on its first steps: a copy of those records, with the epoch's learning rates
    first = work / "padded-first.mindrecord"
    write_first_records(data["none"], first, args.padded_steps * BATCH)
    schedule = ["--lr_schedule.total_steps", str(epoch_steps)]
    runs = {
        "padded": train("padded", first, work, ["--runner_config.length_buckets", "False", *schedule]),
        "buckets": train("buckets", data["none"], work, []),
        "packed": train("packed", data["pack"], work, []),
        "packed-1024": train(
            "packed-1024", data["pack1024"], work, ["--model.model_config.seq_length", "1024"]
        ),
    }
    padded_losses = [r["loss"] for r in runs["padded"]["summary"]["loss_series"]]
    bucket_losses = [r["loss"] for r in runs["buckets"]["summary"]["loss_series"][: len(padded_losses)]]
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(padded_losses, bucket_losses, strict=True))

    rows = []
    for name, run in runs.items():
        steps = epoch_steps if name == "padded" else len(run["step_times"])
        if name == "padded":  # one shape: the median step (the first one compiles) times the steps
            wall = statistics.median(run["step_times"][1:]) * steps + run["step_times"][0]
            computed = steps * BATCH * SEQ
        else:
            wall = sum(run["step_times"])
            computed = sum(BATCH * s for s in run["seqs"])
        source = {"packed": "pack", "packed-1024": "pack1024"}.get(name, "none")
        sup = supervised(data[source], steps * BATCH)
        final = run["summary"]["final_loss"] if name != "padded" else None  # padded ran a few steps only
        rows.append({"layout": name, "steps": steps, "computed": computed, "supervised": sup, "wall": wall,
                     "final_loss": final})  # fmt: skip
    base = rows[0]
    for row in rows:
        row["speedup"] = base["wall"] / row["wall"]
        row["sup_per_s"] = row["supervised"] / row["wall"]
        row["computed_ratio"] = base["computed"] / row["computed"]
    paper = quick_start_on_paper(record_lengths(data["none"]), packing["fill_ratio"])
    body = render(rows, runs, loss_diff, len(padded_losses), packing, paper)
    print(body)
    if not args.no_write:
        print(f"wrote {update_section('layouts', TITLE, COMMAND, body)}")
    return 0


def write_first_records(src: Path, dest: Path, n: int) -> None:
    """The first `n` records of `src` as a MindRecord of their own (replaced if present)."""
    import mindspore.dataset as ds
    from mindspore.mindrecord import FileWriter

    for p in (dest, dest.with_name(dest.name + ".db")):
        p.unlink(missing_ok=True)
    writer = FileWriter(str(dest), 1)
    writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in ("input_ids", "labels")}, "qa")
    reader = ds.MindDataset(str(src), columns_list=["input_ids", "labels"], shuffle=False)
    rows = []
    for ids, labels in reader.create_tuple_iterator(output_numpy=True, num_epochs=1):
        if len(rows) == n:
            break
        rows.append({"input_ids": ids, "labels": labels})
    writer.write_raw_data(rows)
    writer.commit()


TITLE = "Data layouts: padded vs length buckets vs packing (one epoch, seq 4096)"


def render(
    rows: list[dict[str, Any]],
    runs: dict[str, dict[str, Any]],
    loss_diff: float,
    compared: int,
    packing: dict[str, Any],
    paper: list[dict[str, Any]],
) -> str:
    """The section's markdown: the three runs side by side, then the 7B arithmetic."""
    lines = [
        "999 Alpaca records (shared sample, Llama 2 tokenizer), seq 4096, batch 2, 1 process, graph mode. "
        "Model: hidden 256, 2 layers, 4 heads, vocab 32000, LoRA r 16 on wq/wk/wv/wo, random base. "
        "Wall = the epoch's step times (compiles included); padded: median step x steps (one shape).",
        "",
        "| layout | steps | tokens computed | supervised tokens | epoch wall | supervised tok/s | "
        "wall vs padded | computed vs padded | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['steps']} | {r['computed']:,} | {r['supervised']:,} | {r['wall']:.0f} s "
            f"| {r['sup_per_s']:,.0f} | {r['speedup']:.1f}x | {r['computed_ratio']:.1f}x "
            f"| {'-' if r['final_loss'] is None else format(r['final_loss'], '.4f')} |"
        )
    buckets = runs["buckets"]["summary"]["length_buckets"]
    packed_buckets = runs["packed"]["summary"]["length_buckets"]
    lines += [
        "",
        f"- Equal losses: the first {compared} steps of padded and buckets differ by at most "
        f"{loss_diff:.1e} relative (goal 1e-5).",
        f"- Buckets used (micro-batches per size): {buckets['micro_batches_per_bucket']}; "
        f"{buckets['compiles']} graphs compiled, {buckets['compile_seconds']:.0f} s of first calls.",
        f"- Packing: {packing['documents']} conversations in {packing['rows']} rows "
        f"({packing['documents_per_row_mean']} per row, at most {packing['documents_per_row_max']}), "
        f"fill {100 * packing['fill_ratio']:.1f}%; packed rows still trimmed by the buckets "
        f"({packed_buckets['micro_batches_per_bucket']}); into rows of 1025: {packing['rows_1024']} rows. "
        "An epoch drops the rows that do not fill a last batch of 2 (at most 1), so the supervised counts "
        "differ by those.",
        "- On CPU a packed row still computes its full rows x rows attention scores (masked across "
        "documents), hence packed-1024; on Ascend the fused kernel's TND layout skips the masked blocks. "
        "Final losses differ between layouts because the steps hold different documents (buckets keep the "
        "padded run's steps; packing regroups them).",
        "",
        "7B quick start on paper (52,002 records, global batch 16, 8 NPUs at the published 5,217 "
        "tokens/s/NPU, assumed the same at every length, which undercounts the gain of the shorter buckets):",
        "",
        "| layout | tokens computed per epoch | NPU wall per epoch |",
        "|---|---:|---:|",
    ]
    for p in paper:
        lines.append(f"| {p['layout']} | {p['tokens'] / 1e6:,.1f} M | {p['hours']:.2f} h |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
