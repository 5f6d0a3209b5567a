"""How long Airflow takes to parse the DAG folder (every pipeline file of configs/pipelines), as the
dag-processor does it: a fresh interpreter with Airflow imported, then `DagBag(dags/)` timed. Goal:
<= 0.5 s, so adding pipelines never slows the dag-processor's loop. Also: the frameworks it imports.

`python -m bench.dag_parse [--repeat 5] [--pipelines N] [--no-write]` (`--pipelines N`: N copies of
the demo pipeline in a temporary folder, to see how the time grows with the number of pipelines)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.report import REPO_ROOT, update_section

TITLE = "Parsing the DAG folder"
COMMAND = "python -m bench.dag_parse"
_PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t0 = time.monotonic()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.monotonic() - t0
frameworks = ("mindspore", "torch", "transformers", "sentencepiece", "matplotlib")
heavy = sorted(m for m in frameworks if m in sys.modules)
print(json.dumps({"seconds": seconds, "dags": len(bag.dags), "errors": len(bag.import_errors),
                  "heavy": heavy}))
"""


def parse_once(pipelines: Path | None) -> dict:
    env = {**os.environ, **({"LLAMA_LORA_PIPELINES": str(pipelines)} if pipelines else {})}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(REPO_ROOT / "dags")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def copies(folder: Path, n: int) -> Path:
    demo = yaml.safe_load((REPO_ROOT / "configs" / "pipelines" / "llama2_tiny_lora_demo.yaml").read_text())
    for i in range(n):
        (folder / f"p{i:03d}.yaml").write_text(yaml.safe_dump({**demo, "dag_id": f"pipeline_{i:03d}"}))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dag_parse", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pipelines", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, folder in (
            ("shipped (2 pipelines + the example consumer)", None),
            (f"{args.pipelines} pipelines", copies(Path(tmp), args.pipelines)),
        ):
            runs = [parse_once(folder) for _ in range(args.repeat)]
            secs = [r["seconds"] for r in runs]
            rows.append(
                (
                    label,
                    runs[0]["dags"],
                    runs[0]["errors"],
                    statistics.median(secs),
                    max(secs),
                    runs[0]["heavy"],
                )
            )
        shutil.rmtree(tmp, ignore_errors=True)
    body = "| DAG folder | DAGs | import errors | median | max | frameworks imported |\n"
    body += "|---|---:|---:|---:|---:|---|\n"
    body += "".join(
        f"| {label} | {dags} | {errors} | {med:.3f} s | {mx:.3f} s | {', '.join(heavy) or 'none'} |\n"
        for label, dags, errors, med, mx, heavy in rows
    )
    body += (
        f"\n{args.repeat} fresh interpreters each; the time is `DagBag(dags/)` alone (Airflow already "
        "imported). Goal: <= 0.5 s.\n"
    )
    print(body)
    if not args.no_write:
        print(f"wrote {update_section('dag_parse', TITLE, COMMAND, body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
