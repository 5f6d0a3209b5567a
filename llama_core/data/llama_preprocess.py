"""Stage 2: conversation JSON (or wikitext) -> MindRecord, token-identical to MindFormers 1.3.

The module name mirrors MindFormers' script. `qa` turns each conversation into the vicuna_v1.1
prompt (fschat's template), tokenizes it with sentencepiece and writes `input_ids` and `labels`
(int32, length seq_length+1, pad 0, ignore -100, schema description "qa"); the reference's
masking quirks are kept and listed in `llama_core.data.masking` (docs/REFERENCE.md, masking).
`--chat_template` picks another chat format (`llama_core.data.chat`: llama3, hf, chatml) for a
Llama 3 tiktoken tokenizer.model or an HF tokenizer folder: the same records, with only the
assistants' tokens and end-of-turn tokens as labels; by default the tokenizer's own format.
`wiki` cleans wikitext, tokenizes each paragraph, concatenates, repeats `--repeat` times and cuts
chunks of seq_length+1 (`input_ids` only, tail dropped).

`--packing pack` (qa only) places several conversations in each row instead of one, with their
boundaries in an `actual_seq_len` column (`llama_core.data.packing`); the default `none` keeps the
reference's one padded record per conversation.

`--holdout_fraction F` (qa) sets aside an evaluation split the model never trains on: a record is
held out when the hash of its conversation falls below F (`llama_core.data.holdout`), so the split
depends on content alone (not on order, ids or the other records) and is the same on every run.
Held-out records go to `--eval_output_file` (default: the output name with `-heldout` before its
suffix), same schema and layout (packed by their own packer with `--packing pack`); the training
output keeps the rest. Both are published together and the report, written last, lists both.

Records are streamed (`llama_core.data.preprocess_runs`), tokenized by `--workers` processes in chunks
(`llama_core.data.ordered_pool`) and written in input order (`llama_core.data.mindrecord_sink`),
so memory does not grow with the record count. Records whose every label is masked are logged
as WARNINGs naming the record (the first 50 by name, then a total) and listed in the report.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_core.atomic import clean_leftovers, disk_full_stage, remove_path
from llama_core.cache import StageKey, file_sha256, read_manifest, write_manifest
from llama_core.cli import exit_code, exit_without_teardown
from llama_core.data.chat import CHAT_TEMPLATES, chat_format
from llama_core.data.holdout import check_fraction, default_eval_path
from llama_core.data.masking import IGNORE, MASKING_OFFSET, PAD, QaJob
from llama_core.data.mindrecord_sink import MindRecordSink
from llama_core.data.packing import DOC_ENDS, MODES, Packer
from llama_core.data.preprocess_runs import Split, run_qa, run_wiki
from llama_core.data.prompts import TEMPLATE
from llama_core.data.tokenizer import Tokenizer, open_tokenizer
from llama_core.errors import InputError

log = logging.getLogger("llama_core.data.llama_preprocess")

STAGE = "llama_preprocess"
FORMAT_VERSION = 2  # 2: records whose answers are truncated away count as fully masked
# what fills each field up to its length (input_ids: the request's pad_id)
FIELD_PAD = {"input_ids": PAD, "labels": IGNORE, DOC_ENDS: 0}


def _no_holdout() -> dict[str, Any]:
    return {"fraction": 0.0, "output_file": None, "records": 0, "supervised_tokens": 0}


@dataclass
class PreprocessResult:
    """What the stage wrote (or found already written); also the body of the report JSON.

    With a held-out split the record counts (records_written, supervised_tokens, the masked,
    truncated and long-label lists, `packing`) and `outputs` describe the training output only;
    `holdout` describes the held-out one: fraction, output_file, records (rows written), supervised
    tokens, its masked and truncated records and its outputs, and when packed `documents` (the
    conversations in its rows) and its own `packing` section. Fraction 0: output_file None.
    """

    output_file: str
    console_path: str
    records_written: int
    records_fully_masked: dict[str, Any] = field(default_factory=dict)
    records_truncated: dict[str, Any] = field(default_factory=dict)
    labels_longer_than_record: dict[str, Any] = field(default_factory=dict)
    supervised_tokens: int = 0
    seq_length: int = 0
    dataset_type: str = "qa"
    masking: str = "mindformers"
    chat_template: str | None = TEMPLATE  # None for wiki; outputs made before the setting are vicuna_v1.1
    pad_id: int = PAD  # what fills input_ids after a record: the model's pad_token_id
    packing: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    holdout: dict[str, Any] = field(default_factory=_no_holdout)
    file_partition: int = 1
    repeat: int = 1
    tokenizer: dict[str, str] = field(default_factory=dict)
    inputs: list[dict[str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False


def report_path(output_file: str | os.PathLike[str]) -> Path:
    """The report JSON beside the output; it is also the stage manifest (written last)."""
    output_file = Path(output_file)
    return output_file.with_name(output_file.name + ".report.json")


@disk_full_stage("preprocess", "output_file")
def preprocess(
    dataset_type: str,
    input_glob: str,
    model_file: str | os.PathLike[str],
    output_file: str | os.PathLike[str],
    seq_length: int = 2048,
    file_partition: int = 1,
    repeat: int = 1,
    workers: int | None = None,
    masking: str = "mindformers",
    packing: str = "none",
    holdout_fraction: float = 0.0,
    eval_output_file: str | os.PathLike[str] | None = None,
    chat_template: str | None = None,
    pad_id: int = PAD,
) -> PreprocessResult:
    """Tokenize conversation records (`qa`) or wikitext (`wiki`) into MindRecord files; `packing`
    "pack" puts several conversations in a row (qa). `holdout_fraction` > 0 (qa) writes the
    records whose conversation hash falls below it to `eval_output_file` (default: the output
    name with `-heldout` before its suffix) instead of the training output. `model_file` is any
    tokenizer `open_tokenizer` reads; `chat_template` (qa) one of `CHAT_TEMPLATES`, default the
    tokenizer's (`default_chat_template`). `pad_id` fills input_ids after each record: it must be the
    model's pad_token_id (Llama 3: 128002, Qwen: 151643), for the loss mask and the length buckets
    find the padding by it; 0 (Llama 2's, the reference's) is a real token in those vocabularies."""
    t0 = time.monotonic()
    holdout_fraction = _check_settings(dataset_type, masking, packing, holdout_fraction, seq_length,
                                       file_partition, repeat)  # fmt: skip
    req = _Request.make(dataset_type, input_glob, model_file, output_file, seq_length, file_partition,
                        repeat, masking, packing, holdout_fraction, eval_output_file, chat_template,
                        pad_id)  # fmt: skip
    hit = req.key.hit()
    if hit is not None:
        result = PreprocessResult(**{**hit.extra["result"], "cached": True})
        log.info("%s is up to date (cache hit, key %s): nothing to do", req.out, req.key.value()[:12])
        _print_done(result)
        return result
    outputs = _Outputs.open(req)
    result = req.new_result()
    try:
        _run(req, outputs, workers or os.cpu_count() or 1, result)
        finals, eval_finals = outputs.publish()
    except BaseException:
        outputs.discard()
        raise
    result.outputs = [str(p) for p in finals]
    if req.eval_out is not None:
        result.holdout["outputs"] = [str(p) for p in eval_finals]
    result.seconds = round(time.monotonic() - t0, 3)
    write_manifest(req.report, stage=STAGE, key=req.key.value(), outputs=[*finals, *eval_finals],
                   extra={"result": asdict(result)})  # fmt: skip
    _print_done(result)
    return result


def _check_settings(
    dataset_type: str,
    masking: str,
    packing: str,
    holdout_fraction: float,
    seq_length: int,
    file_partition: int,
    repeat: int,
) -> float:
    """InputError for a setting that cannot work; the checked holdout fraction."""
    if dataset_type not in ("qa", "wiki"):
        raise InputError(f"dataset_type must be 'qa' or 'wiki', got {dataset_type!r}")
    if masking not in MASKING_OFFSET:
        raise InputError(f"masking must be one of {sorted(MASKING_OFFSET)}, got {masking!r}")
    if packing not in MODES:
        raise InputError(f"packing must be one of {list(MODES)}, got {packing!r}")
    if packing != "none" and dataset_type != "qa":
        raise InputError("packing applies to conversations (dataset_type qa): wiki rows are already full")
    holdout_fraction = check_fraction(holdout_fraction)
    if holdout_fraction > 0 and dataset_type != "qa":
        raise InputError(
            f"holdout_fraction applies to conversations (dataset_type qa), got {holdout_fraction} for wiki"
        )
    if seq_length < 1 or file_partition < 1 or repeat < 1:
        raise InputError("seq_length, file_partition and repeat must be >= 1")
    return holdout_fraction


@dataclass
class _Request:
    """A checked preprocessing request: its inputs, tokenizer, chat format, outputs and cache key."""

    dataset_type: str
    files: list[str]
    model_file: str | os.PathLike[str]  # as given (the report shows it)
    tokenizer: Tokenizer
    chat_template: str | None  # resolved for qa; None for wiki
    pad_id: int
    seq_length: int
    file_partition: int
    masking: str
    packing: str
    holdout_fraction: float
    output_file: str | os.PathLike[str]
    out: Path
    eval_file: str | os.PathLike[str]
    eval_out: Path | None  # None: no held-out split
    params: dict[str, Any]
    key: StageKey

    @classmethod
    def make(
        cls,
        dataset_type: str,
        input_glob: str,
        model_file: str | os.PathLike[str],
        output_file: str | os.PathLike[str],
        seq_length: int,
        file_partition: int,
        repeat: int,
        masking: str,
        packing: str,
        holdout_fraction: float,
        eval_output_file: str | os.PathLike[str] | None,
        chat_template: str | None,
        pad_id: int,
    ) -> _Request:
        """Find the inputs, open the tokenizer, resolve the chat format; name the outputs and the key."""
        files = sorted(glob.glob(input_glob))
        if not files:
            raise InputError(f"{input_glob}: no input file matches")
        tok = open_tokenizer(model_file)  # fail here, naming the file, rather than in every worker
        if dataset_type == "wiki" and tok.kind != "sentencepiece":
            raise InputError(f"wiki paragraphs are tokenized with sentencepiece; {model_file} is {tok.kind}")
        template = chat_format(tok, chat_template).name if dataset_type == "qa" else None
        out = Path(output_file).absolute()
        params = {
            "dataset_type": dataset_type, "seq_length": seq_length, "file_partition": file_partition,
            "repeat": repeat if dataset_type == "wiki" else 1, "masking": masking, "name": out.name,
        }  # fmt: skip
        # Settings added since keep the keys of outputs made without them: they still hit.
        if template not in (None, TEMPLATE):
            params["chat_template"] = template
        if pad_id != PAD:
            params["pad_id"] = pad_id
        if packing != "none":
            params["packing"] = packing
        eval_file = default_eval_path(output_file) if eval_output_file is None else eval_output_file
        eval_out = None
        if holdout_fraction > 0:
            eval_out = Path(eval_file).absolute()
            if os.path.abspath(eval_out) == os.path.abspath(out):
                raise InputError(f"eval_output_file {eval_file} is the training output file")
            params["holdout_fraction"] = holdout_fraction
            params["eval_output"] = os.path.relpath(eval_out, out.parent)
        elif eval_output_file is not None:
            log.info(
                "holdout_fraction is 0: no held-out split, eval_output_file %s is not written",
                eval_output_file,
            )
        key = StageKey(report_path(out), STAGE, FORMAT_VERSION, [*files, *tok.files], params)
        return cls(dataset_type, files, model_file, tok, template, pad_id, seq_length, file_partition,
                   masking, packing, holdout_fraction, output_file, out, eval_file, eval_out, params,
                   key)  # fmt: skip

    @property
    def report(self) -> Path:
        return report_path(self.out)

    def new_result(self) -> PreprocessResult:
        """The result before any record is written."""
        tokenizer = {"path": str(self.model_file), "kind": self.tokenizer.kind}
        if len(self.tokenizer.files) == 1:
            tokenizer["sha256"] = file_sha256(self.tokenizer.files[0])
        else:
            tokenizer["files"] = {p.name: file_sha256(p) for p in self.tokenizer.files}
        result = PreprocessResult(
            output_file=str(self.output_file), records_written=0, seq_length=self.seq_length,
            console_path=str(self.output_file) + ("0" if self.file_partition > 1 else ""),
            dataset_type=self.dataset_type, masking=self.masking, chat_template=self.chat_template,
            pad_id=self.pad_id,
            file_partition=self.file_partition, repeat=self.params["repeat"], tokenizer=tokenizer,
            inputs=[{"path": f, "sha256": file_sha256(f)} for f in self.files],
        )  # fmt: skip
        if self.eval_out is not None:
            result.holdout = {"fraction": self.holdout_fraction, "output_file": str(self.eval_file)}
        return result


class _Outputs:
    """The stage's MindRecord outputs while they are written: training, and held-out when split."""

    def __init__(self, train: MindRecordSink, heldout: MindRecordSink | None) -> None:
        self.train, self.heldout = train, heldout

    @classmethod
    def open(cls, req: _Request) -> _Outputs:
        """Clear what a previous run left, then open the sinks."""
        clean_leftovers(req.out.parent, req.out.name)
        if req.eval_out is not None:
            clean_leftovers(req.eval_out.parent, req.eval_out.name)
        _retire_previous_run(req.report)
        columns = {"qa": ["input_ids", "labels"], "wiki": ["input_ids"]}[req.dataset_type]
        if req.packing != "none":
            columns.append(DOC_ENDS)
        schema = {name: {"type": "int32", "shape": [-1]} for name in columns}

        def sink(path: Path) -> MindRecordSink:
            pad = {**FIELD_PAD, "input_ids": req.pad_id}
            return MindRecordSink(path, req.file_partition, schema, req.dataset_type, pad)

        train = sink(req.out)
        try:
            return cls(train, sink(req.eval_out) if req.eval_out is not None else None)
        except BaseException:
            train.discard()
            raise

    def sinks(self) -> list[MindRecordSink]:
        return [s for s in (self.train, self.heldout) if s is not None]

    def publish(self) -> tuple[list[Path], list[Path]]:
        """Rename both into place: the split is published whole or not at all."""
        finals = self.train.publish()
        try:
            return finals, self.heldout.publish() if self.heldout is not None else []
        except BaseException:
            for path in finals:
                remove_path(path)
            raise

    def discard(self) -> None:
        for s in self.sinks():
            s.discard()


