"""The chat formats beside vicuna_v1.1 (llama3, hf, chatml) and the tokenizer loader, against their
references: Meta's `Tokenizer` and `ChatFormat` (llama-models) on Meta's Llama 3 tokenizer.model,
and transformers' `apply_chat_template` on a Qwen-style HF tokenizer with a ChatML template
(tests/chat_tokenizers.py). Every expected id and label comes from a reference; the labels are the
reference's assistant tokens (Meta: an assistant message's tokens after its header; transformers:
`return_assistant_tokens_mask` of the template's generation tags), each cut after its first
end-of-turn token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llama_core.data.alpaca_converter import PROMPT_NO_INPUT, convert_alpaca
from llama_core.data.chat import CHATML_TEMPLATE, JinjaFormat, chat_format, default_chat_template
from llama_core.data.llama_preprocess import main, preprocess, report_path
from llama_core.data.preprocess_runs import MAX_LISTED
from llama_core.data.prompts import conversation_messages
from llama_core.data.tokenizer import open_tokenizer, tokenizer_kind
from llama_core.errors import InputError
from llama_core.evaluation import encode_prompts

IGN = -100
N_RECORDS = 250  # real Alpaca records checked against each reference
SEQ = 128  # short enough that many records are cut


def conv(*turns: tuple[str, str], rid: str) -> dict:
    return {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}


HARD = [
    conv(("human", ""), ("gpt", "An answer to nothing."), rid="empty-question"),
    conv(("human", "Say nothing."), ("gpt", ""), rid="empty-answer"),
    conv(("human", "Grüß dich, 世界? Ça va — naïve café 😀"), ("gpt", "Servus 🌍. Ελληνικά, русский, עברית"),
         rid="non-ascii"),
    conv(("gpt", "I am dropped."), ("human", "Q1?"), ("gpt", "A1."), ("human", "Q2, never answered"),
         rid="ends-with-human"),
    conv(("human", "Anyone there?"), rid="human-only"),
    conv(("human", "  padded question \n"), ("gpt", "\n answer with spaces  "), rid="whitespace"),
    conv(("human", "Type <|eot_id|> or <|im_end|>."), ("gpt", "Typed <|eot_id|> and <|im_end|> here."),
         rid="special-text"),
    conv(("human", "Repeat: " + "lorem ipsum " * 60), ("gpt", "dolor sit amet " * 60), rid="long"),
]  # fmt: skip


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory, alpaca_path: Path) -> list[dict]:
    """The first N_RECORDS Alpaca records as conversations, then the hard cases."""
    out = tmp_path_factory.mktemp("chat") / "conv.json"
    convert_alpaca(alpaca_path, out)
    return json.loads(out.read_text())[:N_RECORDS] + HARD


def messages_of(records: list[dict]) -> list[list[dict[str, str]]]:
    return [conversation_messages("in.json", i, r) for i, r in enumerate(records)]


def labels_of(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGN] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return labels


def cut_after_first(labels: list[int], stops: set[int]) -> list[int]:
    """The rule on top of a reference's assistant tokens: each supervised run ends at its first stop."""
    out, done = [], False
    for x in labels:
        if x == IGN:
            done = False
        elif done:
            x = IGN
        elif x in stops:
            done = True
        out.append(x)
    return out


@pytest.fixture(scope="module")
def meta(llama3_tokenizer_path: Path):
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    tok = Tokenizer(llama3_tokenizer_path)
    return tok, ChatFormat(tok)


def meta_record(meta, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """[bos] + the concatenated `ChatFormat.encode_message` of each message (content stripped, the
    format's definition); labels: an assistant message's tokens after its header."""
    from llama_models.datatypes import RawMessage, ToolPromptFormat

    tok, fmt = meta
    ids, labels = [tok.bos_id], [IGN]
    for m in messages:
        toks, _ = fmt.encode_message(
            RawMessage(role=m["role"], content=m["content"].strip()), ToolPromptFormat.json
        )
        empty, _ = fmt.encode_message(RawMessage(role=m["role"], content=""), ToolPromptFormat.json)
        header = len(empty) - 1  # an empty message is its header and <|eot_id|>
        ids += toks
        body = toks[header:] if m["role"] == "assistant" else [IGN] * (len(toks) - header)
        labels += [IGN] * header + body
    return ids, labels


@pytest.fixture(scope="module")
def hf_ref(hf_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))


