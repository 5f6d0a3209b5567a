"""Stage 2: conversation JSON (or wikitext) -> MindRecord, token-identical to MindFormers 1.3.

`qa` turns each conversation into the vicuna_v1.1 prompt (fschat's template), tokenizes it with
sentencepiece and writes `input_ids` and `labels` (int32, length seq_length+1, pad 0, ignore
-100, schema description "qa"). `wiki` cleans wikitext, tokenizes each paragraph, concatenates,
repeats `--repeat` times and cuts chunks of seq_length+1 (`input_ids` only, tail dropped).

Reference quirks reproduced by default (`--masking mindformers`), each counted in the report:

1. The instruction part of a round is masked with `len(Tokenize(part0 + " ASSISTANT: ")) - 3`
   tokens (FastChat uses -2), so the last token of " ASSISTANT: " stays supervised.
   `--masking fastchat` uses -2; every other rule stays the same.
2. A round that does not split into exactly two parts on " ASSISTANT: " stops the labelling.
   This happens when an answer contains " ASSISTANT: ", when an answer is empty (fschat then
   writes "ASSISTANT:" with no space) or when a conversation ends with a human turn. If the
   labelled length then falls short of the token count (and of seq_length+1) the WHOLE record
   is masked (all -100): the reference does this silently, here it is logged as a WARNING
   naming the record (the first 50 by name, then a total) and listed in the report.
3. Labels are computed on the padded, untruncated ids and only then cut to seq_length+1; a
   record masked by quirk 2 keeps its untruncated label length (longer than seq_length+1 when
   its ids were).
4. A gpt turn first in a conversation is dropped; roles must then alternate (else error).
5. Messages are joined by the template and split back on "</s>": an answer containing "</s>"
   splits into extra rounds; token building stops at the first empty round.

Speed: a round's ids are the tokens of `part0 + " ASSISTANT:"` followed by those of the answer,
and the instruction length is the first count plus one. That needs one sentencepiece pass per
round instead of the reference's three, and is exact when no vocabulary piece contains a space
mark after other text (checked on the loaded model, as for the Llama 2 tokenizer; otherwise the
literal two encodes are used). Records are streamed, tokenized by `--workers` processes in
bounded chunks and written in input order, so memory does not grow with the record count.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import importlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import (
    clean_leftovers,
    fsync_dir,
    fsync_tree,
    remove_path,
    start_writeback,
    temp_sibling,
)
from llama_core.cache import cache_key, cached, file_sha256, write_manifest
from llama_core.cli import exit_without_teardown, run
from llama_core.data.records import iter_records
from llama_core.errors import InputError
from llama_core.progress import Progress

log = logging.getLogger("llama_core.data.llama_preprocess")

STAGE = "llama_preprocess"
FORMAT_VERSION = 2  # 2: records whose answers are truncated away count as fully masked
IGNORE = -100
PAD = 0
BOS, EOS = 1, 2
FIELD_PAD = {"input_ids": PAD, "labels": IGNORE}  # what fills each field up to its length
TEMPLATE = "vicuna_v1.1"
ROLE_NAMES = {"human": 0, "gpt": 1}
MASKING_OFFSET = {"mindformers": 3, "fastchat": 2}
MAX_LISTED = 50  # record ids listed in the report and logged one by one; counts are always exact
QA_CHUNK = 256  # records per task sent to a worker
WIKI_CHUNK = 512  # paragraphs per task


# ---------------------------------------------------------------- tokenizer and worker state


def load_tokenizer(model_file: str | os.PathLike[str]) -> Any:
    """A sentencepiece processor; InputError naming the file when absent or unreadable."""
    import sentencepiece as spm

    path = Path(model_file)
    if not path.is_file():
        raise InputError(f"{path}: tokenizer model file not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{path}: not a valid sentencepiece model ({exc})") from None


def _wire_fields(buf: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, payload) of a protobuf message; payload None for non length-delimited."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 2:
            n = varint()
            yield key >> 3, buf[pos : pos + n]
            pos += n
        else:
            if wire == 0:
                varint()
            else:
                pos += {1: 8, 5: 4}[wire]
            yield key >> 3, None


def splits_at_spaces(sp: Any) -> bool:
    """True when encoding `x + " " + y` (x not ending in a space) always equals encode(x) followed
    by encode(y): no piece can join text with a following space mark.

    Holds when the normalizer is the identity, a dummy prefix is added, extra spaces are kept,
    and no normal or user-defined piece has a space mark after a non-space character. The model
    proto is scanned directly (parsing its 32,000 pieces with protobuf classes takes a second).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    specs = {}
    for number, payload in _wire_fields(sp.serialized_model_proto()):
        if number == 1 and payload is not None:  # a piece: its text is field 1
            text = next((p for n, p in _wire_fields(payload) if n == 1 and p is not None), b"").decode()
            if "\u2581" in text.lstrip("\u2581"):
                return False
        elif number in (2, 3) and payload is not None:
            specs[number] = payload
    trainer = pb.TrainerSpec.FromString(specs.get(2, b""))
    norm = pb.NormalizerSpec.FromString(specs.get(3, b""))
    return (
        norm.name == "identity"
        and norm.add_dummy_prefix
        and not norm.remove_extra_whitespaces
        and not trainer.treat_whitespace_as_suffix
    )


