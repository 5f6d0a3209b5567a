"""llama_preprocess against expectations derived by hand from sentencepiece pieces
(docs/REFERENCE.md, token layout and masking).

Every expected record below is assembled in the test from `sp.encode` of the prompt pieces
docs/REFERENCE.md names, never by calling the implementation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

from llama_core.data.llama_preprocess import main, preprocess, report_path
from llama_core.data.wikitext import clean_wikitext
from llama_core.errors import InputError

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
IGN = -100
SEQ = 64
L = SEQ + 1


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


def conv(*turns: tuple[str, str], rid: str = "1") -> dict:
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def read(path, fields=("input_ids", "labels")):
    import mindspore.dataset as ds

    it = ds.MindDataset(str(path), columns_list=list(fields), shuffle=False).create_tuple_iterator(
        output_numpy=True
    )
    return [[a.tolist() for a in row] for row in it]


def run_qa(tmp_path, recs, seq=SEQ, **kw):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(recs, ensure_ascii=False))
    out = tmp_path / "out" / "data.mindrecord"
    out.parent.mkdir(exist_ok=True)
    kw.setdefault("workers", 1)
    result = preprocess("qa", str(src), kw.pop("model"), out, seq_length=seq, **kw)
    return result, read(out)


def one_round(sp, human: str, gpt: str, first: bool = True, length: int = L, offset: int = 3):
    """Expected (ids, labels) for a one-round prompt, straight from docs/REFERENCE.md, masking."""
    rnd = (SYS + " " if first else "") + "USER: " + human + " ASSISTANT: " + gpt
    enc = sp.encode(rnd)
    ids = [1, *enc, 2]
    round_len = len([1, *enc, 2]) - 1
    instr_len = len([1, *sp.encode(rnd.split(" ASSISTANT: ")[0] + " ASSISTANT: "), 2]) - offset
    labels = [IGN] * (1 + instr_len) + ids[1 + instr_len : 1 + round_len]
    return ids, labels, round_len


def pad(x, value, length=L):
    return (x + [value] * (length - len(x)))[:length]


def test_single_turn_without_and_with_input(tmp_path, sp, tokenizer_path, alpaca_path):
    from llama_core.data.alpaca_converter import convert_alpaca

    recs = json.loads(alpaca_path.read_text())
    sample = [next(r for r in recs if r["input"] == ""), next(r for r in recs if r["input"] != "")]
    (tmp_path / "alpaca.json").write_text(json.dumps(sample))
    convert_alpaca(tmp_path / "alpaca.json", tmp_path / "conv.json")
    conversations = json.loads((tmp_path / "conv.json").read_text())
    out = tmp_path / "o.mindrecord"
    res = preprocess("qa", str(tmp_path / "conv.json"), tokenizer_path, out, seq_length=1024, workers=1)
    got = read(out)
    for row, c in zip(got, conversations, strict=True):
        ids, labels, _ = one_round(
            sp, c["conversations"][0]["value"], c["conversations"][1]["value"], length=1025
        )
        assert row == [pad(ids, 0, 1025), pad(labels, IGN, 1025)]
    assert res.records_written == 2 and res.records_fully_masked["count"] == 0
    assert res.supervised_tokens == sum(sum(x != IGN for x in row[1]) for row in got)


def test_multi_turn_with_leading_gpt_dropped_and_unicode(tmp_path, sp, tokenizer_path):
    rec = conv(("gpt", "Hello! I am dropped."), ("human", "Grüß dich, 世界?"), ("gpt", "Servus 🌍."),
               ("human", "  and again"), ("gpt", "ok"))  # fmt: skip
    _, got = run_qa(tmp_path, [rec], model=tokenizer_path, seq=128)
    r1 = SYS + " USER: Grüß dich, 世界? ASSISTANT: Servus 🌍."
    r2 = "USER:   and again ASSISTANT: ok"
    e1, e2 = sp.encode(r1), sp.encode(r2)
    ids = [1, *e1, 2, *e2, 2]
    i1 = len(sp.encode(SYS + " USER: Grüß dich, 世界? ASSISTANT: ")) + 2 - 3
    i2 = len(sp.encode("USER:   and again ASSISTANT: ")) + 2 - 3
    labels = list(ids)
    labels[0] = IGN
    cur = 1
    for instr, enc in ((i1, e1), (i2, e2)):
        labels[cur : cur + instr] = [IGN] * instr
        cur += len(enc) + 1
    assert got == [[pad(ids, 0, 129), pad(labels, IGN, 129)]]


def test_fastchat_masking_masks_one_more_token(tmp_path, sp, tokenizer_path):
    rec = conv(("human", "Name a colour."), ("gpt", "Blue."))
    _, got = run_qa(tmp_path, [rec], model=tokenizer_path, masking="fastchat")
    ids, labels, _ = one_round(sp, "Name a colour.", "Blue.", offset=2)
    assert got == [[pad(ids, 0), pad(labels, IGN)]]
    _, mf, _ = one_round(sp, "Name a colour.", "Blue.")
    assert sum(x != IGN for x in mf) == sum(x != IGN for x in labels) + 1


def test_record_longer_than_seq_length_is_truncated(tmp_path, sp, tokenizer_path):
    human, gpt = "Repeat: " + "lorem ipsum " * 20, "dolor sit amet " * 30
    res, got = run_qa(tmp_path, [conv(("human", human), ("gpt", gpt))], model=tokenizer_path)
    ids, labels, _ = one_round(sp, human, gpt)
    assert len(ids) > L
    assert got == [[ids[:L], labels[:L]]]
    assert res.records_truncated == {"count": 1, "first_ids": ["1"]}


def test_record_whose_answer_is_truncated_away_counts_as_fully_masked(tmp_path, sp, tokenizer_path, caplog):
    """Nothing silently dropped: a record left with no supervised token is reported like quirk 2."""
    human = "Repeat: " + "lorem ipsum " * 40  # the prompt alone is longer than the record
    res, got = run_qa(tmp_path, [conv(("human", human), ("gpt", "done"), rid="long")], model=tokenizer_path)
    assert len(sp.encode(SYS + " USER: " + human)) + 1 > L
    assert got[0][1] == [IGN] * L
    assert res.records_fully_masked["count"] == 1 and res.records_fully_masked["first_ids"] == ["long"]
    assert "truncated away" in next(iter(res.records_fully_masked["reasons"]))
    assert "record long: every label masked" in caplog.text
    assert res.supervised_tokens == 0


@pytest.mark.parametrize(
    ("gpt", "why"),
    [("", "empty answer: fschat writes 'ASSISTANT:' with no space"),
     ("Type ASSISTANT: then wait.", "answer holds ' ASSISTANT: ': three parts")],
)  # fmt: skip
def test_quirk_whole_record_masked_with_warning(tmp_path, sp, tokenizer_path, caplog, gpt, why):
    recs = [conv(("human", "Hi"), ("gpt", gpt), rid="q1"), conv(("human", "Hi"), ("gpt", "Yo"), rid="ok")]
    res, got = run_qa(tmp_path, recs, model=tokenizer_path)
    # ids: the prompt's only non-empty piece, tokenized (fschat omits the space and "</s>" when empty)
    prompt = SYS + " USER: Hi ASSISTANT:" + (" " + gpt + "</s>" if gpt else "")
    ids = [1]
    for piece in prompt.split("</s>"):
        if piece == "":
            break
        ids += [*sp.encode(piece), 2]
    assert got[0] == [pad(ids, 0), [IGN] * L], why
    assert res.records_fully_masked["count"] == 1 and res.records_fully_masked["first_ids"] == ["q1"]
    assert "record q1: every label masked" in caplog.text
    report = json.loads(report_path(tmp_path / "out" / "data.mindrecord").read_text())["result"]
    assert report["records_fully_masked"]["first_ids"] == ["q1"] and report["seq_length"] == SEQ


def test_masked_long_record_keeps_untruncated_labels(tmp_path, sp, tokenizer_path):
    gpt = "x ASSISTANT: " + "word " * 100
    res, got = run_qa(tmp_path, [conv(("human", "Hi"), ("gpt", gpt))], model=tokenizer_path)
    n = 1 + len(sp.encode(SYS + " USER: Hi ASSISTANT: " + gpt)) + 1
    assert n > L
    assert len(got[0][0]) == L and got[0][1] == [IGN] * n
    assert res.labels_longer_than_record["count"] == 1


def test_wiki_chunking_repeat_and_several_files(tmp_path, sp, tokenizer_path):
    a = " = Title = \n\nFirst para , with @-@ dash .\nsecond line\n\n = = Sub = = \n\nThird ( x ) para\n"
    b = "Other file para one .\n\nand two\n"
    (tmp_path / "w1.txt").write_text(a)
    (tmp_path / "w2.txt").write_text(b)
    out = tmp_path / "wiki.mindrecord"
    seq = 9
    res = preprocess(
        "wiki", str(tmp_path / "w*.txt"), tokenizer_path, out, seq_length=seq, repeat=2, workers=1
    )
    # clean-up by hand, as the reference's rules do for these strings
    assert clean_wikitext(" , with @-@ dash .") == ", with-dash ."
    # " ." before a newline is not a " . " pattern, so it stays
    paras = ["First para, with-dash .\nsecond line", "Third (x) para\n", "Other file para one .", "and two\n"]
    stream = []
    for p in paras:
        stream += [1, *sp.encode(p), 2]
    stream *= 2
    chunks = [stream[i : i + seq + 1] for i in range(0, len(stream) - seq, seq + 1)]
    chunks = [c for c in chunks if len(c) == seq + 1]
    assert read(out, ("input_ids",)) == [[c] for c in chunks]
    assert res.records_written == len(chunks) > 0


def test_several_files_sharded_output_parallel(tmp_path, sp, tokenizer_path, capsys):
    qa = [(f"Q{i}?", f"A{i}.") for i in range(7)]
    (tmp_path / "b.json").write_text(json.dumps([conv(("human", q), ("gpt", a), rid=q) for q, a in qa[:3]]))
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps(conv(("human", q), ("gpt", a), rid=q)) for q, a in qa[3:])
    )
    out = tmp_path / "shard.mindrecord"
    assert main(["--dataset_type", "qa", "--input_glob", str(tmp_path / "*.json*"), "--model_file",
                 str(tokenizer_path), "--seq_length", str(SEQ), "--output_file", str(out),
                 "--file_partition", "3", "--workers", "2"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["Transformed 7 records.", f"Transform finished, output files refer: {out}0"]
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("shard"))
    assert names == sorted(
        "shard.mindrecord" + s for s in ("0", "0.db", "1", "1.db", "2", "2.db", ".report.json")
    )
    got = read(tmp_path / "shard.mindrecord0")
    # files in sorted order (a.jsonl, then b.json); FileWriter spreads rows over shards its own way
    expected = []
    for q, a in qa[3:] + qa[:3]:
        ids, labels, _ = one_round(sp, q, a)
        expected.append([pad(ids, 0), pad(labels, IGN)])
    assert sorted(got) == sorted(expected)
    # any shard opens the whole set (the header names its siblings, which survived the rename)
    for k in (1, 2):
        assert sorted(read(tmp_path / f"shard.mindrecord{k}")) == sorted(expected)


def test_identical_rerun_is_cached(tmp_path, tokenizer_path, capsys):
    rec = [conv(("human", "Hi"), ("gpt", "Yo"))]
    first, _ = run_qa(tmp_path, rec, model=tokenizer_path)
    out1 = capsys.readouterr().out
    again, _ = run_qa(tmp_path, rec, model=tokenizer_path)
    assert not first.cached and again.cached
    assert capsys.readouterr().out == out1
    changed, _ = run_qa(tmp_path, rec, model=tokenizer_path, masking="fastchat")
    assert not changed.cached


BAD = [
    ([{"id": "r", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}],
     "record 0 (id r): roles do not alternate: conversations[1]"),
    ([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}],
     "roles do not alternate"),
    ([{"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "b"}]}],
     "record 0: field 'conversations[0].value' must be a string, got int"),
    ([{"conversations": [{"from": "robot", "value": "a"}]}], "field 'conversations[0].from'"),
    ([{"id": "z"}], "record 0 (id z): field 'conversations'"),
]  # fmt: skip


@pytest.mark.parametrize(("recs", "needle"), BAD)
def test_bad_records_fail_and_leave_nothing(tmp_path, tokenizer_path, recs, needle):
    good = [conv(("human", "fine"), ("gpt", "ok"))] * 3
    with pytest.raises(InputError) as err:
        run_qa(tmp_path, good + recs, model=tokenizer_path)
    msg = str(err.value).replace("record 3", "record 0")
    assert needle in msg and str(tmp_path / "in.json") in msg
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_files_fail_and_leave_nothing(tmp_path, tokenizer_path):
    src = tmp_path / "in.json"
    src.write_text('[{"conversations": []},')
    out = tmp_path / "o" / "data"
    with pytest.raises(InputError, match="tokenizer model file not found"):
        preprocess("qa", str(src), tmp_path / "missing.model", out, workers=1)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model" * 10)
    with pytest.raises(InputError, match=f"{corrupt}: not a valid sentencepiece model"):
        preprocess("qa", str(src), corrupt, out, workers=1)
    with pytest.raises(InputError, match="no input file matches"):
        preprocess("qa", str(tmp_path / "nothing*.json"), tokenizer_path, out, workers=1)
    with pytest.raises(InputError, match=f"{src}: invalid JSON at line 1"):
        preprocess("qa", str(src), tokenizer_path, out, workers=1)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_killed_run_leaves_no_final_file(tmp_path, tokenizer_path):
    recs = [conv(("human", f"question {i} " * 20), ("gpt", f"answer {i} " * 40)) for i in range(20000)]
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs))
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "llama_core.data.llama_preprocess", "--dataset_type", "qa", "--input_glob",
           str(src), "--model_file", str(tokenizer_path), "--seq_length", "4096", "--output_file",
           str(out_dir / "data.mindrecord"), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    tmp_file = None
    while time.monotonic() < deadline and tmp_file is None:  # wait until the MindRecord file is open
        tmp_file = next((d / "data.mindrecord" for d in out_dir.glob(".data.mindrecord.tmp-*")), None)
        time.sleep(0.05)
    time.sleep(1.5)  # records are being tokenized and written (20,000 take far longer)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp_file is not None, "the run never started writing"
    assert not [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    # a new run clears the dead run's leftovers (here: on a small input)
    src.write_text(json.dumps(recs[0]))
    preprocess("qa", str(src), tokenizer_path, out_dir / "data.mindrecord", seq_length=SEQ, workers=1)
    assert sorted(p.name for p in out_dir.iterdir()) == ["data.mindrecord", "data.mindrecord.db",
                                                         "data.mindrecord.report.json"]  # fmt: skip


def test_fast_tokenization_matches_literal_encodes(sp):
    """The one-pass rule (tokens of head + tokens of answer) against literal encodes of awkward text."""
    for answer in ["x", " leading", "  two", "\nnewline", "ünï 😀", "a\tb", ":", "ASSISTANT:", " "]:
        head = SYS + " USER: q ASSISTANT:"
        assert sp.encode(head + " " + answer) == sp.encode(head) + sp.encode(answer), answer
        assert len(sp.encode(head + " ")) == len(sp.encode(head)) + 1
        assert sp.encode(SYS + " USER: " + answer) == sp.encode(SYS) + sp.encode("USER: " + answer)
    assert np.array_equal(np.array(sp.encode([SYS])[0]), np.array(sp.encode(SYS)))


def test_error_in_a_worker_process_fails_cleanly(tmp_path, tokenizer_path):
    recs = [conv(("human", "fine"), ("gpt", "ok"))] * 600 + [conv(("human", "a"), ("human", "b"), rid="bad")]
    with pytest.raises(InputError, match=r"record 600 \(id bad\): roles do not alternate"):
        run_qa(tmp_path, recs, model=tokenizer_path, workers=2)
    assert list((tmp_path / "out").iterdir()) == []


def test_workers_do_not_rerun_the_parents_main_script(tmp_path, tokenizer_path):
    """Inside an Airflow worker `__main__` is the `airflow` script, whose start-up fails in a child:
    spawned tokenizer workers must not run the parent's main script again."""
    import subprocess
    import sys

    src = tmp_path / "in.json"
    src.write_text(json.dumps([conv(("human", "Hi"), ("gpt", f"Yo {i}"), rid=str(i)) for i in range(40)]))
    script = tmp_path / "main_script.py"
    script.write_text(
        "import sys\n"
        "if __name__ != '__main__':\n"
        "    raise SystemExit('the main script ran again in a worker')\n"
        "from llama_core.data.llama_preprocess import preprocess\n"
        f"r = preprocess('qa', {str(src)!r}, {str(tokenizer_path)!r}, {str(tmp_path / 'o.mindrecord')!r},\n"
        "               seq_length=32, workers=2)\n"
        "print('records', r.records_written)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "records 40" in proc.stdout


def test_cli_process_prints_its_lines_and_exit_codes_through_a_pipe(tmp_path, tokenizer_path):
    """The CLI process ends without the interpreter's teardown: what it printed into a pipe
    (block-buffered) and its exit code must still arrive, for success and for a user error."""
    src = tmp_path / "in.json"
    src.write_text(json.dumps([conv(("human", "Hi"), ("gpt", f"Yo {i}"), rid=str(i)) for i in range(5)]))
    out = tmp_path / "o.mindrecord"
    cmd = [sys.executable, "-m", "llama_core.data.llama_preprocess", "--dataset_type", "qa",
           "--input_glob", str(src), "--seq_length", "32", "--output_file", str(out), "--workers", "1",
           "--model_file"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered
    ok = subprocess.run([*cmd, str(tokenizer_path)], capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.splitlines() == [
        "Transformed 5 records.",
        f"Transform finished, output files refer: {out}",
    ]
    assert "llama_preprocess qa: 5" in ok.stderr  # the progress logger's last line
    bad = subprocess.run(
        [*cmd, str(tmp_path / "missing.model")], capture_output=True, text=True, timeout=300, env=env
    )
    assert bad.returncode == 2
    assert "missing.model" in bad.stderr and bad.stdout == ""


def test_shards_are_sent_to_writeback_while_written(tmp_path, tokenizer_path, monkeypatch):
    """Every WRITEBACK_EVERY row bytes, every shard's dirty pages are sent to disk, so the final
    fsync has little left to do."""
    from llama_core.data import mindrecord_sink

    fds: list[int] = []
    after_write: list[tuple[int, int]] = []  # (rows written, writeback calls so far)
    real_write = mindrecord_sink.MindRecordSink.write

    def write(self, rows):
        real_write(self, rows)
        after_write.append((self.rows, len(fds)))

    monkeypatch.setattr(mindrecord_sink.MindRecordSink, "WRITEBACK_EVERY", 256 << 10)
    monkeypatch.setattr(mindrecord_sink.MindRecordSink, "write", write)
    monkeypatch.setattr(mindrecord_sink, "start_writeback", fds.append)
    src = tmp_path / "in.json"
    src.write_text(
        json.dumps([conv(("human", f"Q {i}"), ("gpt", "An answer."), rid=str(i)) for i in range(1500)])
    )
    out = tmp_path / "o.mindrecord"
    result = preprocess("qa", str(src), tokenizer_path, out, seq_length=63, file_partition=2, workers=1)
    assert result.records_written == 1500
    # a row is 2 fields x 64 int32 + 2 length prefixes = 528 bytes; 256 records per write: the
    # count passes 256 KiB in the 2nd write, then again in the 4th after the reset; each time
    # both shards are sent
    calls = [n for _, n in after_write]
    assert [rows for rows, _ in after_write] == [256, 512, 768, 1024, 1280, 1500]
    assert calls == [0, 2, 2, 4, 4, 4]
    assert len(set(fds)) == 2 and fds[:2] == fds[2:]


def test_public_writer_fallback_writes_the_same_files(tmp_path, tokenizer_path, monkeypatch):
    """Without MindSpore's private shard-writer handles the sink falls back to the public
    FileWriter.write_raw_data: the same files, byte for byte, and the same rows read back."""
    from mindspore.mindrecord import FileWriter

    from llama_core.data import mindrecord_sink

    recs = [conv(("human", f"Q {i}?"), ("gpt", f"Answer {i}."), rid=str(i)) for i in range(40)]
    recs += [conv(("human", "Hi"), ("gpt", ""), rid="empty"),  # fully masked
             conv(("human", "Hi"), ("gpt", "x ASSISTANT: " + "word " * 100), rid="long"),  # long labels
             conv(("human", "Repeat: " + "lorem " * 30), ("gpt", "dolor " * 30), rid="cut")]  # fmt: skip
    (tmp_path / "in.json").write_text(json.dumps(recs))
    paras = [f"Para {i} , with @-@ dash ." * (i % 5 + 1) for i in range(60)]
    (tmp_path / "w.txt").write_text("\n\n".join(paras))
    runs = [("qa", "in.json", 1), ("wiki", "w.txt", 1), ("qa", "in.json", 2)]

    def run_all(kind):
        for dataset, src, shards in runs:
            out = tmp_path / kind / f"{dataset}{shards}" / "d.mindrecord"
            out.parent.mkdir(parents=True)
            preprocess(dataset, str(tmp_path / src), tokenizer_path, out, seq_length=SEQ,
                       file_partition=shards, workers=1)  # fmt: skip

    public_calls = []
    real_public = FileWriter.write_raw_data

    def counted(self, raw_data, *args):
        public_calls.append(len(raw_data))
        return real_public(self, raw_data, *args)

    monkeypatch.setattr(FileWriter, "write_raw_data", counted)
    run_all("fast")
    assert public_calls == []  # this MindSpore has the private handles: the fast path ran
    monkeypatch.setattr(mindrecord_sink, "raw_writer", lambda fw: None)
    run_all("public")
    wiki_rows = len(read(tmp_path / "public" / "wiki1" / "d.mindrecord", ("input_ids",)))
    assert sum(public_calls) == 2 * len(recs) + wiki_rows
    for dataset, _, shards in runs:
        fast, public = tmp_path / "fast" / f"{dataset}{shards}", tmp_path / "public" / f"{dataset}{shards}"
        fields = ("input_ids", "labels") if dataset == "qa" else ("input_ids",)
        first = "d.mindrecord" + ("0" if shards > 1 else "")
        assert sorted(read(fast / first, fields)) == sorted(read(public / first, fields)) != []
        if shards == 1:  # FileWriter spreads rows over several shards its own way, unreproducibly
            for name in ("d.mindrecord", "d.mindrecord.db"):
                assert (fast / name).read_bytes() == (public / name).read_bytes(), (dataset, name)


def test_fast_path_needs_every_private_handle(tmp_path):
    """The fast path is taken only when each private attribute it uses is there and callable."""
    from types import SimpleNamespace

    from mindspore.mindrecord import FileWriter

    from llama_core.data.mindrecord_sink import raw_writer

    def writer():
        fw = FileWriter(str(tmp_path / "x.mindrecord"))
        fw.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "wiki")
        return fw

    assert raw_writer(writer()).blob_fields == ["input_ids"]
    fw = writer()
    fw._writer._writer = SimpleNamespace()  # no write_raw_data
    assert raw_writer(fw) is None
    fw = writer()
    fw._writer._writer = SimpleNamespace(write_raw_data=None)  # not callable
    assert raw_writer(fw) is None
    fw = writer()
    fw._writer.set_shard_header = None
    assert raw_writer(fw) is None
    fw = writer()
    del fw._paths
    assert raw_writer(fw) is None
