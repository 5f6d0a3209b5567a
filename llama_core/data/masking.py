"""Conversation records -> `input_ids` and `labels`, token-identical to MindFormers 1.3
(docs/REFERENCE.md, token layout and masking). Runs in the tokenizer worker processes.

Each record becomes its vicuna_v1.1 prompt (`llama_core.data.prompts`), split into rounds on
"</s>"; a round's ids are bos-less sentencepiece ids followed by eos, the record starts with bos.
Records hold seq_length+1 ids (pad 0) and labels (ignore -100). Reference quirks reproduced by
default (`mindformers` masking), each counted in the stage report:

1. The instruction part of a round is masked with `len(Tokenize(part0 + " ASSISTANT: ")) - 3`
   tokens (FastChat uses -2), so the last token of " ASSISTANT: " stays supervised.
   `fastchat` masking uses -2; every other rule stays the same.
2. A round that does not split into exactly two parts on " ASSISTANT: " stops the labelling.
   This happens when an answer contains " ASSISTANT: ", when an answer is empty (fschat then
   writes "ASSISTANT:" with no space) or when a conversation ends with a human turn. If the
   labelled length then falls short of the token count (and of seq_length+1) the WHOLE record
   is masked (all -100): the reference does this silently, the stage logs it as a WARNING.
3. Labels are computed on the padded, untruncated ids and only then cut to seq_length+1; a
   record masked by quirk 2 keeps its untruncated label length (longer than seq_length+1 when
   its ids were).
4. A gpt turn first in a conversation is dropped; roles must then alternate (else error).
5. Messages are joined by the template and split back on "</s>": an answer containing "</s>"
   splits into extra rounds; token building stops at the first empty round.

Speed: a round's ids are the tokens of `part0 + " ASSISTANT:"` followed by those of the answer,
and the instruction length is the first count plus one. That needs one sentencepiece pass per
round instead of the reference's three, and is exact when no vocabulary piece contains a space
mark after other text (`splits_at_spaces`, checked on the loaded model; it holds for the Llama 2
tokenizer; otherwise the literal two encodes are used). All texts of a chunk of records are
encoded in one call.

The other chat formats (`llama_core.data.chat`: llama3, hf, chatml) have none of these quirks: a
record is its conversation's ids with the assistants' tokens and end-of-turn tokens as labels
(`DialogFormat.encode_dialog`), cut to seq_length+1, with the same padding, statistics and report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llama_core.data.chat import DialogFormat, chat_format
from llama_core.data.mindrecord_sink import Row
from llama_core.data.prompts import TEMPLATE, conversation_messages, record_id, record_label, vicuna_prompt
from llama_core.data.tokenizer import BOS, EOS, load_tokenizer, open_tokenizer, splits_at_spaces
from llama_core.errors import InputError

IGNORE = -100
PAD = 0
MASKING_OFFSET = {"mindformers": 3, "fastchat": 2}


@dataclass
class QaJob:
    """Everything a worker needs; sent once to each worker process."""

    model_file: str
    seq_length: int
    masking: str
    files: list[str]
    chat_template: str = TEMPLATE  # resolved: never None here


@dataclass
class RecordStats:
    """Per-record facts the report needs."""

    rid: str
    masked: str | None  # reason, when every label is IGNORE (quirk 2, or the answers truncated away)
    truncated: bool
    supervised: int
    long_labels: bool  # labels kept longer than seq_length+1 (quirk 3)


_STATE: dict[str, Any] = {}  # this worker's job, tokenizer and template (set by init_qa_worker)

# How a round is tokenized: SPLIT (texts: instruction head, answer), LITERAL (texts: round,
# part0 + " ASSISTANT: ") or UNLABELLED (text: round; labelling stopped at or before this round).
_SPLIT, _LITERAL, _UNLABELLED = range(3)
# Per round: (how, index of its first text in the chunk's texts, ids before the first text).
Plan = list[tuple[int, int, list[int] | None]]


def init_qa_worker(job: QaJob) -> None:
    """Load the tokenizer and the template once per worker process."""
    _STATE.clear()  # one worker in the calling process serves one run after another
    if job.chat_template != TEMPLATE:
        fmt = chat_format(open_tokenizer(job.model_file), job.chat_template)
        assert isinstance(fmt, DialogFormat)  # every format but vicuna_v1.1 makes records
        _STATE.update(job=job, fmt=fmt)
        return
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


def qa_chunk(items: list[tuple[int, int, Any]]) -> tuple[list[Row], list[RecordStats]]:
    """Tokenize and label a chunk of `(file number, index, record)`; return the records' rows
    (see `MindRecordSink.write`) and stats, in order."""
    job: QaJob = _STATE["job"]
    if "fmt" in _STATE:
        return _dialog_chunk(items)
    texts: list[str] = []
    plans = [
        _plan_rounds(vicuna_prompt(_STATE["conv"], job.files[file_no], index, record), texts)
        for file_no, index, record in items
    ]
    encoded = _STATE["sp"].encode(texts, num_threads=1)  # one thread: the workers are the parallelism
    rows, stats = [], []
    for (file_no, index, record), plan in zip(items, plans, strict=True):
        ids, cuts, cur, labelled = _join_rounds(plan, encoded, MASKING_OFFSET[job.masking])
        rid = record_id(job.files[file_no], index, record)
        row, st = _record(rid, ids, cuts, cur, labelled, job.seq_length + 1)
        rows.append(row)
        stats.append(st)
    return rows, stats


def _plan_rounds(prompt: str, texts: list[str]) -> Plan:
    """Split a prompt into rounds and append the texts to tokenize for them to `texts`."""
    conv, fast, system = _STATE["conv"], _STATE["fast"], _STATE["system"]
    sep = conv.sep + conv.roles[1] + ": "  # " ASSISTANT: "
    head = sep.rstrip(" ")
    plan: Plan = []
    labelled = True
    for rou in prompt.split(conv.sep2):
        if rou == "":
            break
        parts = rou.split(sep) if labelled else ()
        labelled = len(parts) == 2
        if labelled and fast and parts[1]:
            # tokens(round) = tokens(part0 + " ASSISTANT:") + tokens(answer); see the module doc.
            instr = parts[0] + head
            prefix: list[int] = []
            if system is not None and instr.startswith(system):
                instr, prefix = instr[len(system) :], _STATE["system_ids"]
            plan.append((_SPLIT, len(texts), prefix))
            texts += [instr, parts[1]]
        elif labelled:
            plan.append((_LITERAL, len(texts), None))
            texts += [rou, parts[0] + sep]
        else:
            plan.append((_UNLABELLED, len(texts), None))
            texts.append(rou)
    return plan


def _join_rounds(
    plan: Plan, encoded: list[list[int]], offset: int
) -> tuple[list[int], list[tuple[int, int]], int, bool]:
    """A record's ids, its instruction spans `(start, tokens)` to mask, the labelled length, and
    whether the last round was labelled."""
    ids, cuts, cur = [BOS], [], 1
    labelled = True
    for how, i, prefix in plan:
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
    return ids, cuts, cur, labelled


def _record(
    rid: str, ids: list[int], cuts: list[tuple[int, int]], cur: int, labelled: bool, length: int
) -> tuple[Row, RecordStats]:
    """The row of record `rid` cut to `length` ids, labelled by quirks 2 and 3, and its stats."""
    arr = np.asarray(ids, dtype=np.int32)
    n = len(arr)
    total = int(np.count_nonzero(arr))
    labels = np.full(max(n, length), IGNORE, dtype=np.int32)
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
    row = {"input_ids": (arr[:length].tobytes(), length), "labels": (kept.tobytes(), len(labels))}
    stats = RecordStats(
        rid=rid,
        masked=masked,
        truncated=n > length,
        supervised=int(np.count_nonzero(labels != IGNORE)),
        long_labels=len(labels) > length,
    )
    return row, stats


def _dialog_chunk(items: list[tuple[int, int, Any]]) -> tuple[list[Row], list[RecordStats]]:
    """`qa_chunk` for the formats of `llama_core.data.chat`: labels are the ids of the supervised
    spans; a record without one (no assistant turn, or cut away) is reported as fully masked."""
    job: QaJob = _STATE["job"]
    fmt: DialogFormat = _STATE["fmt"]
    length = job.seq_length + 1
    rows, stats = [], []
    for file_no, index, record in items:
        path = job.files[file_no]
        messages = conversation_messages(path, index, record)
        try:
            ids, spans = fmt.encode_dialog(messages)
        except InputError as exc:
            raise InputError(f"{record_label(path, index, record)}: {exc}") from None
        arr = np.asarray(ids, dtype=np.int32)
        labels = np.full(len(arr), IGNORE, dtype=np.int32)
        for start, end in spans:
            labels[start:end] = arr[start:end]
        labels = labels[:length]
        supervised = int(np.count_nonzero(labels != IGNORE))
        masked = None
        if not spans:
            masked = "no assistant turn to supervise"
        elif not supervised:
            masked = f"every answer token lies beyond seq_length+1={length} (truncated away)"
        kept = labels if masked is None else labels[:0]
        rows.append({"input_ids": (arr[:length].tobytes(), length), "labels": (kept.tobytes(), length)})
        rid = record_id(path, index, record)
        stats.append(RecordStats(rid, masked, len(arr) > length, supervised, long_labels=False))
    return rows, stats