@dataclass
class _Job:
    """Everything a worker needs; sent once to each worker process."""

    dataset_type: str
    model_file: str
    seq_length: int
    masking: str
    files: list[str]
    repeat: int = 1


_STATE: dict[str, Any] = {}
# One record for the writer: per field, its leading values (int32 bytes) and its full length.
Row = dict[str, tuple[bytes, int]]


def _init_worker(job: _Job) -> None:
    from fastchat.conversation import get_conv_template

    sp = load_tokenizer(job.model_file)
    conv = get_conv_template(TEMPLATE)
    fast = splits_at_spaces(sp)
    # Every prompt starts with the template's system message and a space: with `fast`, its
    # tokens are a fixed prefix of the first round's tokens, encoded once here.
    system = conv.system_message + conv.sep if fast and conv.system_message[-1:].strip() else None
    _STATE.update(
        job=job, sp=sp, fast=fast, conv=conv, system=system, system_ids=sp.encode(conv.system_message)
    )


# ---------------------------------------------------------------- qa: one chunk of records


@dataclass
class RecordStats:
    """Per-record facts the report needs."""

    rid: str
    masked: str | None  # reason, when every label is IGNORE (quirk 2, or the answers truncated away)
    truncated: bool
    supervised: int
    long_labels: bool  # labels kept longer than seq_length+1 (quirk 3)


def record_label(job: _Job, file_no: int, index: int, record: Any) -> str:
    """How a record is named in errors, warnings and the report."""
    rid = record.get("id") if isinstance(record, dict) else None
    where = f"{job.files[file_no]}: record {index}"
    return f"{where} (id {rid})" if isinstance(rid, (str, int)) else where


