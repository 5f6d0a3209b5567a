"""Stage 1: Alpaca records -> conversation JSON, byte-identical to MindFormers' `alpaca_converter`
(docs/REFERENCE.md, conversations).

Each Alpaca record (`instruction`, optional `input`, `output`) becomes
`{"id": "<n>", "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": output}]}`
with PROMPT built from the two Stanford-Alpaca templates (the "with input" one when `input` is a
non-empty string). The output is a JSON list, indent 2, non-ASCII kept, no trailing newline, as
the reference writes it. `id` is the 1-based position of the record in the input (so ids stay
traceable to the input when `--on_error skip` drops records).

Beyond the reference: JSON Lines input, ShareGPT-style records that already hold
`conversations` (written through unchanged, an `id` added when missing, still validated), clear
errors instead of the reference's log-and-exit-0, atomic output and a cache manifest
(`OUT.manifest.json`) that makes an identical re-run a no-op.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_core.atomic import atomic_path, clean_leftovers, disk_full_stage
from llama_core.cache import StageKey, manifest_path_for, write_manifest
from llama_core.cli import exit_code
from llama_core.data.records import iter_records, record_error
from llama_core.errors import InputError

log = logging.getLogger("llama_core.data.alpaca_converter")

STAGE = "alpaca_converter"
FORMAT_VERSION = 1
MAX_LISTED = 50  # skipped indices listed in the result/log; the count is always exact

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ROLES = ("human", "gpt")


@dataclass
class ConversationsResult:
    """What the Alpaca -> conversations stage wrote (or found already written); kept in its manifest."""

    output_path: str
    records_written: int
    records_skipped: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # first MAX_LISTED {index, error}
    cached: bool = False


def alpaca_to_conversation(record: Any, index: int, path: str | os.PathLike[str]) -> dict[str, Any]:
    """One input record -> one output record; InputError naming record and field when malformed."""
    if not isinstance(record, dict):
        raise InputError(f"{path}: record {index}: expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        validate_conversations(record["conversations"], index, path)
        return record if "id" in record else {"id": str(index + 1), **record}
    for key in ("instruction", "output"):
        if key not in record:
            raise record_error(path, index, key, "is missing")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise record_error(path, index, key, f"must be a string, got {type(record[key]).__name__}")
    has_input = record.get("input", "") != ""
    prompt = (PROMPT_INPUT if has_input else PROMPT_NO_INPUT).format_map(record)
    return {
        "id": str(index + 1),
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": record["output"]}],
    }


def validate_conversations(turns: Any, index: int, path: str | os.PathLike[str]) -> None:
    """Check a ShareGPT `conversations` list: objects with `from` in human/gpt and string `value`."""
    if not isinstance(turns, list) or not turns:
        raise record_error(path, index, "conversations", "must be a non-empty list of turns")
    for t, turn in enumerate(turns):
        where = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise record_error(path, index, where, "must be an object with 'from' and 'value'")
        if turn.get("from") not in ROLES:
            raise record_error(
                path, index, f"{where}.from", f"must be one of {ROLES}, got {turn.get('from')!r}"
            )
        if not isinstance(turn.get("value"), str):
            got = type(turn.get("value")).__name__ if "value" in turn else "nothing"
            raise record_error(path, index, f"{where}.value", f"must be a string, got {got}")


@disk_full_stage("convert", "output_path")
def convert_alpaca(
    data_path: str | os.PathLike[str], output_path: str | os.PathLike[str], on_error: str = "raise"
) -> ConversationsResult:
    """Convert an Alpaca (or ShareGPT) JSON / JSON Lines file into the reference conversation JSON.

    `on_error="raise"` fails on the first bad record; `"skip"` drops bad records (syntax errors
    in the file itself always fail) and reports their count and indices.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    data_path, output_path = Path(data_path), Path(output_path)
    if not data_path.is_file():
        raise InputError(f"{data_path}: input file not found")
    manifest_path = manifest_path_for(output_path)
    key = StageKey(manifest_path, STAGE, FORMAT_VERSION, [data_path], {"on_error": on_error})
    hit = key.hit()
    if hit is not None:
        log.info("%s is up to date (cache hit, key %s): nothing to do", output_path, key.value()[:12])
        return ConversationsResult(**{**hit.extra["result"], "cached": True})
    clean_leftovers(output_path.parent, output_path.name)
    manifest_path.unlink(missing_ok=True)

    written, skipped, n_skipped = 0, [], 0
    with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[")
        for index, record in iter_records(data_path):
            try:
                converted = alpaca_to_conversation(record, index, data_path)
            except InputError as exc:
                if on_error == "raise":
                    raise
                n_skipped += 1
                log.warning("skipping %s", exc)
                if len(skipped) < MAX_LISTED:
                    skipped.append({"index": index, "error": str(exc)})
                continue
            # Same text as json.dump(list, indent=2): each item indented one level inside the list.
            item = json.dumps(converted, ensure_ascii=False, indent=2).replace("\n", "\n  ")
            out.write(("," if written else "") + "\n  " + item)
            written += 1
        out.write("\n]" if written else "]")
    result = ConversationsResult(str(output_path), written, n_skipped, skipped)
    if n_skipped:
        log.warning(
            "skipped %d bad record(s) of %s (indices: %s)",
            n_skipped,
            data_path,
            ", ".join(str(s["index"]) for s in skipped) + (" ..." if n_skipped > len(skipped) else ""),
        )
    log.info("wrote %d conversation record(s) to %s", written, output_path)
    write_manifest(
        manifest_path, stage=STAGE, key=key.value(), outputs=[output_path], extra={"result": asdict(result)}
    )
    return result


def build_parser(prog: str = "python -m llama_core.data.alpaca_converter") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert Alpaca records (JSON list or JSON Lines) to FastChat conversation JSON.",
    )
    parser.add_argument("--data_path", required=True, help="Alpaca JSON / JSON Lines file")
    parser.add_argument("--output_path", required=True, help="conversation JSON to write")
    parser.add_argument(
        "--on_error",
        choices=("raise", "skip"),
        default="raise",
        help="bad records: fail (default) or skip them and report which",
    )
    return parser


def stage_from_args(args: argparse.Namespace) -> ConversationsResult:
    """The conversion the parsed command line asks for."""
    return convert_alpaca(args.data_path, args.output_path, on_error=args.on_error)


def main(argv: Sequence[str] | None = None) -> int:
    stage_from_args(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
