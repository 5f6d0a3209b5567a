"""`llama-lora STAGE ...`: every stage's CLI behind one command.

Each stage takes the flags of its `python -m` module (the module's own parser) and prints its
result as indented JSON on stdout: the dict the pipeline's Airflow task puts in XCom. The stage's
own lines (logs, the preprocessing's MindFormers lines) go to stderr, so stdout is only the JSON.
`launch`, `run` and `demo` are their module's CLI as is: they print logs, progress or paths.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llama_core.cli import exit_code
from llama_core.results import print_result


@dataclass(frozen=True)
class Stage:
    """One `llama-lora` stage: the module whose CLI it is, and one line for `--help`.

    A module whose result is printed has `build_parser(prog)` and `stage_from_args(args)`; the
    others (`prints_result=False`) are called through their `main(argv)`.
    """

    name: str
    module: str  # under llama_core
    summary: str
    prints_result: bool = True


# Pipeline order; modules are imported only when their stage runs, so `--help` stays instant.
STAGES = {
    stage.name: stage
    for stage in (
        Stage("validate", "validate", "check a fine-tune request's params (JSON file) before any work"),
        Stage("plan", "plan", "a run config's memory per device, term by term, against max_device_memory"),
        Stage("fetch", "fetch.__main__", "download a path, http(s)://, s3:// or hf:// source"),
        Stage("convert-alpaca", "data.alpaca_converter", "Alpaca records -> conversation JSON"),
        Stage("preprocess", "data.llama_preprocess", "conversations or wikitext -> MindRecord"),
        Stage("convert", "checkpoint.convert", "HF safetensors -> MindSpore .ckpt (--reversed: back)"),
        Stage("shard", "checkpoint.shard", "a checkpoint -> rank_<i>/ files for a config's layout"),
        Stage("launch", "launch.__main__", "`run` on every rank with msrun (prints rank logs)", False),
        Stage("run", "run", "train, fine-tune, evaluate or predict (prints logs)", False),
        Stage("evaluate", "evaluation", "base vs fine-tuned: held-out loss and answers to prompts"),
        Stage("unshard", "checkpoint.unshard", "rank_<i>/ checkpoints -> one complete .ckpt"),
        Stage("merge-lora", "checkpoint.merge_lora", "merge LoRA weights into the base weights"),
        Stage("export-peft", "checkpoint.export_peft", "LoRA weights -> a Hugging Face PEFT adapter"),
        Stage("import-peft", "checkpoint.import_peft", "a Hugging Face PEFT adapter -> LoRA weights"),
        Stage("demo", "demo", "write tiny demo inputs (--serve: over HTTP on 127.0.0.1)", False),
        Stage("report", "report", "print a run report's summary (report.json or the run folder)", False),
    )
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-lora",
        usage="%(prog)s STAGE [flags of the stage; llama-lora STAGE --help]",
        description=__doc__.split("\n\n", 1)[1],
        epilog="stages:\n" + "\n".join(f"  {s.name:<15} {s.summary}" for s in STAGES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=STAGES, metavar="STAGE", help="one of the stages below")
    return parser


def stage_main(stage: Stage) -> Callable[[Sequence[str] | None], int]:
    """The stage's CLI: its module's `main`, or one printing the stage's result as JSON."""
    module = importlib.import_module(f"llama_core.{stage.module}")
    if not stage.prints_result:
        return module.main

    def main(argv: Sequence[str] | None) -> int:
        args = module.build_parser(prog=f"llama-lora {stage.name}").parse_args(argv)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is only the JSON, e.g. for jq
            result = module.stage_from_args(args)
        print_result(result)
        return 0

    return main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the first word is ours: argparse would take a `--` after it (launch needs it) as its own.
    stage = STAGES[build_parser().parse_args(argv[:1]).stage]
    return exit_code(stage_main(stage), argv[1:])
