"""Stage 2: conversation JSON (or wikitext) -> MindRecord, token-identical to MindFormers 1.3.

The module name mirrors MindFormers' script. `qa` turns each conversation into the vicuna_v1.1
prompt (fschat's template), tokenizes it with sentencepiece and writes `input_ids` and `labels`
(int32, length seq_length+1, pad 0, ignore -100, schema description "qa"); the reference's
masking quirks are kept and listed in `llama_core.data.masking` (docs/REFERENCE.md, masking).
`wiki` cleans wikitext, tokenizes each paragraph, concatenates, repeats `--repeat` times and cuts
chunks of seq_length+1 (`input_ids` only, tail dropped).

`--packing pack` (qa only) places several conversations in each row instead of one, with their
boundaries in an `actual_seq_len` column (`llama_core.data.packing`); the default `none` keeps the
reference's one padded record per conversation.

Records are streamed, tokenized by `--workers` processes in bounded chunks
(`llama_core.data.ordered_pool`) and written in input order (`llama_core.data.mindrecord_sink`),
so memory does not grow with the record count. Records whose every label is masked are logged
as WARNINGs naming the record (the first 50 by name, then a total) and listed in the report.
"""

from __future__ import annotations

import argparse
import collections
import glob
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import clean_leftovers
from llama_core.cache import StageKey, file_sha256, write_manifest
from llama_core.cli import exit_code, exit_without_teardown
from llama_core.data.masking import IGNORE, MASKING_OFFSET, PAD, QaJob, init_qa_worker, qa_chunk
from llama_core.data.mindrecord_sink import MindRecordSink
from llama_core.data.ordered_pool import batched, ordered_map
from llama_core.data.packing import DOC_ENDS, MODES, Packer
from llama_core.data.records import iter_records
from llama_core.data.tokenizer import load_tokenizer
from llama_core.data.wikitext import init_wiki_worker, wiki_chunk, wiki_paragraphs
from llama_core.errors import InputError
from llama_core.progress import Progress

log = logging.getLogger("llama_core.data.llama_preprocess")

STAGE = "llama_preprocess"
FORMAT_VERSION = 2  # 2: records whose answers are truncated away count as fully masked
FIELD_PAD = {"input_ids": PAD, "labels": IGNORE, DOC_ENDS: 0}  # what fills each field up to its length
MAX_LISTED = 50  # record ids listed in the report and logged one by one; counts are always exact
QA_CHUNK = 256  # records per task sent to a worker
WIKI_CHUNK = 512  # paragraphs per task