def hf_record(ref, messages: list[dict[str, str]], **kw) -> tuple[list[int], list[int]]:
    """transformers' ids of the conversation and its assistant tokens (the generation tags)."""
    out = ref.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kw
    )
    ids = list(out["input_ids"])
    labels = [i if m else IGN for i, m in zip(ids, out["assistant_masks"], strict=True)]
    return ids, cut_after_first(labels, {ref.convert_tokens_to_ids("<|im_end|>")})


# -- the tokenizers
TEXTS = [
    "Hello world!",
    " leading space and  two",
    "Grüß dich, 世界? 😀 naïve",
    "numbers 1234567 and tabs\tand\nnew lines\n\n",
    "special text <|eot_id|> <|im_end|> <s> </s>",
    "a" * 30_000 + " " * 26_000 + "b",  # longer runs than Meta's 25,000-character slices
]


def test_open_tokenizer_decides_the_kind_and_matches_each_reference(
    tokenizer_path: Path, llama3_tokenizer_path: Path, hf_tokenizer_dir: Path, meta, hf_ref
) -> None:
    import sentencepiece as spm

    sp_ref = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    sp, ll3, hf = (open_tokenizer(p) for p in (tokenizer_path, llama3_tokenizer_path, hf_tokenizer_dir))
    assert (sp.kind, ll3.kind, hf.kind) == ("sentencepiece", "tiktoken", "hf")
    assert tokenizer_kind(hf_tokenizer_dir / "tokenizer.json") == "hf"
    assert (sp.vocab_size, sp.bos_id, sp.eos_id) == (
        sp_ref.get_piece_size(),
        sp_ref.bos_id(),
        sp_ref.eos_id(),
    )
    meta_tok = meta[0]
    assert (ll3.vocab_size, ll3.bos_id, ll3.eos_id) == (meta_tok.n_words, meta_tok.bos_id, meta_tok.eos_id)
    assert ll3.specials == meta_tok.special_tokens
    assert (hf.vocab_size, hf.bos_id, hf.eos_id) == (len(hf_ref), hf_ref.bos_token_id, hf_ref.eos_token_id)
    assert hf.chat_template == hf_ref.chat_template
    assert hf.special_id("<|im_start|>") == hf_ref.convert_tokens_to_ids("<|im_start|>")
    for text in TEXTS:
        assert sp.encode(text) == sp_ref.encode(text)
        assert ll3.encode(text) == meta_tok.encode(text, bos=False, eos=False)
        assert hf.encode(text) == hf_ref.encode(text, add_special_tokens=False)
    # decoding drops the special tokens
    text = "Grüß dich, 世界?"
    assert sp.decode([sp.bos_id, *sp.encode(text), sp.eos_id]) == sp_ref.decode(sp_ref.encode(text))
    eot = ll3.special_id("<|eot_id|>")
    assert ll3.decode([ll3.bos_id, *ll3.encode(text), eot]) == meta_tok.decode(
        meta_tok.encode(text, bos=False, eos=False)
    )
    assert hf.decode([*hf.encode(text), hf.eos_id]) == hf_ref.decode(
        hf_ref.encode(text, add_special_tokens=False)
    )


