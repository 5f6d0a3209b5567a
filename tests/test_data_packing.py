"""Packing (`llama_preprocess --packing pack`): every conversation lands whole in exactly one row, as
the unpacked output has it; rows are filled first-fit decreasing; the report's figures add up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llama_core.data.alpaca_converter import convert_alpaca
from llama_core.data.llama_preprocess import main, preprocess, report_path
from llama_core.data.packing import first_fit_decreasing
from llama_core.errors import InputError

IGN = -100


def read(path: Path, fields: list[str]) -> list[list[np.ndarray]]:
    import mindspore.dataset as ds

    data = ds.MindDataset(str(path), columns_list=fields, shuffle=False)
    return [list(row) for row in data.create_tuple_iterator(output_numpy=True, num_epochs=1)]


def test_first_fit_decreasing_fills_rows_longest_first() -> None:
    lengths = [3, 8, 5, 2, 7, 4, 1]
    bins = first_fit_decreasing(lengths, 10)
    # 8 -> a; 7 -> b; 5 -> c; 4 -> c; 3 -> b; 2 -> a; 1 -> c (first with room): members in index order
    assert bins == [[1, 3], [0, 4], [2, 5, 6]]
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert first_fit_decreasing(lengths, 10) == bins  # deterministic
    with pytest.raises(ValueError, match="item 1 of length 8 exceeds the capacity 7"):
        first_fit_decreasing(lengths, 7)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory: pytest.TempPathFactory, alpaca_path: Path) -> Path:
    out = tmp_path_factory.mktemp("conv") / "conv.json"
    convert_alpaca(alpaca_path, out)
    return out


@pytest.mark.parametrize(
    ("chat_case", "seq"),
    [("vicuna_v1.1", 4096), ("vicuna_v1.1", 256), ("llama3", 160), ("hf", 256), ("chatml", 256)],
    indirect=["chat_case"],
)
def test_packed_rows_hold_every_conversation_of_the_unpacked_output_whole(
    tmp_path: Path, conversations: Path, chat_case: tuple[Path, str], seq: int
) -> None:
    """In every chat format. At 4096 nothing is truncated; at 256 (160 with Llama 3's longer tokens)
    many records are (each then fills a row alone) and some lose every answer token (left out of the
    packed rows, listed in the report)."""
    tokenizer, template = chat_case
    kw = {"seq_length": seq, "chat_template": template}
    plain = preprocess("qa", str(conversations), tokenizer, tmp_path / "plain.mindrecord", **kw)
    packed = preprocess(
        "qa", str(conversations), tokenizer, tmp_path / "packed.mindrecord", packing="pack", **kw
    )
    # the unpacked records with a supervised token, cut at their last non-pad id
    expected: Counter[tuple[bytes, bytes]] = Counter()
    unsupervised = 0
    for ids, labels in read(tmp_path / "plain.mindrecord", ["input_ids", "labels"]):
        if not (labels != IGN).any():
            unsupervised += 1
            continue
        n = int(np.flatnonzero(ids)[-1]) + 1
        expected[(ids[:n].tobytes(), labels[:n].tobytes())] += 1
    rows = read(tmp_path / "packed.mindrecord", ["input_ids", "labels", "actual_seq_len"])
    found: Counter[tuple[bytes, bytes]] = Counter()
    for ids, labels, ends in rows:
        assert len(ids) == len(labels) == seq + 1
        assert np.all(np.diff(ends) > 0) and ends[-1] <= seq + 1
        assert np.all(ids[ends[-1] :] == 0) and np.all(labels[ends[-1] :] == IGN)  # padding after the last
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            assert labels[start] == IGN  # no target crosses into the next document
            found[(ids[start:end].tobytes(), labels[start:end].tobytes())] += 1
    assert found == expected  # every conversation once, whole, tokens and labels unchanged

    report = json.loads(report_path(tmp_path / "packed.mindrecord").read_text())["result"]["packing"]
    assert report == packed.packing
    assert report["documents"] == sum(expected.values()) == plain.records_written - unsupervised
    assert report["rows"] == len(rows) == packed.records_written
    assert report["skipped_unsupervised"]["count"] == unsupervised
    assert report["documents_per_row_max"] == max(len(r[2]) for r in rows)
    tokens = sum(int(r[2][-1]) for r in rows)
    assert report["fill_ratio"] == round(tokens / (len(rows) * (seq + 1)), 4)
    assert report["unpacked_rows"] == plain.records_written
    assert report["rows_saved_ratio"] == round(plain.records_written / len(rows), 3)
    assert packed.supervised_tokens == plain.supervised_tokens
    if seq == 4096:
        assert unsupervised == 0 and report["rows_saved_ratio"] > 10 and report["fill_ratio"] > 0.95
    else:
        assert plain.records_truncated["count"] > 0 and unsupervised > 0


def test_packing_is_part_of_the_cache_key_and_refused_for_wiki(
    tmp_path: Path, conversations: Path, tokenizer_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d.mindrecord"
    args = ["--dataset_type", "qa", "--input_glob", str(conversations), "--model_file", str(tokenizer_path),
            "--seq_length", "2048", "--output_file", str(out)]  # fmt: skip
    assert main([*args, "--packing", "pack"]) == 0
    first = capsys.readouterr().out
    assert "Packed 999 records into" in first
    assert main([*args, "--packing", "pack"]) == 0  # cache hit: same lines, nothing rewritten
    assert capsys.readouterr().out == first
    assert main(args) == 0  # unpacked: a different key, rewritten
    assert "Transformed 999 records." in capsys.readouterr().out
    assert len(read(out, ["input_ids"])) == 999
    with pytest.raises(InputError, match="packing applies to conversations"):
        preprocess("wiki", str(conversations), tokenizer_path, tmp_path / "w.mindrecord", packing="pack")
    with pytest.raises(InputError, match="packing must be one of"):
        preprocess("qa", str(conversations), tokenizer_path, tmp_path / "w.mindrecord", packing="ffd")


def test_training_batches_carry_each_rows_document_ends_padded_past_the_row(
    tmp_path: Path, conversations: Path, tokenizer_path: Path
) -> None:
    from llama_core.train.dataset import NO_DOCUMENT, inspect_dataset, read_batches

    out = tmp_path / "p.mindrecord"
    preprocess("qa", str(conversations), tokenizer_path, out, seq_length=1024, packing="pack")
    rows = read(out, ["actual_seq_len"])
    info = inspect_dataset(out)
    assert info.packed and info.max_documents == max(len(r[0]) for r in rows) > 1
    assert info.num_records == len(rows)
    batches = list(read_batches(info, 4, list(range(8)), drop_remainder=True))
    assert len(batches) == 2
    for b, (ids, labels, ends) in enumerate(batches):
        assert ids.shape == labels.shape == (4, 1025) and ends.shape == (4, info.max_documents)
        for i in range(4):
            own = rows[4 * b + i][0]
            assert ends[i, : len(own)].tolist() == own.tolist()
            assert np.all(ends[i, len(own) :] == NO_DOCUMENT) and NO_DOCUMENT > 1025