@dataclass
class PreprocessResult:
    """What the stage wrote (or found already written); also the body of the report JSON."""

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
    packing: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    file_partition: int = 1
    repeat: int = 1
    tokenizer: dict[str, str] = field(default_factory=dict)
    inputs: list[dict[str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False


class _Listed:
    """A count with the first MAX_LISTED ids."""

    def __init__(self) -> None:
        self.count, self.ids = 0, []

    def add(self, rid: str) -> None:
        self.count += 1
        if len(self.ids) < MAX_LISTED:
            self.ids.append(rid)

    def doc(self, **extra: Any) -> dict[str, Any]:
        return {"count": self.count, "first_ids": self.ids, **extra}


def report_path(output_file: str | os.PathLike[str]) -> Path:
    """The report JSON beside the output; it is also the stage manifest (written last)."""
    output_file = Path(output_file)
    return output_file.with_name(output_file.name + ".report.json")


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
) -> PreprocessResult:
    """Tokenize conversation records (`qa`) or wikitext (`wiki`) into MindRecord files; `packing`
    "pack" puts several conversations in a row (qa)."""
    t0 = time.monotonic()
    if dataset_type not in ("qa", "wiki"):
        raise InputError(f"dataset_type must be 'qa' or 'wiki', got {dataset_type!r}")
    if masking not in MASKING_OFFSET:
        raise InputError(f"masking must be one of {sorted(MASKING_OFFSET)}, got {masking!r}")
    if packing not in MODES:
        raise InputError(f"packing must be one of {list(MODES)}, got {packing!r}")
    if packing != "none" and dataset_type != "qa":
        raise InputError("packing applies to conversations (dataset_type qa): wiki rows are already full")
    if seq_length < 1 or file_partition < 1 or repeat < 1:
        raise InputError("seq_length, file_partition and repeat must be >= 1")
    files = sorted(glob.glob(input_glob))
    if not files:
        raise InputError(f"{input_glob}: no input file matches")
    load_tokenizer(model_file)  # fail here, naming the file, rather than in every worker
    out = Path(output_file).absolute()
    console_path = str(output_file) + ("0" if file_partition > 1 else "")
    params = {
        "dataset_type": dataset_type, "seq_length": seq_length, "file_partition": file_partition,
        "repeat": repeat if dataset_type == "wiki" else 1, "masking": masking, "name": out.name,
    }  # fmt: skip
    if packing != "none":  # unpacked outputs keep the keys they had before packing existed
        params["packing"] = packing
    rpath = report_path(out)
    key = StageKey(rpath, STAGE, FORMAT_VERSION, [*files, model_file], params)
    hit = key.hit()
    if hit is not None:
        result = PreprocessResult(**{**hit.extra["result"], "cached": True})
        log.info("%s is up to date (cache hit, key %s): nothing to do", out, key.value()[:12])
        _print_done(result)
        return result

    clean_leftovers(out.parent, out.name)
    rpath.unlink(missing_ok=True)  # outputs are about to change: the old report no longer holds
    workers = workers or os.cpu_count() or 1
    columns = {"qa": ["input_ids", "labels"], "wiki": ["input_ids"]}[dataset_type]
    if packing != "none":
        columns.append(DOC_ENDS)
    schema = {name: {"type": "int32", "shape": [-1]} for name in columns}
    sink = MindRecordSink(out, file_partition, schema, dataset_type, FIELD_PAD)
    result = PreprocessResult(
        output_file=str(output_file), console_path=console_path, records_written=0, seq_length=seq_length,
        dataset_type=dataset_type, masking=masking, file_partition=file_partition,
        repeat=params["repeat"], tokenizer={"path": str(model_file), "sha256": file_sha256(model_file)},
        inputs=[{"path": f, "sha256": file_sha256(f)} for f in files],
    )  # fmt: skip
    try:
        if dataset_type == "qa":
            packer = Packer(sink, seq_length + 1) if packing != "none" else None
            _run_qa(QaJob(str(model_file), seq_length, masking, files), workers, sink, result, packer)
        else:
            _run_wiki(files, str(model_file), seq_length, params["repeat"], workers, sink, result)
        finals = sink.publish()
    except BaseException:
        sink.discard()
        raise
    result.outputs = [str(p) for p in finals]
    result.seconds = round(time.monotonic() - t0, 3)
    write_manifest(rpath, stage=STAGE, key=key.value(), outputs=finals, extra={"result": asdict(result)})
    _print_done(result)
    return result


def _print_done(result: PreprocessResult) -> None:
    """The reference's two closing lines, also on a cache hit."""
    if result.packing["mode"] != "none":
        print(f"Packed {result.packing['documents']} records into {result.records_written} rows.")
    print(f"Transformed {result.records_written} records.")
    print(f"Transform finished, output files refer: {result.console_path}")


def _run_qa(
    job: QaJob, workers: int, sink: MindRecordSink, result: PreprocessResult, packer: Packer | None
) -> None:
    """Tokenize and write the conversation records (packed by `packer` when given); fill the
    result's record counts."""
    sizes = [os.path.getsize(f) for f in job.files]
    total_bytes, done_bytes = sum(sizes), 0  # characters read approximate bytes: an ETA estimate
    progress = Progress("llama_preprocess qa", total=None, logger=log)

    def read(n: int) -> None:
        nonlocal done_bytes
        done_bytes += n

    def records() -> Iterator[tuple[int, int, Any]]:
        for file_no, name in enumerate(job.files):
            for index, record in iter_records(name, on_read=read):
                yield file_no, index, record

    masked, truncated, long_labels, unsupervised = _Listed(), _Listed(), _Listed(), _Listed()
    reasons: collections.Counter[str] = collections.Counter()
    chunks = batched(records(), QA_CHUNK)
    for rows, stats in ordered_map(qa_chunk, chunks, workers, init_qa_worker, (job,)):
        if packer is None:
            sink.write(rows)
        else:
            for row, st in zip(rows, stats, strict=True):
                if st.supervised:
                    packer.add(row)
                else:
                    unsupervised.add(st.rid)
        for st in stats:
            if st.masked:
                masked.add(st.rid)
                reasons[st.masked] += 1
                if masked.count <= MAX_LISTED:
                    log.warning("record %s: every label masked (the reference does this silently): %s",
                                st.rid, st.masked)  # fmt: skip
            if st.truncated:
                truncated.add(st.rid)
            if st.long_labels:
                long_labels.add(st.rid)
            result.supervised_tokens += st.supervised
        done = progress.done + len(stats)
        if done_bytes:  # estimate the total from the share of input read so far
            progress.total = max(done, round(done * total_bytes / done_bytes))
        progress.update(len(stats))
    progress.close()
    if packer is not None:
        packer.flush()
        packer.stats.skipped_unsupervised = unsupervised.doc()
        result.packing = packer.stats.doc()
        log.info(
            "packed %d conversations into %d rows of %d tokens (%.2f per row, fill %.1f%%); %d without a "
            "supervised token left out",
            packer.stats.documents, packer.stats.rows, job.seq_length + 1,
            result.packing["documents_per_row_mean"], 100 * result.packing["fill_ratio"], unsupervised.count,
        )  # fmt: skip
    if masked.count > MAX_LISTED:
        log.warning("%d records fully masked in all (the first %d are named above)", masked.count, MAX_LISTED)
    if truncated.count:
        log.warning(
            "%d records longer than seq_length+1=%d were truncated", truncated.count, job.seq_length + 1
        )
    result.records_written = sink.rows
    result.records_fully_masked = masked.doc(reasons=dict(reasons))
    result.records_truncated = truncated.doc()
    result.labels_longer_than_record = long_labels.doc()


def _run_wiki(
    files: list[str],
    model_file: str,
    seq_length: int,
    repeat: int,
    workers: int,
    sink: MindRecordSink,
    result: PreprocessResult,
) -> None:
    """Tokenize the wikitext, repeat the token stream and write it in records of seq_length+1."""
    length = seq_length + 1
    # Tokens go to a scratch file so that --repeat replays them without holding them in memory.
    scratch = sink.tmp_dir / "tokens.scratch"
    n_tokens = 0
    chunks = batched(wiki_paragraphs(files), WIKI_CHUNK)
    with open(scratch, "wb") as f:
        for ids in ordered_map(wiki_chunk, chunks, workers, init_wiki_worker, (model_file,)):
            f.write(ids.tobytes())
            n_tokens += len(ids)
    progress = Progress("llama_preprocess wiki", total=n_tokens * repeat // length, logger=log)
    itemsize = np.dtype(np.int32).itemsize
    carry = np.zeros(0, dtype=np.int32)
    for _ in range(repeat):
        with open(scratch, "rb") as f:
            while block := f.read(length * itemsize * 256):
                data = np.concatenate([carry, np.frombuffer(block, dtype=np.int32)])
                whole = len(data) // length
                sink.write([{"input_ids": (data[i * length : (i + 1) * length].tobytes(), length)}
                            for i in range(whole)])  # fmt: skip
                carry = data[whole * length :].copy()
                progress.update(whole)
    progress.close()
    scratch.unlink()
    result.records_written = sink.rows


def build_parser(prog: str = "python -m llama_core.data.llama_preprocess") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Tokenize conversations (qa) or wikitext (wiki) into MindRecord like MindFormers 1.3.",
    )
    parser.add_argument("--dataset_type", choices=("qa", "wiki"), default="wiki")
    parser.add_argument("--input_glob", required=True, help="input file(s); a glob matches several (sorted)")
    parser.add_argument("--model_file", required=True, help="sentencepiece tokenizer.model")
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
        "--masking",
        choices=sorted(MASKING_OFFSET),
        default="mindformers",
        help="instruction masking: mindformers (reference, -3) or fastchat (-2)",
    )
    return parser


def stage_from_args(args: argparse.Namespace) -> PreprocessResult:
    """The preprocessing the parsed command line asks for (it prints the reference's two lines)."""
    return preprocess(
        args.dataset_type, args.input_glob, args.model_file, args.output_file, seq_length=args.seq_length,
        file_partition=args.file_partition, repeat=args.repeat, workers=args.workers, masking=args.masking,
        packing=args.packing,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    stage_from_args(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    exit_without_teardown(exit_code(main))
