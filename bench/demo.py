"""How long `make demo` takes after the install: `scripts/demo.sh` into a fresh folder (inputs
generated, the base model pre-trained, every stage computed), then again into the same folder (the
stages before the fine-tune found in the cache). Goal: the first under 2 minutes on 2 cores.

`python -m bench.demo [--no-write]`. Each run's time is split where the script's output says it
moved on: the inputs and the metadata DB ready (`== running DAG`), then the DAG run and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.report import REPO_ROOT, WORK_DIR, update_section
from llama_core.launch.preflight import free_port

TITLE = "make demo, after the install"
COMMAND = "python -m bench.demo"
GOAL_S = 120


def run_demo(out: Path, port: int) -> dict:
    """One `scripts/demo.sh` into `out`, as `make demo` runs it: its phases' seconds (`total`, `ready`),
    its output (`stdout`, stderr merged) and its run's report. RuntimeError, with the output's tail,
    when it fails. tests/test_pipeline_e2e.py runs the demo through this too."""
    env = {**os.environ, "VENV": str(Path(sys.executable).parents[1]), "DEMO_PORT": str(port)}
    t0 = time.monotonic()
    ready = None
    lines = []
    with subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "demo.sh"), str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:  # fmt: skip
        for line in proc.stdout:
            lines.append(line)
            if ready is None and line.startswith("== running DAG"):
                ready = time.monotonic() - t0
    total = time.monotonic() - t0
    text = "".join(lines)
    if proc.returncode != 0 or ready is None:
        raise RuntimeError(f"scripts/demo.sh {out} failed (exit {proc.returncode}):\n{text[-3000:]}")
    (report_path,) = re.findall(r"^Report: (.+)$", text, re.M)
    report = json.loads(Path(report_path).with_suffix(".json").read_text())
    return {"total": total, "ready": ready, "stdout": text, "report": report}


def row(label: str, run: dict) -> str:
    report = run["report"]
    stages = {s["name"]: s for s in report["stages"]}
    hits = sum(bool(s["cached"]) for s in stages.values())
    computed = sum(s["cached"] is False for s in stages.values())
    base, tuned = (report["evaluation"][side]["generations"] for side in ("base", "finetuned"))
    answers = [sum(bool(g.get("right")) for g in side) for side in (base, tuned)]
    n = len(tuned)
    return (
        f"| {label} | {run['total']:.0f} s | {run['ready']:.0f} s | {run['total'] - run['ready']:.0f} s | "
        f"{stages['finetune']['seconds']:.0f} s | {hits} of {hits + computed} | "
        f"{answers[0]}/{n} -> {answers[1]}/{n} |\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    out = WORK_DIR / "demo"
    shutil.rmtree(out, ignore_errors=True)
    port = free_port()  # one port for both runs: the same URLs, so the second finds the downloads cached
    first, second = run_demo(out, port), run_demo(out, port)
    shutil.rmtree(out, ignore_errors=True)
    body = (
        "| run | in all | inputs + metadata DB ready | DAG run + report | finetune | cache hits "
        "| answers right (base -> fine-tuned) |\n|---|---:|---:|---:|---:|---:|---|\n"
    )
    body += row("first (fresh folder)", first) + row("second (same folder)", second)
    verdict = "met" if first["total"] < GOAL_S else "MISSED"
    body += (
        f"\n`scripts/demo.sh` as `make demo` runs it, the venv already installed (the install is ~1.5 min "
        f"more on a fresh clone). Goal: the first run under {GOAL_S} s: {verdict}. The first run "
        "generates the inputs (a tokenizer trained on the spot, the tiny base model pre-trained briefly) "
        "while the metadata DB is migrated; the second finds them in its folder.\n"
    )
    print(body)
    if not args.no_write:
        print(f"wrote {update_section('demo', TITLE, COMMAND, body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