def _prompt(job: _Job, conv: Any, file_no: int, index: int, record: Any) -> str:
    """The fschat vicuna_v1.1 prompt of one record, after the reference's role checks."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    label = record_label(job, file_no, index, record)
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{label}: field 'conversations' must be a non-empty list of turns")
    roles = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_NAMES:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise InputError(
                f"{label}: field 'conversations[{t}].from' must be 'human' or 'gpt', got {got!r}"
            )
        if not isinstance(turn.get("value"), str):
            got = type(turn.get("value")).__name__ if "value" in turn else "nothing"
            raise InputError(f"{label}: field 'conversations[{t}].value' must be a string, got {got}")
        roles.append(ROLE_NAMES[turn["from"]])
    start = 1 if roles[0] != 0 else 0  # a leading gpt turn is dropped
    conv.messages = []
    for j, t in enumerate(range(start, len(turns))):
        if roles[t] != j % 2:
            raise InputError(
                f"{label}: roles do not alternate: conversations[{t}] is "
                f"'{turns[t]['from']}' where '{('human', 'gpt')[j % 2]}' was expected"
            )
        conv.append_message(conv.roles[j % 2], turns[t]["value"])
    return conv.get_prompt()


_SPLIT, _LITERAL, _UNLABELLED = range(3)


def _qa_chunk(items: list[tuple[int, int, Any]]) -> tuple[list[Row], list[RecordStats]]:
    """Tokenize and label a chunk of records; return their rows (see `_MindRecordSink.write`) and
    stats."""
    job, sp, conv, fast = _STATE["job"], _STATE["sp"], _STATE["conv"], _STATE["fast"]
    system, system_ids = _STATE["system"], _STATE["system_ids"]
    sep = conv.sep + conv.roles[1] + ": "  # " ASSISTANT: "
    head = sep.rstrip(" ")
    texts: list[str] = []
    # Per record, per round: (how, index of its first text in `texts`, prefix ids). `how` is
    # SPLIT (texts: instruction head, answer), LITERAL (texts: round, part0 + sep) or
    # UNLABELLED (text: round; labelling stopped at or before this round).
    plans = []
    for file_no, index, record in items:
        rounds, labelled = [], True
        for rou in _prompt(job, conv, file_no, index, record).split(conv.sep2):
            if rou == "":
                break
            parts = rou.split(sep) if labelled else ()
            labelled = len(parts) == 2
            if labelled and fast and parts[1]:
                # tokens(round) = tokens(part0 + " ASSISTANT:") + tokens(answer); see module doc.
                instr = parts[0] + head
                prefix: list[int] = []
                if system is not None and instr.startswith(system):
                    instr, prefix = instr[len(system) :], system_ids
                rounds.append((_SPLIT, len(texts), prefix))
                texts += [instr, parts[1]]
            elif labelled:
                rounds.append((_LITERAL, len(texts), None))
                texts += [rou, parts[0] + sep]
            else:
                rounds.append((_UNLABELLED, len(texts), None))
                texts.append(rou)
        plans.append(rounds)
    encoded = sp.encode(texts, num_threads=1)  # one thread: the workers are the parallelism

    length = job.seq_length + 1
    offset = MASKING_OFFSET[job.masking]
    rows, stats = [], []
    for (file_no, index, record), rounds in zip(items, plans, strict=True):
        ids, cuts, cur = [BOS], [], 1
        labelled = True
        for how, i, prefix in rounds:
            if how == _SPLIT:
                head_ids = prefix + encoded[i]
                round_ids = head_ids + encoded[i + 1]
                instr_tokens = len(head_ids) + 1  # + the lone space mark ending " ASSISTANT: "
            else:
                round_ids = encoded[i]
                instr_tokens = len(encoded[i + 1]) if how == _LITERAL else -1
            ids += round_ids
            ids.append(EOS)
            labelled = how != _UNLABELLED
            if labelled:
                # Tokenize() adds bos+eos: len(Tokenize(x)) == len(encode(x)) + 2.
                cuts.append((cur, instr_tokens + 2 - offset))
                cur += len(round_ids) + 1
        arr = np.asarray(ids, dtype=np.int32)
        n = len(arr)
        total = int(np.count_nonzero(arr))
        full = max(n, length)
        labels = np.full(full, IGNORE, dtype=np.int32)
        masked = None
        if cur < length and cur != total:
            masked = (
                "a round does not split into instruction and answer on ' ASSISTANT: '"
                if not labelled
                else f"labelled length {cur} != non-pad token count {total}"
            )
        else:
            labels[:n] = arr
            labels[0] = IGNORE
            for start, k in cuts:
                labels[start : start + k] = IGNORE
            labels[cur:] = IGNORE
            labels = labels[:length]
        if masked is None and not np.any(labels != IGNORE):
            masked = f"every answer token lies beyond seq_length+1={length} (truncated away)"
        # unpadded values and full lengths: the padding is added by the writer, not pickled
        kept = labels[: min(n, len(labels))] if masked is None else labels[:0]
        fields = {"input_ids": (arr[:length].tobytes(), length), "labels": (kept.tobytes(), len(labels))}
        rows.append(fields)
        rid = record.get("id") if isinstance(record, dict) else None
        stats.append(
            RecordStats(
                rid=str(rid) if isinstance(rid, (str, int)) else f"{job.files[file_no]}#{index}",
                masked=masked,
                truncated=n > length,
                supervised=int(np.count_nonzero(labels != IGNORE)),
                long_labels=len(labels) > length,
            )
        )
    return rows, stats


# ---------------------------------------------------------------- wiki


_WIKI_REPLACE = [
    ("s '", "s'"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
]  # fmt: skip
_WIKI_BRACKETS = [
    (r"/' [0-9]/", r"/'[0-9]/"),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (r"'\s*([^']*?)\s*'", r"'\1'"),
]
_WIKI_TAIL = [
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
    (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
]  # fmt: skip


def clean_wikitext(text: str) -> str:
    """The reference's wikitext clean-up (detokenize spacing, number separators, brackets)."""
    text = text.replace(*_WIKI_REPLACE[0])
    text = re.sub(*_WIKI_BRACKETS[0], text)
    for old, new in _WIKI_REPLACE[1:]:
        text = text.replace(old, new)
    for pattern, repl in _WIKI_BRACKETS[1:]:
        text = re.sub(pattern, repl, text)
    for old, new in _WIKI_TAIL:
        text = text.replace(old, new)
    return text