def test_bad_tokenizers_and_formats_fail_naming_the_cause(
    tmp_path: Path, tokenizer_path: Path, llama3_tokenizer_path: Path, plain_hf_tokenizer_dir: Path
) -> None:
    with pytest.raises(InputError, match="tokenizer model file not found"):
        open_tokenizer(tmp_path / "missing.model")
    bad_lines = tmp_path / "bad.model"
    bad_lines.write_bytes(b"IQ== 0\nIg== 1\nnot base64 x\n")
    with pytest.raises(InputError, match=f"{bad_lines}: line 3 is not a base64 token"):
        open_tokenizer(bad_lines)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no tokenizer\.json"):
        open_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match=r"not a valid tokenizer\.json"):
        open_tokenizer(tmp_path / "broken")
    sp, ll3, plain = (
        open_tokenizer(p) for p in (tokenizer_path, llama3_tokenizer_path, plain_hf_tokenizer_dir)
    )
    with pytest.raises(InputError, match="has no chat_template: set chat_template"):
        default_chat_template(plain)
    with pytest.raises(InputError, match="vicuna_v1\\.1 is MindFormers' sentencepiece layout"):
        chat_format(ll3, "vicuna_v1.1")
    with pytest.raises(InputError, match="chat_template hf needs an HF tokenizer"):
        chat_format(ll3, "hf")
    with pytest.raises(InputError, match="no chat_template"):
        chat_format(plain, "hf")
    with pytest.raises(InputError, match=re.escape("tokenizer has no special token <|begin_of_text|>")):
        chat_format(sp, "llama3")
    with pytest.raises(InputError, match="chat_template must be one of"):
        chat_format(sp, "alpaca")


def test_default_rule(tokenizer_path: Path, llama3_tokenizer_path: Path, hf_tokenizer_dir: Path) -> None:
    names = [
        chat_format(open_tokenizer(p)).name for p in (tokenizer_path, llama3_tokenizer_path, hf_tokenizer_dir)
    ]
    assert names == ["vicuna_v1.1", "llama3", "hf"]


# -- records
def test_llama3_records_equal_metas(llama3_tokenizer_path: Path, meta, records: list[dict]) -> None:
    fmt = chat_format(open_tokenizer(llama3_tokenizer_path), "llama3")
    for messages in messages_of(records):
        ids, spans = fmt.encode_dialog(messages)
        assert (ids, labels_of(ids, spans)) == meta_record(meta, messages), messages


def test_hf_records_equal_transformers(hf_tokenizer_dir: Path, hf_ref, records: list[dict]) -> None:
    fmt = chat_format(open_tokenizer(hf_tokenizer_dir))
    assert fmt.name == "hf"
    for messages in messages_of(records):
        ids, spans = fmt.encode_dialog(messages)
        assert (ids, labels_of(ids, spans)) == hf_record(hf_ref, messages), messages


