"""Held-out evaluation split (`llama_preprocess --holdout_fraction`): a record is held out when the
sha256 of its conversation's canonical JSON, mapped to [0, 1), is below the fraction.

Expectations are recomputed here from the specification (hashlib over the canonical JSON of each
record's `conversations`) and from the unsplit output of the same input, never taken from the
implementation's own numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llama_core.cache import cache_key
from llama_core.data import mindrecord_sink
from llama_core.data.alpaca_converter import convert_alpaca
from llama_core.data.holdout import default_eval_path, holdout_score, is_held_out
from llama_core.data.llama_preprocess import FORMAT_VERSION, STAGE, main, preprocess, report_path
from llama_core.errors import InputError

SEQ = 256  # short enough that records are truncated and two lose every answer token
FRACTION = 0.1
IGN = -100

Row = tuple[bytes, ...]


def score_by_hand(conversations: object) -> float:
    text = json.dumps(conversations, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def read(path: Path, fields: tuple[str, ...] = ("input_ids", "labels")) -> list[list[np.ndarray]]:
    import mindspore.dataset as ds

    data = ds.MindDataset(str(path), columns_list=list(fields), shuffle=False)
    return [list(row) for row in data.create_tuple_iterator(output_numpy=True, num_epochs=1)]


def rows(path: Path) -> list[Row]:
    return [tuple(a.tobytes() for a in row) for row in read(path)]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def data(
    tmp_path_factory: pytest.TempPathFactory, alpaca_path: Path, tokenizer_path: Path
) -> SimpleNamespace:
    """The Alpaca sample as conversations, tokenized unsplit and split at FRACTION."""
    base = tmp_path_factory.mktemp("holdout")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse memo fixture is not active yet
        mp.setenv("LLAMA_CORE_CACHE_DIR", str(base / "digests"))
        conv = base / "conv.json"
        convert_alpaca(alpaca_path, conv)
        plain_out, split_out = base / "plain" / "alpaca.mindrecord", base / "split" / "alpaca.mindrecord"
        plain = preprocess("qa", str(conv), tokenizer_path, plain_out, seq_length=SEQ, workers=2)
        split = preprocess(
            "qa", str(conv), tokenizer_path, split_out, seq_length=SEQ, workers=2, holdout_fraction=FRACTION
        )
    records = json.loads(conv.read_text())
    return SimpleNamespace(
        conv=conv,
        records=records,
        held=[score_by_hand(r["conversations"]) < FRACTION for r in records],
        plain=plain,
        plain_rows=rows(plain_out),
        plain_out=plain_out,
        split=split,
        split_out=split_out,
        eval_out=base / "split" / "alpaca-heldout.mindrecord",
    )


def test_holdout_score_hashes_the_conversation_only() -> None:
    rec = {
        "id": "7",
        "conversations": [{"from": "human", "value": "Grüß 世界"}, {"from": "gpt", "value": "ok"}],
    }
    assert holdout_score(rec) == score_by_hand(rec["conversations"])
    assert 0.0 <= holdout_score(rec) < 1.0
    same = {
        "conversations": [{"value": "Grüß 世界", "from": "human"}, {"value": "ok", "from": "gpt"}],
        "id": 9,
    }
    assert holdout_score(same) == holdout_score(rec)  # neither the id nor the key order counts
    other = {
        "id": "7",
        "conversations": [{"from": "human", "value": "Grüß 世界"}, {"from": "gpt", "value": "ok."}],
    }
    assert holdout_score(other) != holdout_score(rec)
    score = holdout_score(rec)
    assert not is_held_out(rec, 0.0)
    assert is_held_out(rec, min(score + 1e-9, 0.999999)) and not is_held_out(rec, score)
    assert default_eval_path("d/alpaca.mindrecord") == Path("d/alpaca-heldout.mindrecord")
    assert default_eval_path("a.b.mindrecord") == Path("a.b-heldout.mindrecord")
    assert default_eval_path("data") == Path("data-heldout")


def test_train_and_heldout_rows_together_are_the_unsplit_rows(data: SimpleNamespace) -> None:
    train, heldout = rows(data.split_out), rows(data.eval_out)
    assert train and heldout
    assert Counter(train) + Counter(heldout) == Counter(data.plain_rows)
    split, plain, hold = data.split, data.plain, data.split.holdout
    assert split.records_written == len(train) and hold["records"] == len(heldout)
    assert hold["fraction"] == FRACTION and Path(hold["output_file"]) == data.eval_out
    held_supervised = sum(int((labels != IGN).sum()) for _, labels in read(data.eval_out))
    assert hold["supervised_tokens"] == held_supervised > 0
    assert split.supervised_tokens + held_supervised == plain.supervised_tokens
    for key in ("records_truncated", "records_fully_masked"):
        assert getattr(split, key)["count"] + hold[key]["count"] == getattr(plain, key)["count"]
    # the report (written last) lists both outputs; the training numbers describe the training file
    manifest = json.loads(report_path(data.split_out).read_text())
    assert sorted(manifest["outputs"]) == sorted(
        [
            "alpaca.mindrecord",
            "alpaca.mindrecord.db",
            "alpaca-heldout.mindrecord",
            "alpaca-heldout.mindrecord.db",
        ]
    )
    assert manifest["result"]["holdout"] == json.loads(json.dumps(hold))
    assert [Path(p).name for p in manifest["result"]["outputs"]] == [
        "alpaca.mindrecord",
        "alpaca.mindrecord.db",
    ]
    assert files_in(data.split_out.parent) == sorted([*manifest["outputs"], "alpaca.mindrecord.report.json"])


def test_heldout_rows_are_the_records_whose_hash_falls_below_the_fraction(data: SimpleNamespace) -> None:
    assert len(data.plain_rows) == len(data.records)  # one row per record, in input order
    for rec, held in zip(data.records, data.held, strict=True):
        assert is_held_out(rec, FRACTION) == held
    expected_heldout = [row for row, held in zip(data.plain_rows, data.held, strict=True) if held]
    expected_train = [row for row, held in zip(data.plain_rows, data.held, strict=True) if not held]
    assert rows(data.eval_out) == expected_heldout  # exactly those records, in input order
    assert rows(data.split_out) == expected_train
    n, k = len(data.records), sum(data.held)
    assert abs(k - n * FRACTION) < 4.5 * math.sqrt(n * FRACTION * (1 - FRACTION))  # binomial bounds


def test_split_ignores_order_ids_and_other_records(
    tmp_path: Path, data: SimpleNamespace, tokenizer_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shuffled, renumbered, spread over two files, with new records and duplicates added: the
    original records fall on the same side, the new ones by their own hash, duplicates together."""
    records = [dict(r) for r in data.records]
    random.Random(1).shuffle(records)
    held_dup = next(r for r, h in zip(data.records, data.held, strict=True) if h)
    train_dup = next(r for r, h in zip(data.records, data.held, strict=True) if not h)
    extra = [{"conversations": held_dup["conversations"]}, {"conversations": train_dup["conversations"]}]
    i = 0
    while sum(score_by_hand(r["conversations"]) < FRACTION for r in extra) < 4 or len(extra) < 30:
        extra.append({"conversations": turns(f"New question {i}?", f"New answer {i}.")})
        i += 1
    records += extra
    for n, rec in enumerate(records):
        rec["id"] = f"s{n}"
    (tmp_path / "a.json").write_text(json.dumps(records[:500], ensure_ascii=False))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[500:]))
    out, eval_out = tmp_path / "train" / "t.mindrecord", tmp_path / "eval" / "e.mindrecord"
    with caplog.at_level(logging.INFO, logger="llama_core.data.llama_preprocess"):
        assert main(["--dataset_type", "qa", "--input_glob", str(tmp_path / "*.json*"), "--model_file",
                     str(tokenizer_path), "--seq_length", str(SEQ), "--output_file", str(out),
                     "--workers", "2", "--holdout_fraction", str(FRACTION),
                     "--eval_output_file", str(eval_out)]) == 0  # fmt: skip
    extra_held = sum(score_by_hand(r["conversations"]) < FRACTION for r in extra)
    new_heldout, new_train = Counter(rows(eval_out)), Counter(rows(out))
    old_heldout, old_train = Counter(rows(data.eval_out)), Counter(rows(data.split_out))
    assert not old_heldout - new_heldout and not old_train - new_train  # every original on its side
    assert new_heldout.total() == old_heldout.total() + extra_held
    assert new_train.total() == old_train.total() + len(extra) - extra_held
    # a copy (another id) of a held-out record is held out too, a copy of a training record trains
    held_row = data.plain_rows[data.records.index(held_dup)]
    train_row = data.plain_rows[data.records.index(train_dup)]
    assert new_heldout[held_row] == old_heldout[held_row] + 1 and new_train[held_row] == old_train[held_row]
    assert new_train[train_row] == old_train[train_row] + 1 and new_heldout[train_row] == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("held-out split"))
    assert f"{extra_held + sum(data.held)} of {len(records)} records" in line and str(eval_out) in line
    # the held-out file in another folder is part of the complete output: an identical run hits
    again = preprocess("qa", str(tmp_path / "*.json*"), tokenizer_path, out, seq_length=SEQ,
                       holdout_fraction=FRACTION, eval_output_file=eval_out)  # fmt: skip
    assert again.cached and again.holdout["records"] == new_heldout.total()


