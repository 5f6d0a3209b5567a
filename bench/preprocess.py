"""Benchmark the data stages on the quick-start scale: 999 Alpaca records x 52 = 51,948 records.

Runs both CLIs as subprocesses (convert, then preprocess at seq 4096 with the real Llama 2
tokenizer), samples the total RSS of each process tree (the CLI and every worker it starts)
with psutil every 20 ms, then checks every written record against `literal_qa`, a
single-process implementation written straight from docs/REFERENCE.md (token layout, masking), and
writes the figures to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.report import SHARED_DIR, WORK_DIR, update_section
from llama_core.atomic import remove_path

REPEAT = 52
SEQ = 4096
IGNORE = -100
REFERENCE = {"wall_s": 174.8, "peak_rss_gb": 12.8, "written_mb": 606}
GOAL = {"wall_s": 17.0, "peak_rss_gb": 1.5}
RUNS = 3
COMMAND = "python -m bench.preprocess"


def literal_qa(
    records: list[dict[str, Any]], sp: Any, seq_length: int
) -> Iterator[tuple[list[int], list[int]]]:
    """docs/REFERENCE.md, token layout and masking, step by step, with no shortcut: yields
    (input_ids, labels)."""
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    length = seq_length + 1

    def tokenize(text: str) -> list[int]:
        return [1, *sp.encode(text), 2]

    for rec in records:
        source = rec["conversations"]
        if roles[source[0]["from"]] != conv.roles[0]:
            source = source[1:]
        conv.messages = []
        for j, turn in enumerate(source):
            assert roles[turn["from"]] == conv.roles[j % 2]
            conv.append_message(roles[turn["from"]], turn["value"])
        rounds = conv.get_prompt().split(conv.sep2)
        ids = [1]
        for rou in rounds:
            if rou == "":
                break
            ids.extend(tokenize(rou)[1:])
        padded = ids + [0] * (length - len(ids))
        target = np.array(padded)
        total = int(np.not_equal(target, 0).sum())
        cur = 1
        target[:cur] = IGNORE
        sep = conv.sep + conv.roles[1] + ": "
        for rou in rounds:
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = len(tokenize(rou)) - 1
            instr_len = len(tokenize(parts[0])) - 3
            target[cur : cur + instr_len] = IGNORE
            cur += round_len
        target[cur:] = IGNORE
        if cur < length:
            if cur != total:
                target[:] = IGNORE
        else:
            target = target[:length]
        yield padded[:length], target.tolist()


def run_measured(cmd: list[str]) -> dict[str, Any]:
    """Run `cmd`; return wall seconds, peak total RSS of its process tree, CPU seconds of the whole
    tree (from wait4, which includes the workers it joined) and of its main process alone."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    peak, main_cpu = 0, 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, main_cpu
        root = psutil.Process(proc.pid)
        children: list[psutil.Process] = []
        for tick in itertools.count():
            if done.is_set():
                return
            with contextlib.suppress(psutil.Error):
                if tick % 25 == 0:  # listing children scans all of /proc: twice a second is enough
                    children = root.children(recursive=True)
                rss = root.memory_info().rss
                cpu = root.cpu_times()
                main_cpu = cpu.user + cpu.system
                for child in children:
                    with contextlib.suppress(psutil.Error):  # a worker may exit meanwhile
                        rss += child.memory_info().rss
                peak = max(peak, rss)
            time.sleep(0.02)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read() if proc.stdout else ""
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed with status {status}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "peak_rss": peak, "stdout": out, "cpu_s": cpu, "main_cpu_s": main_cpu}