def test_chatml_is_chatml_for_a_tokenizer_without_template(
    plain_hf_tokenizer_dir: Path, hf_ref, records: list[dict]
) -> None:
    """The built-in chatml: ChatML's text, and transformers' ids and assistant tokens of that template."""
    fmt = chat_format(open_tokenizer(plain_hf_tokenizer_dir), "chatml")
    assert isinstance(fmt, JinjaFormat)
    assert fmt.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )
    for messages in messages_of(records):
        ids, spans = fmt.encode_dialog(messages)
        assert (ids, labels_of(ids, spans)) == hf_record(hf_ref, messages, chat_template=CHATML_TEMPLATE)
    ids = [hf_ref.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert fmt.stop_ids == set(ids)


@pytest.mark.parametrize("chat_case", ["llama3", "hf", "chatml"], indirect=True)
def test_preprocess_writes_the_reference_records(
    tmp_path: Path, chat_case: tuple[Path, str], records: list[dict], meta, hf_ref, capsys
) -> None:
    """Records of seq_length+1 ids: the reference's ids and labels cut there, padded with 0 / -100;
    records without a supervised token reported as fully masked, cut ones as truncated."""
    import mindspore.dataset as ds

    tokenizer, template = chat_case
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "out" / "data.mindrecord"
    res = preprocess("qa", str(src), tokenizer, out, seq_length=SEQ, workers=2, chat_template=template)
    if template == "llama3":
        expected = [meta_record(meta, m) for m in messages_of(records)]
    else:  # chatml's tokenizer is hf_ref's without a template: the reference is given ChatML
        kw = {"chat_template": CHATML_TEMPLATE} if template == "chatml" else {}
        expected = [hf_record(hf_ref, m, **kw) for m in messages_of(records)]
    length = SEQ + 1
    rows = ds.MindDataset(str(out), shuffle=False).create_tuple_iterator(output_numpy=True, num_epochs=1)
    masked, truncated, supervised = [], [], 0
    for (ids, labels), (exp_ids, exp_labels), rec in zip(rows, expected, records, strict=True):
        exp_labels = exp_labels[:length]
        assert ids.tolist() == (exp_ids + [0] * length)[:length], rec["id"]
        assert labels.tolist() == exp_labels + [IGN] * (length - len(exp_labels)), rec["id"]
        n = sum(x != IGN for x in exp_labels)
        supervised += n
        masked += [rec["id"]] if n == 0 else []
        truncated += [rec["id"]] if len(exp_ids) > length else []
    assert res.chat_template == template and res.tokenizer["kind"] == (
        "tiktoken" if template == "llama3" else "hf"
    )
    assert res.records_written == len(records) and res.supervised_tokens == supervised
    assert (
        res.records_fully_masked["count"] == len(masked)
        and res.records_fully_masked["first_ids"] == masked[:MAX_LISTED]
    )
    assert "human-only" in masked and "long" in truncated
    reasons = res.records_fully_masked["reasons"]
    assert reasons["no assistant turn to supervise"] == 1
    assert sum(reasons.values()) == len(masked)  # the rest lost their answer to the cut
    assert res.records_truncated["count"] == len(truncated)
    report = json.loads(report_path(out).read_text())["result"]
    assert report["chat_template"] == template
    # the same settings hit the cache, from the CLI too; the tokenizer's default is the same key
    capsys.readouterr()
    args = ["--dataset_type", "qa", "--input_glob", str(src), "--model_file", str(tokenizer), "--seq_length",
            str(SEQ), "--output_file", str(out), "--chat_template", template]  # fmt: skip
    assert main(args) == 0 and "Transformed" in capsys.readouterr().out
    assert preprocess("qa", str(src), tokenizer, out, seq_length=SEQ, chat_template=template).cached
    if template != "chatml":
        assert preprocess("qa", str(src), tokenizer, out, seq_length=SEQ).cached


def test_preprocess_key_of_vicuna_is_unchanged_and_a_template_change_rewrites(
    tmp_path: Path, tokenizer_path: Path, hf_tokenizer_dir: Path, records: list[dict]
) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps(records[:20]))
    out = tmp_path / "d.mindrecord"
    first = preprocess("qa", str(src), tokenizer_path, out, seq_length=SEQ, workers=1)
    assert first.chat_template == "vicuna_v1.1" and not first.cached
    assert preprocess("qa", str(src), tokenizer_path, out, seq_length=SEQ, chat_template="vicuna_v1.1").cached
    hf = preprocess("qa", str(src), hf_tokenizer_dir, out, seq_length=SEQ, workers=1)
    assert not hf.cached and hf.chat_template == "hf"
    assert not preprocess(
        "qa", str(src), hf_tokenizer_dir, out, seq_length=SEQ, chat_template="chatml"
    ).cached
    with pytest.raises(InputError, match="wiki paragraphs are tokenized with sentencepiece"):
        preprocess("wiki", str(src), hf_tokenizer_dir, tmp_path / "w.mindrecord")


def test_a_template_that_is_not_prefix_stable_fails_naming_the_record(
    tmp_path: Path, hf_tokenizer_dir: Path
) -> None:
    """A template that renders earlier turns differently once later ones follow cannot locate the
    assistant's tokens by prefixes: the stage fails naming the record instead of guessing."""
    tok = open_tokenizer(hf_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last else '...' }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fmt = chat_format(tok, "hf")
    with pytest.raises(InputError, match="does not render the conversation's beginnings as its prefixes"):
        fmt.encode_dialog([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}])  # fmt: skip
    refusing = JinjaFormat(tok, "hf", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match="refused the conversation: roles must alternate"):
        refusing.encode_dialog([{"role": "user", "content": "a"}])


# -- generation prompts and stop ids
PROMPTS = ["Give three tips for staying healthy.", "Übersetze: 世界"]