def test_fraction_zero_changes_nothing_and_the_fraction_is_in_the_cache_key(
    tmp_path: Path, data: SimpleNamespace, tokenizer_path: Path
) -> None:
    out = tmp_path / "alpaca.mindrecord"

    def run(**kw):
        return preprocess("qa", str(data.conv), tokenizer_path, out, seq_length=SEQ, workers=2, **kw)

    zero = run(holdout_fraction=0.0, eval_output_file=tmp_path / "unused.mindrecord")
    assert not zero.cached
    assert files_in(tmp_path) == [
        "alpaca.mindrecord",
        "alpaca.mindrecord.db",
        "alpaca.mindrecord.report.json",
    ]
    for suffix in ("", ".db"):  # the same bytes as a run that never heard of holdout
        assert (tmp_path / f"alpaca.mindrecord{suffix}").read_bytes() == (
            data.plain_out.parent / f"alpaca.mindrecord{suffix}"
        ).read_bytes()
    assert zero.holdout["output_file"] is None and zero.holdout["records"] == 0
    # the key of an unsplit run is the key it had before the split existed: old caches stay valid
    manifest = json.loads(report_path(out).read_text())
    params = {"dataset_type": "qa", "seq_length": SEQ, "file_partition": 1, "repeat": 1,
              "masking": "mindformers", "name": out.name}  # fmt: skip
    assert manifest["cache_key"] == cache_key(STAGE, FORMAT_VERSION, [str(data.conv), tokenizer_path], params)
    assert run().cached and run().cached and run(holdout_fraction=0.0).cached

    tenth = run(holdout_fraction=0.1)
    assert not tenth.cached and (tmp_path / "alpaca-heldout.mindrecord").exists()
    assert run(holdout_fraction=0.1).cached
    fifth = run(holdout_fraction=0.2)
    assert not fifth.cached and fifth.holdout["records"] > tenth.holdout["records"]
    assert Counter(rows(tmp_path / "alpaca-heldout.mindrecord")) > Counter(
        rows(data.eval_out)
    )  # 0.1 within 0.2
    # back to no split: rewritten, and the previous run's held-out file (whose records are now
    # training records) does not stay behind
    again = run()
    assert not again.cached
    assert files_in(tmp_path) == [
        "alpaca.mindrecord",
        "alpaca.mindrecord.db",
        "alpaca.mindrecord.report.json",
    ]