def _wiki_paragraphs(files: list[str]) -> Iterator[str]:
    """Paragraphs to tokenize: blank-line separated, headings ('=') skipped. Each file is read
    whole, as the reference does, since its clean-up regexes may span lines."""
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{name}: cannot read as UTF-8 text ({exc})") from None
        for para in clean_wikitext(text).split("\n\n"):
            if para and not para.strip().startswith("="):
                yield para


def _wiki_chunk(paras: list[str]) -> np.ndarray:
    """Token ids of paragraphs, each as bos + ids + eos, concatenated."""
    out: list[int] = []
    for ids in _STATE["sp"].encode(paras):
        out.append(BOS)
        out += ids
        out.append(EOS)
    return np.asarray(out, dtype=np.int32)


# ---------------------------------------------------------------- ordered parallel map


@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """While workers start, keep `spawn` from re-running the parent's main script in them.

    A spawned child runs the parent's `__main__` file again before it takes a task. The workers
    need nothing from it (their code is in this module), and some scripts fail when run twice:
    inside an Airflow worker `__main__` is the `airflow` command, whose start-up dies in a child.
    A main module run by name (`python -m ...`) has a `__spec__` and is left alone.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _ordered_map(fn: Callable[[Any], Any], tasks: Iterable[Any], job: _Job, workers: int) -> Iterator[Any]:
    """fn over tasks in `workers` processes, results in task order, at most 2 tasks per worker
    in flight (so neither input nor results pile up in memory)."""
    if workers <= 1:
        _init_worker(job)
        yield from map(fn, tasks)
        return
    ctx = get_context("spawn")  # the parent holds MindSpore's threads: do not fork it
    with (
        _main_script_hidden(),
        ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(job,)) as pool,
    ):
        pending: collections.deque[Future[Any]] = collections.deque()
        try:
            for task in tasks:
                pending.append(pool.submit(fn, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- MindRecord output


class _MindRecordSink:
    """mindspore.mindrecord.FileWriter writing into a hidden folder beside the output.

    Rows go straight to the C++ shard writer as ready-made blobs in FileWriter's own row layout:
    FileWriter.write_raw_data would re-validate and re-pack every 4097-long row in Python, which
    costs more than the tokenization. MindSpore is imported on a thread from the start and the
    writer opened at the first row, so the import overlaps the workers' start-up. Each shard's
    dirty pages are sent to disk every `WRITEBACK_EVERY` row bytes, so the final fsync does
    not wait for the whole output. `publish()` renames the files into place; the MindRecord
    header names its shards by base name, so the renamed files read back unchanged.
    """

    WRITEBACK_EVERY = 32 << 20  # row bytes before compression

    def __init__(self, final: Path, shards: int, schema: dict[str, Any], description: str) -> None:
        self.final = final
        self.shards, self.schema, self.description = shards, schema, description
        self.tmp_dir = temp_sibling(final)
        self.tmp_dir.mkdir(parents=True)
        self._import = threading.Thread(target=importlib.import_module, args=("mindspore.mindrecord",))
        self._import.start()
        self._fw: Any = None
        self._shard_fds: list[int] = []
        self._unsynced = 0
        self._padding = {name: b"" for name in schema}
        self.rows = 0

    def _open(self) -> Any:
        if self._fw is None:
            self._import.join()
            from mindspore.mindrecord import FileWriter

            fw = FileWriter(str(self.tmp_dir / self.final.name), shard_num=self.shards)
            fw.add_schema(self.schema, self.description)
            fw._writer.open(fw._paths, False)
            fw._writer.set_shard_header(fw._header)
            self._fw, self._blob_fields = fw, list(fw._header.blob_fields)
            self._write = fw._writer._writer.write_raw_data
            self._shard_fds = [os.open(path, os.O_RDONLY) for path in fw._paths]
        return self._fw

    def write(self, rows: list[Row]) -> None:
        """Write rows; a row holds, per field, the field's leading values as int32 bytes and its
        full length: the rest is the field's pad value."""
        if rows:
            self._open()
            blobs = [self._blob(row) for row in rows]
            self._write({}, blobs, False, False)
            self.rows += len(rows)
            self._start_writeback(sum(map(len, blobs)))

    def _start_writeback(self, written: int) -> None:
        """Count the row bytes handed to the writer; every WRITEBACK_EVERY of them, start the
        writeback of every shard, whole (the writer fills pages in place, not in file order)."""
        self._unsynced += written
        if self._unsynced >= self.WRITEBACK_EVERY:
            for fd in self._shard_fds:
                start_writeback(fd)
            self._unsynced = 0

    def _blob(self, row: Row) -> bytes:
        """FileWriter's layout: one field's bytes, or each field's prefixed by its 8-byte length."""
        parts: list[bytes | memoryview] = []
        for name in self._blob_fields:
            values, length = row[name]
            size, missing = 4 * length, 4 * length - len(values)
            if len(self._padding[name]) < missing:
                self._padding[name] = np.full(length, FIELD_PAD[name], np.int32).tobytes()
            if len(self._blob_fields) > 1:
                parts.append(size.to_bytes(8, "big"))
            parts += [values, memoryview(self._padding[name])[:missing]]
        return b"".join(parts)

    def publish(self) -> list[Path]:
        """Commit, fsync and rename every file into the output folder; return the final paths."""
        self._open().commit()
        self._close_fds()
        fsync_tree(self.tmp_dir)
        finals = []
        for tmp in sorted(self.tmp_dir.iterdir()):
            final = self.final.parent / tmp.name
            os.replace(tmp, final)
            finals.append(final)
        fsync_dir(self.final.parent)
        remove_path(self.tmp_dir)
        return finals

    def discard(self) -> None:
        self._close_fds()
        remove_path(self.tmp_dir)

    def _close_fds(self) -> None:
        for fd in self._shard_fds:
            os.close(fd)
        self._shard_fds = []


