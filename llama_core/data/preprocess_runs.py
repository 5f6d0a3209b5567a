"""The tokenizing loops of `llama_preprocess`: conversations (`qa`) into a training split and an
optional held-out one, each padded or packed, and wikitext (`wiki`) cut into rows of seq_length+1.

Records are tokenized by worker processes in bounded chunks (`ordered_pool`) and written in input
order; they return the counts of what was written, masked, truncated or left out (the fields of
the stage's result).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from llama_core.data.holdout import is_held_out
from llama_core.data.masking import QaJob, RecordStats, init_qa_worker, qa_chunk
from llama_core.data.mindrecord_sink import MindRecordSink, Row
from llama_core.data.ordered_pool import batched, ordered_map
from llama_core.data.packing import Packer
from llama_core.data.records import iter_records
from llama_core.data.wikitext import init_wiki_worker, wiki_chunk, wiki_paragraphs
from llama_core.progress import Progress

log = logging.getLogger("llama_core.data.llama_preprocess")  # the stage's: one logger to follow or silence

MAX_LISTED = 50  # record ids listed in the report and logged one by one; counts are always exact
QA_CHUNK = 256  # records per task sent to a worker
WIKI_CHUNK = 512  # paragraphs per task


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


class Split:
    """One output of the qa stage (training or held-out): its sink, its packer when packing, and
    the counts of the records routed to it."""

    def __init__(self, sink: MindRecordSink, packer: Packer | None) -> None:
        self.sink, self.packer = sink, packer
        self.masked, self.truncated, self.long_labels, self.unsupervised = (_Listed() for _ in range(4))
        self.reasons: collections.Counter[str] = collections.Counter()
        self.supervised = 0
        self.conversations = 0
        self._rows: list[Row] = []

    def add(self, row: Row, st: RecordStats) -> None:
        """Route one tokenized record here: kept for the next write, or given to the packer (left
        out and counted when it has no supervised token)."""
        self.conversations += 1
        if self.packer is None:
            self._rows.append(row)
        elif st.supervised:
            self.packer.add(row)
        else:
            self.unsupervised.add(st.rid)
        if st.masked:
            self.masked.add(st.rid)
            self.reasons[st.masked] += 1
        if st.truncated:
            self.truncated.add(st.rid)
        if st.long_labels:
            self.long_labels.add(st.rid)
        self.supervised += st.supervised

    def write(self) -> None:
        """Write the unpacked rows added since the last call (one write per chunk, as unsplit)."""
        if self._rows:
            self.sink.write(self._rows)
            self._rows = []

    def finish(self) -> dict[str, Any] | None:
        """Write what is left; the packing section when packing."""
        self.write()
        if self.packer is None:
            return None
        self.packer.flush()
        self.packer.stats.skipped_unsupervised = self.unsupervised.doc()
        return self.packer.stats.doc()


def run_qa(job: QaJob, workers: int, splits: list[Split], holdout_fraction: float) -> dict[str, Any]:
    """Tokenize and write the conversation records to `splits[0]` (training) or, when there is a
    second split, to `splits[1]` (held-out, by `is_held_out`). Returns the result's record counts, with
    `packing` when packed and the `holdout` section's counts when split."""
    sizes = [os.path.getsize(f) for f in job.files]
    total_bytes, done_bytes = sum(sizes), 0  # characters read approximate bytes: an ETA estimate
    progress = Progress("llama_preprocess qa", total=None, logger=log)
    train, heldout = splits[0], (splits[1] if len(splits) > 1 else None)
    # Whether each record read is held out, decided from its content as it is read; consumed in the
    # same order as the tokenized rows come back (bounded by the records in flight).
    held: collections.deque[bool] = collections.deque()

    def read(n: int) -> None:
        nonlocal done_bytes
        done_bytes += n

    def records() -> Iterator[tuple[int, int, Any]]:
        for file_no, name in enumerate(job.files):
            for index, record in iter_records(name, on_read=read):
                if heldout is not None:  # a malformed record is not held out: its worker names the error
                    held.append(isinstance(record, dict) and is_held_out(record, holdout_fraction))
                yield file_no, index, record

    masked = truncated = 0
    chunks = batched(records(), QA_CHUNK)
    for rows, stats in ordered_map(qa_chunk, chunks, workers, init_qa_worker, (job,)):
        for row, st in zip(rows, stats, strict=True):
            (heldout if heldout is not None and held.popleft() else train).add(row, st)
            if st.masked:
                masked += 1
                if masked <= MAX_LISTED:
                    log.warning("record %s: every label masked (the reference does this silently): %s",
                                st.rid, st.masked)  # fmt: skip
            truncated += st.truncated
        for split in splits:
            split.write()
        done = progress.done + len(stats)
        if done_bytes:  # estimate the total from the share of input read so far
            progress.total = max(done, round(done * total_bytes / done_bytes))
        progress.update(len(stats))
    progress.close()
    counts: dict[str, Any] = {}
    packing = train.finish()
    if packing is not None:
        counts["packing"] = packing
        log.info(
            "packed %d conversations into %d rows of %d tokens (%.2f per row, fill %.1f%%); %d without a "
            "supervised token left out",
            packing["documents"], packing["rows"], job.seq_length + 1, packing["documents_per_row_mean"],
            100 * packing["fill_ratio"], train.unsupervised.count,
        )  # fmt: skip
    if masked > MAX_LISTED:
        log.warning("%d records fully masked in all (the first %d are named above)", masked, MAX_LISTED)
    if truncated:
        log.warning("%d records longer than seq_length+1=%d were truncated", truncated, job.seq_length + 1)
    counts |= {
        "records_written": train.sink.rows,
        "records_fully_masked": train.masked.doc(reasons=dict(train.reasons)),
        "records_truncated": train.truncated.doc(),
        "labels_longer_than_record": train.long_labels.doc(),
        "supervised_tokens": train.supervised,
    }
    if heldout is not None:
        counts["holdout"] = _holdout_counts(heldout, heldout.finish(), train, holdout_fraction)
    return counts


def _holdout_counts(
    heldout: Split, packing: dict[str, Any] | None, train: Split, fraction: float
) -> dict[str, Any]:
    """The counts of the result's `holdout` section; logs the split."""
    doc = dict(
        records=heldout.sink.rows,
        supervised_tokens=heldout.supervised,
        records_fully_masked=heldout.masked.doc(reasons=dict(heldout.reasons)),
        records_truncated=heldout.truncated.doc(),
    )
    if packing is not None:
        doc.update(documents=packing["documents"], packing=packing)
    total = heldout.conversations + train.conversations
    log.info(
        "held-out split (fraction %g, by conversation hash): %d of %d records (%.2f%%) -> %s (%d rows, "
        "%d supervised tokens); %d records for training (%d rows)",
        fraction, heldout.conversations, total, 100 * heldout.conversations / total if total else 0.0,
        heldout.sink.final, heldout.sink.rows, heldout.supervised, train.conversations, train.sink.rows,
    )  # fmt: skip
    if not heldout.conversations:
        log.warning("the held-out split is empty: no record's hash fell below %g", fraction)
    return doc


def run_wiki(
    files: list[str],
    model_file: str,
    seq_length: int,
    repeat: int,
    workers: int,
    sink: MindRecordSink,
) -> int:
    """Tokenize the wikitext, repeat the token stream and write it in records of seq_length+1; the
    records written."""
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
    return sink.rows