def _run(req: _Request, outputs: _Outputs, workers: int, result: PreprocessResult) -> None:
    """Tokenize the inputs into the outputs; fill the result's counts."""
    if req.dataset_type == "wiki":
        result.records_written = run_wiki(req.files, str(req.tokenizer.path), req.seq_length, result.repeat,
                                          workers, outputs.train)  # fmt: skip
        return
    packed = req.packing != "none"
    splits = [Split(s, Packer(s, req.seq_length + 1) if packed else None) for s in outputs.sinks()]
    job = QaJob(
        str(req.tokenizer.path), req.seq_length, req.masking, req.files, req.chat_template or TEMPLATE
    )
    counts = run_qa(job, workers, splits, req.holdout_fraction)
    result.holdout |= counts.pop("holdout", {})
    for name, value in counts.items():
        setattr(result, name, value)


def _retire_previous_run(rpath: Path) -> None:
    """Remove the report of the previous run (the outputs are about to change: it no longer holds),
    then the held-out files that report listed: a run with no split, or another held-out file,
    must not leave behind an evaluation set whose records now train the model."""
    old = read_manifest(rpath)
    rpath.unlink(missing_ok=True)
    if old is None or old.stage != STAGE:
        return
    result = old.extra.get("result")
    holdout = result.get("holdout") if isinstance(result, dict) else None
    heldout = holdout.get("outputs") if isinstance(holdout, dict) else None
    if not isinstance(result, dict) or not isinstance(heldout, list):
        return
    names = {Path(str(p)).name for p in heldout}
    training = {Path(str(p)).name for p in result.get("outputs") or []}
    for rel in old.outputs:  # the report's own listing, relative to its folder
        path = rpath.parent / rel
        if path.name in names and path.name not in training and path.is_file():
            log.info("removing %s, the held-out output of the previous run", path)
            remove_path(path)