# ---------------------------------------------------------------- the stage


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
) -> PreprocessResult:
    """Tokenize conversation records (`qa`) or wikitext (`wiki`) into MindRecord files."""
    t0 = time.monotonic()
    if dataset_type not in ("qa", "wiki"):
        raise InputError(f"dataset_type must be 'qa' or 'wiki', got {dataset_type!r}")
    if masking not in MASKING_OFFSET:
        raise InputError(f"masking must be one of {sorted(MASKING_OFFSET)}, got {masking!r}")
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
    key = cache_key(STAGE, FORMAT_VERSION, [*files, model_file], params)
    rpath = report_path(out)
    hit = cached(rpath, key)
    if hit is not None:
        result = PreprocessResult(**{**hit.extra["result"], "cached": True})
        log.info("%s is up to date (cache hit, key %s): nothing to do", out, key[:12])
        print(f"Transformed {result.records_written} records.")
        print(f"Transform finished, output files refer: {console_path}")
        return result

    clean_leftovers(out.parent, out.name)
    rpath.unlink(missing_ok=True)  # outputs are about to change: the old report no longer holds
    workers = workers or os.cpu_count() or 1
    if dataset_type == "qa":
        schema = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
    else:
        schema = {"input_ids": {"type": "int32", "shape": [-1]}}
    sink = _MindRecordSink(out, file_partition, schema, dataset_type)
    job = _Job(dataset_type, str(model_file), seq_length, masking, files, params["repeat"])
    result = PreprocessResult(
        output_file=str(output_file), console_path=console_path, records_written=0, seq_length=seq_length,
        dataset_type=dataset_type, masking=masking, file_partition=file_partition,
        repeat=params["repeat"], tokenizer={"path": str(model_file), "sha256": file_sha256(model_file)},
        inputs=[{"path": f, "sha256": file_sha256(f)} for f in files],
    )  # fmt: skip
    try:
        if dataset_type == "qa":
            _run_qa(job, workers, sink, result)
        else:
            _run_wiki(job, workers, sink, result)
        finals = sink.publish()
    except BaseException:
        sink.discard()
        raise
    result.outputs = [str(p) for p in finals]
    result.seconds = round(time.monotonic() - t0, 3)
    write_manifest(rpath, stage=STAGE, key=key, outputs=finals, extra={"result": asdict(result)})
    print(f"Transformed {result.records_written} records.")
    print(f"Transform finished, output files refer: {console_path}")
    return result