def main() -> None:
    # no options: the parser only answers --help (and refuses anything else) before the long run
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    import mindspore.dataset as ds
    import sentencepiece as spm

    alpaca = SHARED_DIR / "data" / "alpaca_en_demo.json"
    model = SHARED_DIR / "data" / "llama2-tokenizer.model"
    work = WORK_DIR / "preprocess"
    remove_path(work)
    work.mkdir(parents=True)
    source = json.loads(alpaca.read_text())
    big = work / "alpaca_x52.json"
    big.write_text(json.dumps(source * REPEAT, ensure_ascii=False, indent=2))
    conv_path, out = work / "conversations.json", work / "alpaca.mindrecord"
    py = sys.executable
    convert = run_measured(
        [
            py,
            "-m",
            "llama_core.data.alpaca_converter",
            "--data_path",
            str(big),
            "--output_path",
            str(conv_path),
        ]
    )
    pre_cmd = [
        py, "-m", "llama_core.data.llama_preprocess", "--dataset_type", "qa", "--input_glob", str(conv_path),
        "--model_file", str(model), "--seq_length", str(SEQ), "--output_file", str(out),
    ]  # fmt: skip
    # Runs vary by about +-0.5 s on this machine: three fresh runs, the median one reported.
    runs = []
    for _ in range(RUNS):
        for old in work.glob("alpaca.mindrecord*"):
            old.unlink()
        runs.append(run_measured(pre_cmd))
    pre = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    again = run_measured(pre_cmd)
    written = sum(p.stat().st_size for p in work.iterdir() if p.name.startswith("alpaca.mindrecord"))
    report = json.loads((work / "alpaca.mindrecord.report.json").read_text())["result"]
    n = report["records_written"]

    # Token identity: every record against the literal implementation.
    t0 = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    records = json.loads(conv_path.read_text())
    data = ds.MindDataset(str(out), shuffle=False).create_tuple_iterator(output_numpy=True)
    mismatches, checked = [], 0
    for (ids, labels), (exp_ids, exp_labels), rec in zip(
        data, literal_qa(records, sp, SEQ), records, strict=True
    ):
        checked += 1
        if ids.tolist() != exp_ids or labels.tolist() != exp_labels:
            mismatches.append(rec["id"])
    verify_s = time.perf_counter() - t0

    total = convert["wall_s"] + pre["wall_s"]
    rows = [
        ("convert wall", f"{convert['wall_s']:.1f} s", ""),
        ("preprocess wall (median of runs)", f"{pre['wall_s']:.1f} s "
         f"({', '.join(format(r['wall_s'], '.1f') for r in runs)})",
         f"{REFERENCE['wall_s']} s (reference); goal >= 10x: <= {GOAL['wall_s']} s"),
        ("convert + preprocess wall", f"{total:.1f} s", ""),
        ("preprocess throughput", f"{n / pre['wall_s']:,.0f} records/s",
         f"{n / REFERENCE['wall_s']:,.0f} records/s"),
        ("peak RSS convert", f"{convert['peak_rss'] / 1e9:.2f} GB", ""),
        ("peak RSS preprocess (CLI + workers)", f"{pre['peak_rss'] / 1e9:.2f} GB",
         f"{REFERENCE['peak_rss_gb']} GB; goal <= {GOAL['peak_rss_gb']} GB"),
        ("bytes written (MindRecord + .db)", f"{written / 1e6:,.0f} MB", f"{REFERENCE['written_mb']} MB"),
        ("preprocess CPU time, all processes", f"{pre['cpu_s']:.1f} s",
         f"main process (reader + MindRecord writer) {pre['main_cpu_s']:.1f} s, "
         f"tokenizer workers {pre['cpu_s'] - pre['main_cpu_s']:.1f} s"),
        ("identical re-run (cache hit)", f"{again['wall_s']:.1f} s", ""),
        ("records written", f"{n:,}", "51,948"),
        ("records checked against literal_qa", f"{checked:,}, mismatches {len(mismatches)}", ""),
    ]  # fmt: skip
    body = "\n".join(
        [
            f"Input: {alpaca.name} ({len(source)} records) x {REPEAT} = {len(source) * REPEAT:,} records; "
            f"seq_length {SEQ}; tokenizer {model.name}; preprocess workers = all cores ({os.cpu_count()}).",
            "",
            "| measure | this project | reference / goal |",
            "|---|---|---|",
            *[f"| {a} | {b} | {c} |" for a, b, c in rows],
            "",
            f"Load: other jobs shared the 2 cores (see the load figure above); the CPU time is the "
            f"load-independent figure: on an idle 2-core machine the preprocess wall time is bounded "
            f"below by CPU/2 = {pre['cpu_s'] / 2:.1f} s. Where it goes: the main process streams the "
            f"JSON, pads the workers' unpadded rows and feeds them to MindSpore's C++ MindRecord writer, "
            f"which compresses every int32 of every 4097-long row one value at a time (about 0.25 ms of "
            f"CPU per qa row, in one thread holding the GIL: the larger part of the main figure and the "
            f"stage's critical path); the workers spend about 80% of their time in sentencepiece encode "
            f"(one pass per round). At the end, MindSpore's index commit takes about 0.5 s; the fsync "
            f"after it about 0.01 s, because each shard's pages are sent to disk while it is written; "
            f"the CLI then exits without MindSpore's teardown (about 0.25 s).",
            "",
            "Spread: on this VM the same code and command gave bench medians from 16.2 to 21.2 s "
            "(2026-11-28/29). In the slow runs the CPU time rose with the wall time (34-35 s against "
            "28.7-29.5 s for the identical work): the machine was slower, the work was not larger. "
            "The CPU time above tells which kind of run this was.",
            "",
            "Peak RSS is the largest sum of RSS over the CLI process and all its children, sampled every "
            "20 ms with psutil, children listed every 0.5 s (shared library pages are counted once per "
            "process, so it over-states).",
            f"Token identity: every record read back with `mindspore.dataset.MindDataset` and compared with "
            f"`bench.preprocess.literal_qa`, a literal single-process transcription of docs/REFERENCE.md's "
            f"token layout and masking (three sentencepiece calls per round, as the reference); took "
            f"{verify_s:.0f} s.",
            f"Report: fully masked {report['records_fully_masked']['count']}, truncated "
            f"{report['records_truncated']['count']}, supervised tokens {report['supervised_tokens']:,}.",
        ]
    )
    update_section("preprocess", "Data stages: Alpaca -> conversations -> MindRecord", COMMAND, body)
    print(body)
    if mismatches:
        raise SystemExit(
            f"{len(mismatches)} records differ from the literal implementation: {mismatches[:10]}"
        )


if __name__ == "__main__":
    main()