def test_generation_prompts_and_stops_follow_the_chat_format(
    tokenizer_path: Path, llama3_tokenizer_path: Path, hf_tokenizer_dir: Path, meta, hf_ref
) -> None:
    import sentencepiece as spm
    from fastchat.conversation import get_conv_template
    from llama_models.datatypes import RawMessage

    # vicuna_v1.1: bos + the fschat prompt with the assistant's turn open, as before chat formats
    sp_ref = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    vicuna = chat_format(open_tokenizer(tokenizer_path))
    expected = []
    for p in PROMPTS:
        c = get_conv_template("vicuna_v1.1")
        c.append_message(c.roles[0], PROMPT_NO_INPUT.format(instruction=p))
        c.append_message(c.roles[1], None)
        expected.append([1, *sp_ref.encode(c.get_prompt())])
    assert encode_prompts(vicuna, PROMPTS, 4096) == expected
    assert vicuna.stop_ids == {2}
    # llama3: Meta's dialog prompt (header of the assistant left open); stops on <|eot_id|>, <|end_of_text|>
    llama3 = chat_format(open_tokenizer(llama3_tokenizer_path))
    meta_tok, meta_fmt = meta
    users = [PROMPT_NO_INPUT.format(instruction=p) for p in PROMPTS]
    expected = [meta_fmt.encode_dialog_prompt([RawMessage(role="user", content=u)]).tokens for u in users]
    assert encode_prompts(llama3, PROMPTS, 4096) == expected
    assert llama3.stop_ids == {meta_tok.special_tokens["<|eot_id|>"], meta_tok.eos_id}
    # hf: apply_chat_template(add_generation_prompt=True); stops on <|im_end|> and generation_config's eos ids
    hf = chat_format(open_tokenizer(hf_tokenizer_dir))
    expected = [hf_ref.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for u in users]  # fmt: skip
    assert encode_prompts(hf, PROMPTS, 4096) == expected
    assert hf.stop_ids == {hf_ref.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    with pytest.raises(InputError, match=r"prompt 1: .* tokens with the llama3 template"):
        encode_prompts(llama3, ["short", "long " * 100], 64)


# -- fetching a tokenizer
def test_an_hf_repo_as_tokenizer_source_fetches_only_its_tokenizer_files(
    tmp_path: Path, hf_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub is unreachable here: snapshot_download is replaced by one that delivers the files of a
    fake repo (the test tokenizer's, beside weights) that its allow_patterns select."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from llama_core.fetch import fetch
    from llama_core.fetch.hf import TOKENIZER_FILES, tokenizer_source

    repo = {p.name: p.read_bytes() for p in hf_tokenizer_dir.iterdir()}
    repo.update({"model.safetensors": b"w" * 10, "config.json": b"{}", "README.md": b"# model"})

    def fake_snapshot_download(repo_id: str, **kw: object) -> str:
        local = Path(str(kw["local_dir"]))
        local.mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(repo, allow_patterns=kw["allow_patterns"]):
            (local / name).write_bytes(repo[name])
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    url = tokenizer_source("hf://Qwen/Qwen2.5-7B")
    assert url == "hf://Qwen/Qwen2.5-7B?include=" + ",".join(TOKENIZER_FILES)
    result = fetch(url, tmp_path)
    assert sorted(f.path.name for f in result.files) == sorted(n for n in repo if n in TOKENIZER_FILES)
    tok = open_tokenizer(result.path)
    assert tok.kind == "hf" and chat_format(tok).name == "hf"
    assert tok.encode(TEXTS[2]) == open_tokenizer(hf_tokenizer_dir).encode(TEXTS[2])
    # a source that already says what to fetch, or is not hf://, is left as it is
    for given in (
        "hf://o/r?include=tokenizer.model",
        "hf://o/r/tokenizer.model",
        "https://h/tokenizer.model",
    ):
        assert tokenizer_source(given) == given
    assert tokenizer_source("hf://o/r@v1?exclude=*.bin").startswith(
        "hf://o/r@v1?exclude=*.bin&include=tokenizer.json,"
    )
