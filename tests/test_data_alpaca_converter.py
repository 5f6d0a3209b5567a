"""alpaca_converter: reference output format, JSON Lines / ShareGPT input, errors, skip, cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llama_core.data import records
from llama_core.data.alpaca_converter import convert_alpaca, main
from llama_core.data.records import iter_records
from llama_core.errors import InputError

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{i}\n\n### Input:\n{x}"
    "\n\n### Response:"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{i}\n\n### Response:"
)


def expected_text(recs: list[dict]) -> str:
    """The reference output, built from the prompts in docs/REFERENCE.md, conversations: json list,
    indent 2, non-ASCII kept."""
    out = []
    for n, r in enumerate(recs, 1):
        x = r.get("input", "")
        human = WITH_INPUT.format(i=r["instruction"], x=x) if x != "" else NO_INPUT.format(i=r["instruction"])
        out.append({"id": str(n), "conversations": [{"from": "human", "value": human},
                                                    {"from": "gpt", "value": r["output"]}]})  # fmt: skip
    return json.dumps(out, ensure_ascii=False, indent=2)


SAMPLE = [
    {"instruction": "Give three tips.", "input": "", "output": "1. Eat.\n2. Sleep."},
    {"instruction": "Translate", "input": 'Grüße, 世界 "quoted"', "output": "Greetings, world"},
    {"instruction": "No input key", "output": ""},
]


def test_matches_reference_format(tmp_path):
    src, out = tmp_path / "a.json", tmp_path / "out.json"
    src.write_text(json.dumps(SAMPLE))
    result = convert_alpaca(src, out)
    assert out.read_text(encoding="utf-8") == expected_text(SAMPLE)
    assert (result.records_written, result.records_skipped, result.cached) == (3, 0, False)


def test_real_alpaca_sample(tmp_path, alpaca_path):
    out = tmp_path / "out.json"
    convert_alpaca(alpaca_path, out)
    assert out.read_text(encoding="utf-8") == expected_text(json.loads(alpaca_path.read_text()))


def test_json_lines_and_sharegpt_passthrough(tmp_path):
    share = {
        "id": "conv-7",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    src, out = tmp_path / "a.jsonl", tmp_path / "out.json"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [SAMPLE[0], share]) + "\n")
    convert_alpaca(src, out)
    got = json.loads(out.read_text())
    assert got[0] == json.loads(expected_text(SAMPLE[:1]))[0]
    assert got[1] == share


def test_empty_list(tmp_path):
    src, out = tmp_path / "a.json", tmp_path / "out.json"
    src.write_text("[ ]")
    assert convert_alpaca(src, out).records_written == 0
    assert out.read_text() == "[]"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]', "line 2 column 22"),
        (
            '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
            "record 1: field 'output' is missing",
        ),
        ('[{"output": "b"}]', "record 0: field 'instruction' is missing"),
        ('[{"instruction": 3, "output": "b"}]', "record 0: field 'instruction' must be a string, got int"),
        ('[{"instruction": "a", "input": null, "output": "b"}]', "record 0: field 'input' must be a string"),
        ('["just text"]', "record 0: expected a JSON object"),
        ('[{"conversations": [{"from": "bot", "value": "x"}]}]', "field 'conversations[0].from'"),
        ('[{"conversations": [{"from": "human", "value": 1}]}]', "field 'conversations[0].value'"),
    ],
)
def test_bad_input_fails_and_writes_nothing(tmp_path, content, needle):
    src, out = tmp_path / "a.json", tmp_path / "out.json"
    src.write_text(content)
    with pytest.raises(InputError) as err:
        convert_alpaca(src, out)
    assert needle in str(err.value) and str(src) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_skip_reports_count_and_indices(tmp_path, caplog):
    recs = [SAMPLE[0], {"instruction": "x"}, SAMPLE[1], {"instruction": 1, "output": "y"}]
    src, out = tmp_path / "a.json", tmp_path / "out.json"
    src.write_text(json.dumps(recs))
    result = convert_alpaca(src, out, on_error="skip")
    assert result.records_written == 2 and result.records_skipped == 2
    assert [s["index"] for s in result.skipped] == [1, 3]
    assert "skipped 2 bad record(s)" in caplog.text and "indices: 1, 3" in caplog.text
    got = json.loads(out.read_text())
    assert [g["id"] for g in got] == ["1", "3"]  # ids keep the input position


def test_identical_rerun_is_cached(tmp_path):
    src, out = tmp_path / "a.json", tmp_path / "out.json"
    src.write_text(json.dumps(SAMPLE))
    convert_alpaca(src, out)
    again = convert_alpaca(src, out)
    assert again.cached and again.records_written == 3
    src.write_text(json.dumps(SAMPLE[:2]))
    changed = convert_alpaca(src, out)
    assert not changed.cached and changed.records_written == 2


def test_cli_error_exit_code(tmp_path):
    src = tmp_path / "a.json"
    src.write_text('[{"instruction": "a"}]')
    proc = subprocess.run(
        [sys.executable, "-m", "llama_core.data.alpaca_converter", "--data_path", str(src),
         "--output_path", str(tmp_path / "o.json")], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "record 0: field 'output' is missing" in proc.stderr
    assert main(["--data_path", str(tmp_path / "a.json"), "--output_path", str(tmp_path / "o.json"),
                 "--on_error", "skip"]) == 0  # fmt: skip


def test_reader_across_small_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_BLOCK", 7)
    recs = [{"k": i, "v": "é" * i} for i in range(40)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=1))
    assert [r for _, r in iter_records(path)] == recs
    bad = json.dumps(recs[:30], indent=1)[:-1] + ",\n oops]"
    path.write_text(bad)
    with pytest.raises(json.JSONDecodeError) as expected:  # the standard parser locates the same spot
        json.loads(bad)
    with pytest.raises(InputError, match=rf"line {expected.value.lineno} column {expected.value.colno}:"):
        list(iter_records(path))