def _print_done(result: PreprocessResult) -> None:
    """The reference's two closing lines, also on a cache hit."""
    if result.packing["mode"] != "none":
        print(f"Packed {result.packing['documents']} records into {result.records_written} rows.")
    print(f"Transformed {result.records_written} records.")
    print(f"Transform finished, output files refer: {result.console_path}")


def build_parser(prog: str = "python -m llama_core.data.llama_preprocess") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Tokenize conversations (qa) or wikitext (wiki) into MindRecord like MindFormers 1.3.",
    )
    parser.add_argument("--dataset_type", choices=("qa", "wiki"), default="wiki")
    parser.add_argument("--input_glob", required=True, help="input file(s); a glob matches several (sorted)")
    parser.add_argument(
        "--model_file",
        required=True,
        help="tokenizer: a sentencepiece or Llama 3 tiktoken tokenizer.model, an HF tokenizer folder or "
        "tokenizer.json",
    )
    parser.add_argument("--seq_length", type=int, default=2048, help="records hold seq_length+1 ids")
    parser.add_argument("--output_file", required=True, help="MindRecord path (PATH0..K-1 when sharded)")
    parser.add_argument("--file_partition", type=int, default=1, help="number of MindRecord shards")
    parser.add_argument("--repeat", type=int, default=1, help="wiki: repeat the token stream R times")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    parser.add_argument(
        "--packing",
        choices=MODES,
        default="none",
        help="qa: none (one padded record per conversation, as the reference) or pack (several per row)",
    )
    parser.add_argument(
        "--holdout_fraction",
        type=float,
        default=0.0,
        help="qa: hold out this fraction of the records (0 <= F < 1), chosen by a hash of each conversation, "
        "as an evaluation set written to --eval_output_file (default 0: no split)",
    )
    parser.add_argument(
        "--eval_output_file",
        default=None,
        help="MindRecord path of the held-out records (default: the output name with -heldout before its "
        "suffix, e.g. alpaca-heldout.mindrecord)",
    )
    parser.add_argument(
        "--masking",
        choices=sorted(MASKING_OFFSET),
        default="mindformers",
        help="instruction masking of vicuna_v1.1: mindformers (reference, -3) or fastchat (-2)",
    )
    parser.add_argument(
        "--chat_template",
        choices=CHAT_TEMPLATES,
        default=None,
        help="qa: how conversations become tokens (default: the tokenizer's: vicuna_v1.1 for sentencepiece, "
        "llama3 for Llama 3's tiktoken file, hf for an HF tokenizer with a chat_template)",
    )
    parser.add_argument(
        "--pad_id",
        type=int,
        default=PAD,
        help="id that fills input_ids after a record: the model's pad_token_id (default 0, Llama 2's)",
    )
    return parser


def stage_from_args(args: argparse.Namespace) -> PreprocessResult:
    """The preprocessing the parsed command line asks for (it prints the reference's two lines)."""
    return preprocess(
        args.dataset_type, args.input_glob, args.model_file, args.output_file, seq_length=args.seq_length,
        file_partition=args.file_partition, repeat=args.repeat, workers=args.workers, masking=args.masking,
        packing=args.packing, holdout_fraction=args.holdout_fraction, eval_output_file=args.eval_output_file,
        chat_template=args.chat_template, pad_id=args.pad_id,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    stage_from_args(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    exit_without_teardown(exit_code(main))