def split_docs(path: Path) -> Counter[tuple[bytes, bytes]]:
    """The documents of a packed file, cut at `actual_seq_len`."""
    docs: Counter[tuple[bytes, bytes]] = Counter()
    for ids, labels, ends in read(path, ("input_ids", "labels", "actual_seq_len")):
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            docs[(ids[start:end].tobytes(), labels[start:end].tobytes())] += 1
    return docs


def docs_by_side(
    plain_out: Path, held: list[bool]
) -> tuple[dict[bool, Counter[tuple[bytes, bytes]]], Counter[bool]]:
    """The unsplit records with a supervised token, cut at their last non-pad id, by side (held out
    or not); and the count of those without one, by side."""
    expected: dict[bool, Counter[tuple[bytes, bytes]]] = {True: Counter(), False: Counter()}
    unsupervised: Counter[bool] = Counter()
    for (ids, labels), side in zip(read(plain_out), held, strict=True):
        if not (labels != IGN).any():
            unsupervised[side] += 1
            continue
        n = int(np.flatnonzero(ids)[-1]) + 1
        expected[side][(ids[:n].tobytes(), labels[:n].tobytes())] += 1
    return expected, unsupervised


def test_packed_split_holds_every_document_once(
    tmp_path: Path, data: SimpleNamespace, tokenizer_path: Path
) -> None:
    out = tmp_path / "p.mindrecord"
    res = preprocess("qa", str(data.conv), tokenizer_path, out, seq_length=SEQ, workers=2, packing="pack",
                     holdout_fraction=FRACTION)  # fmt: skip
    expected, unsupervised = docs_by_side(data.plain_out, data.held)
    assert sum(unsupervised.values()) > 0  # at SEQ some records lose every answer token
    train_docs, held_docs = split_docs(out), split_docs(tmp_path / "p-heldout.mindrecord")
    assert held_docs == expected[True] and train_docs == expected[False]
    assert train_docs + held_docs == expected[True] + expected[False]  # each document exactly once
    hold = res.holdout
    assert hold["documents"] == held_docs.total() and hold["records"] == len(
        read(tmp_path / "p-heldout.mindrecord")
    )
    assert res.packing["documents"] == train_docs.total() and res.records_written == len(read(out))
    assert res.packing["skipped_unsupervised"]["count"] == unsupervised[False]
    assert hold["packing"]["skipped_unsupervised"]["count"] == unsupervised[True]