def _run_qa(job: _Job, workers: int, sink: _MindRecordSink, result: PreprocessResult) -> None:
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

    masked, truncated, long_labels = _Listed(), _Listed(), _Listed()
    reasons: collections.Counter[str] = collections.Counter()
    for rows, stats in _ordered_map(_qa_chunk, _batched(records(), QA_CHUNK), job, workers):
        sink.write(rows)
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


def _run_wiki(job: _Job, workers: int, sink: _MindRecordSink, result: PreprocessResult) -> None:
    length = job.seq_length + 1
    # Tokens go to a scratch file so that --repeat replays them without holding them in memory.
    scratch = sink.tmp_dir / "tokens.scratch"
    n_tokens = 0
    with open(scratch, "wb") as f:
        for ids in _ordered_map(_wiki_chunk, _batched(_wiki_paragraphs(job.files), WIKI_CHUNK), job, workers):
            f.write(ids.tobytes())
            n_tokens += len(ids)
    progress = Progress("llama_preprocess wiki", total=n_tokens * job.repeat // length, logger=log)
    itemsize = np.dtype(np.int32).itemsize
    carry = np.zeros(0, dtype=np.int32)
    for _ in range(job.repeat):
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_core.data.llama_preprocess",
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
        "--masking",
        choices=sorted(MASKING_OFFSET),
        default="mindformers",
        help="instruction masking: mindformers (reference, -3) or fastchat (-2)",
    )
    args = parser.parse_args(argv)
    preprocess(
        args.dataset_type, args.input_glob, args.model_file, args.output_file, seq_length=args.seq_length,
        file_partition=args.file_partition, repeat=args.repeat, workers=args.workers, masking=args.masking,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    exit_without_teardown(run(main))