@pytest.mark.parametrize("chat_case", ["llama3", "hf", "chatml"], indirect=True)
def test_split_and_packed_split_in_each_chat_format(
    tmp_path: Path, data: SimpleNamespace, chat_case: tuple[Path, str]
) -> None:
    """Whatever the chat format, the held-out records are those whose hash falls below the fraction:
    the split's rows are the unsplit rows of those records, the packed split holds their documents."""
    tokenizer, template = chat_case

    def run(name: str, **kw: object) -> Path:
        out = tmp_path / name / "alpaca.mindrecord"
        preprocess(
            "qa", str(data.conv), tokenizer, out, seq_length=SEQ, workers=2, chat_template=template, **kw
        )
        return out

    plain = run("plain")
    split = run("split", holdout_fraction=FRACTION)
    packed = run("packed", holdout_fraction=FRACTION, packing="pack")
    plain_rows = rows(plain)
    assert rows(split.with_name("alpaca-heldout.mindrecord")) == [
        row for row, held in zip(plain_rows, data.held, strict=True) if held
    ]
    assert rows(split) == [row for row, held in zip(plain_rows, data.held, strict=True) if not held]
    expected, _ = docs_by_side(plain, data.held)
    assert split_docs(packed.with_name("alpaca-heldout.mindrecord")) == expected[True]
    assert split_docs(packed) == expected[False]


def test_bad_fraction_wiki_and_same_file_are_refused(
    tmp_path: Path, data: SimpleNamespace, tokenizer_path: Path
) -> None:
    out = tmp_path / "o" / "d.mindrecord"
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match=re.escape(f"holdout_fraction must be in [0, 1), got {bad}")):
            preprocess("qa", str(data.conv), tokenizer_path, out, seq_length=SEQ, holdout_fraction=bad)
    with pytest.raises(InputError, match=r"got 1\.0"):
        main(["--dataset_type", "qa", "--input_glob", str(data.conv), "--model_file", str(tokenizer_path),
              "--output_file", str(out), "--holdout_fraction", "1"])  # fmt: skip
    (tmp_path / "w.txt").write_text("Some wiki text .\n\nMore text .\n")
    with pytest.raises(InputError, match="holdout_fraction applies to conversations"):
        preprocess("wiki", str(tmp_path / "w.txt"), tokenizer_path, out, seq_length=SEQ, holdout_fraction=0.1)
    with pytest.raises(InputError, match="is the training output file"):
        preprocess("qa", str(data.conv), tokenizer_path, out, seq_length=SEQ, holdout_fraction=0.1,
                   eval_output_file=out)  # fmt: skip
    assert not out.parent.exists()


def test_a_failed_publish_leaves_neither_split(
    tmp_path: Path, tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recs = [{"id": str(i), "conversations": turns(f"Q {i}?", f"A {i}.")} for i in range(40)]
    assert 0 < sum(score_by_hand(r["conversations"]) < 0.5 for r in recs) < len(recs)
    src = tmp_path / "in.json"
    src.write_text(json.dumps(recs))
    folder = tmp_path / "out"
    out = folder / "d.mindrecord"
    first = preprocess("qa", str(src), tokenizer_path, out, seq_length=32, workers=1, holdout_fraction=0.5)
    assert first.records_written + first.holdout["records"] == len(recs)
    real_publish = mindrecord_sink.MindRecordSink.publish

    def publish(self):
        if self.final.name.endswith("-heldout.mindrecord"):
            raise OSError("disk full")
        return real_publish(self)

    monkeypatch.setattr(mindrecord_sink.MindRecordSink, "publish", publish)
    with pytest.raises(OSError, match="disk full"):
        preprocess("qa", str(src), tokenizer_path, out, seq_length=32, workers=1, holdout_fraction=0.4)
    # no report (nothing is taken as complete), no training file published without its held-out
    # half, no temporary folder left; the previous run's held-out files went with its report
    assert files_in(folder) == []
    monkeypatch.setattr(mindrecord_sink.MindRecordSink, "publish", real_publish)
    assert not preprocess(
        "qa", str(src), tokenizer_path, out, seq_length=32, workers=1, holdout_fraction=0.5
    ).cached
