"""fetch over a loopback HTTP server that misbehaves on demand, local files, hf:// parsing, the CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from fetch_server import FetchServer

from llama_core.errors import ConfigError, InputError
from llama_core.fetch import Credentials, FetchError, RetryPolicy, Timeouts, fetch, parse_source, redact
from llama_core.fetch.__main__ import main
from llama_core.fetch.hf import LoggedTqdm

FAST = RetryPolicy(retries=3, backoff=0.01)
BODY = os.urandom(600_000) + b"tail"
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server():
    with FetchServer() as s:
        yield s


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_connection_dropped_mid_file_resumes_with_range(server, tmp_path):
    url = server.add("/w/model.ckpt", BODY, drop=1)
    result = fetch(url, tmp_path, retry=FAST)
    f = result.files[0]
    assert (f.path, f.size, f.sha256, f.cached) == (tmp_path / "model.ckpt", len(BODY), SHA, False)
    assert _sha(tmp_path / "model.ckpt") == SHA
    gets = server.body_gets("/w/model.ckpt")
    half = len(BODY) // 2
    assert [(g.range, g.status, g.sent) for g in gets] == [
        (None, 200, half),
        (f"bytes={half}-", 206, len(BODY) - half),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".model.ckpt.fetch.json",
        ".model.ckpt.fetch.lock",
        "model.ckpt",
    ]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    url = server.add("/w/data.json", BODY, drop=1, ignore_range=True)
    result = fetch(url, tmp_path, retry=FAST)
    assert result.files[0].sha256 == SHA and _sha(tmp_path / "data.json") == SHA
    gets = server.body_gets("/w/data.json")
    assert [(g.range is not None, g.status, g.sent) for g in gets] == [
        (False, 200, len(BODY) // 2),
        (True, 200, len(BODY)),
    ]


def test_partial_left_by_a_killed_run_is_resumed_only_if_unchanged(server, tmp_path):
    url = server.add("/w/t.model", BODY)
    etag = server.specs["/w/t.model"].etag
    (tmp_path / ".t.model.part").write_bytes(BODY[:1000])
    (tmp_path / ".t.model.part.json").write_text(json.dumps({"validator": etag, "size": len(BODY)}))
    assert fetch(url, tmp_path, retry=FAST).files[0].sha256 == SHA
    assert [g.range for g in server.body_gets("/w/t.model")] == ["bytes=1000-"]
    assert not (tmp_path / ".t.model.part").exists() and not (tmp_path / ".t.model.part.json").exists()

    # A partial begun from another version of the file (other ETag) is discarded.
    (tmp_path / "t.model").unlink()
    (tmp_path / ".t.model.part").write_bytes(b"x" * 1000)
    (tmp_path / ".t.model.part.json").write_text(json.dumps({"validator": '"old"', "size": len(BODY)}))
    assert fetch(url, tmp_path, retry=FAST).files[0].sha256 == SHA
    assert server.body_gets("/w/t.model")[-1].range is None


def test_wrong_body_fails_and_keeps_nothing(server, tmp_path):
    url = server.add("/w/model.ckpt", b"not the model" * 1000)
    with pytest.raises(InputError, match=f"sha256 mismatch.*expected {SHA}"):
        fetch(url, tmp_path, sha256=SHA, retry=FAST)
    assert not [p for p in tmp_path.iterdir() if "model.ckpt" in p.name and "lock" not in p.name]


def test_404_is_not_retried_and_names_status_and_url(server, tmp_path):
    with pytest.raises(FetchError, match=r"HTTP 404 Not Found .*http://127\.0\.0\.1:\d+/missing\.bin"):
        fetch(server.base + "/missing.bin", tmp_path, retry=RetryPolicy(retries=5, backoff=30))
    assert len(server.log) == 1


def test_503_then_200_is_retried(server, tmp_path):
    url = server.add("/w/a.json", BODY, fail=2)
    assert fetch(url, tmp_path, retry=FAST).files[0].sha256 == SHA
    assert [r.status for r in server.log if r.method == "GET"] == [503, 503, 200]


def test_503_until_retries_run_out(server, tmp_path):
    url = server.add("/w/a.json", BODY, fail=10)
    with pytest.raises(FetchError, match=r"giving up .* after 3 attempts: HTTP 503"):
        fetch(url, tmp_path, retry=RetryPolicy(retries=2, backoff=0.01))


def test_stalled_server_times_out(server, tmp_path):
    url = server.add("/w/a.json", BODY, stall=1.5)
    with pytest.raises(FetchError, match=r"(?i)timeout|timed out"):
        fetch(
            url, tmp_path, retry=RetryPolicy(retries=1, backoff=0.01), timeouts=Timeouts(connect=1, read=0.2)
        )
    assert not (tmp_path / "a.json").exists()


def test_second_fetch_is_a_cache_hit_without_a_body_get(server, tmp_path):
    url = server.add("/w/tokenizer.model", BODY)
    first = fetch(url, tmp_path)
    second = fetch(url, tmp_path)
    assert (first.cached, second.cached) == (False, True)
    assert second.files[0].sha256 == SHA and len(server.body_gets("/w/tokenizer.model")) == 1
    # The file changed on the server (new ETag): fetched again.
    server.add("/w/tokenizer.model", BODY[::-1])
    third = fetch(url, tmp_path)
    assert not third.cached and third.files[0].sha256 == hashlib.sha256(BODY[::-1]).hexdigest()
    # A local copy edited in place is not trusted.
    (tmp_path / "tokenizer.model").write_bytes(b"edited")
    assert not fetch(url, tmp_path).cached and len(server.body_gets("/w/tokenizer.model")) == 3


def test_pinned_digest_hit_asks_the_server_nothing(server, tmp_path):
    url = server.add("/w/x.bin", BODY)
    fetch(url, tmp_path, sha256=SHA)
    n = len(server.log)
    assert fetch(url, tmp_path, sha256=SHA.upper()).cached
    assert len(server.log) == n


def test_shared_cache_dir_downloads_once_for_two_dests(server, tmp_path):
    url = server.add("/w/x.bin", BODY)
    a = fetch(url, tmp_path / "run1", cache_dir=tmp_path / "cache")
    b = fetch(url, tmp_path / "run2", cache_dir=tmp_path / "cache")
    assert (a.files[0].path, b.files[0].path) == (tmp_path / "run1" / "x.bin", tmp_path / "run2" / "x.bin")
    assert os.path.samefile(a.files[0].path, b.files[0].path) and b.cached
    assert _sha(b.files[0].path) == SHA and len(server.body_gets("/w/x.bin")) == 1


def test_two_processes_fetching_at_once_download_once(server, tmp_path):
    body = os.urandom(1 << 20)
    url = server.add("/w/big.ckpt", body, trickle=0.25)  # 16 pieces: ~4 s, so the runs overlap
    cmd = [sys.executable, "-m", "llama_core.fetch", url, "--dest", str(tmp_path / "d")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["cached"] for r in results) == [False, True]
    assert {r["files"][0]["sha256"] for r in results} == {hashlib.sha256(body).hexdigest()}
    assert [g.sent for g in server.body_gets("/w/big.ckpt")] == [len(body)]
    assert any("waiting for another fetch" in err for _, err in outs)


def test_credentials_never_appear_in_logs_errors_results_or_manifests(server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    server.add("/w/x.bin", BODY, drop=1)
    secret_url = f"http://alice:pa55word@127.0.0.1:{server.server_address[1]}/w/x.bin?token=T0KEN-SECRET&v=2"
    result = fetch(secret_url, tmp_path, retry=FAST, credentials=Credentials(token="BEARER-SECRET"))
    with pytest.raises(FetchError) as err:
        fetch(secret_url.replace("x.bin", "nope.bin"), tmp_path, retry=FAST)
    assert main([secret_url, "--dest", str(tmp_path / "cli")]) == 0
    seen = "\n".join(
        [
            caplog.text,
            *capsys.readouterr(),
            str(err.value),
            repr(result),
            json.dumps(result.to_dict()),
            *(p.read_text() for p in tmp_path.rglob(".*.json")),
        ]
    )
    assert "?token=***&v=2" in seen and "http://***@127.0.0.1" in seen  # the redacted form is there
    for secret in ("pa55word", "alice", "T0KEN-SECRET", "BEARER-SECRET"):
        assert secret not in seen
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no raw chain in tracebacks


def test_redact_masks_userinfo_secret_params_and_given_values():
    text = (
        "GET https://u:p@obs.example.com/b/k?X-Amz-Signature=abc&X-Amz-Credential=AK%2F1&part=2 "
        "and /k?AccessKeyId=AK&Expires=9&Signature=s&token=t and key sk-12345"
    )
    assert redact(text, ["sk-12345"]) == (
        "GET https://***@obs.example.com/b/k?X-Amz-Signature=***&X-Amz-Credential=***&part=2 "
        "and /k?AccessKeyId=***&Expires=9&Signature=***&token=*** and key ***"
    )
    assert redact("hf://org/repo@main?include=*.json") == "hf://org/repo@main?include=*.json"


def test_local_file_and_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha")
    (src / "sub" / "b.txt").write_bytes(b"beta")
    one = fetch(str(src / "a.txt"), tmp_path / "d")
    assert one.files[0].sha256 == hashlib.sha256(b"alpha").hexdigest() and not one.files[0].cached
    assert fetch((src / "a.txt").as_uri(), tmp_path / "d").cached
    tree = fetch(str(src), tmp_path / "d")
    assert [(f.path, f.size) for f in tree.files] == [
        (tmp_path / "d" / "src" / "a.txt", 5),
        (tmp_path / "d" / "src" / "sub" / "b.txt", 4),
    ]
    (src / "sub" / "b.txt").unlink()
    (src / "c.txt").write_bytes(b"gamma")
    again = fetch(str(src), tmp_path / "d")
    assert [(f.path.name, f.cached) for f in again.files] == [("a.txt", True), ("c.txt", False)]
    assert not (tmp_path / "d" / "src" / "sub" / "b.txt").exists()  # gone from the source: removed
    with pytest.raises(FetchError, match="source not found"):
        fetch(str(src / "nope"), tmp_path / "d")


def test_sha256_option_is_checked():
    with pytest.raises(ConfigError, match="64 hex digits"):
        fetch("/x/y", "/tmp", sha256="abc")
    with pytest.raises(ConfigError, match="pins one file"):
        fetch("hf://org/repo", "/tmp", sha256=SHA)


@pytest.mark.parametrize(
    ("url", "repo_type", "repo_id", "revision", "include", "exclude"),
    [
        ("hf://meta-llama/Llama-2-7b-hf@main?include=*.safetensors,config.json", "model",
         "meta-llama/Llama-2-7b-hf", "main", ("*.safetensors", "config.json"), ()),
        ("hf://datasets/tatsu-lab/alpaca/data/train.parquet", "dataset", "tatsu-lab/alpaca", None,
         ("data/train.parquet",), ()),
        ("hf://org/repo@refs%2Fpr%2F1?exclude=*.bin", "model", "org/repo", "refs/pr/1", (), ("*.bin",)),
    ],
)  # fmt: skip
def test_hf_url_syntax(url, repo_type, repo_id, revision, include, exclude):
    src = parse_source(url)
    assert (src.repo_type, src.repo_id, src.revision, src.include, src.exclude) == (
        repo_type, repo_id, revision, include, exclude)  # fmt: skip


@pytest.mark.parametrize("url", ["hf://org", "hf://org/repo@", "hf://org/repo?revision=x", "ftp://h/f"])
def test_bad_sources_are_config_errors(url):
    with pytest.raises(ConfigError):
        parse_source(url)


def test_hf_calls_snapshot_download_and_reports_files(tmp_path, monkeypatch):
    """The hub is unreachable here: the real call is replaced by one that writes what the hub would."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        local = Path(kw["local_dir"])
        if len(calls) == 1:  # the hub skips files it already delivered (its metadata in .cache)
            (local / ".cache" / "huggingface").mkdir(parents=True)
            (local / "config.json").write_text("{}")
            (local / "model-00001.safetensors").write_bytes(b"w" * 10)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    url = "hf://meta-llama/Llama-2-7b-hf@main?include=*.safetensors,config.json"
    creds = Credentials(token="hf_SECRETTOKEN", endpoint_url="http://127.0.0.1:9")
    first = fetch(url, tmp_path, credentials=creds)
    second = fetch(url, tmp_path, credentials=creds)
    repo_id, kw = calls[0]
    assert repo_id == "meta-llama/Llama-2-7b-hf"
    assert (kw["revision"], kw["allow_patterns"], kw["ignore_patterns"]) == (
        "main",
        ["*.safetensors", "config.json"],
        None,
    )
    assert (kw["token"], kw["endpoint"], Path(kw["local_dir"])) == (
        "hf_SECRETTOKEN", "http://127.0.0.1:9", tmp_path / "Llama-2-7b-hf")  # fmt: skip
    assert [(f.source, f.size, f.sha256, f.cached) for f in first.files] == [
        ("hf://meta-llama/Llama-2-7b-hf@main/config.json", 2, hashlib.sha256(b"{}").hexdigest(), False),
        (
            "hf://meta-llama/Llama-2-7b-hf@main/model-00001.safetensors",
            10,
            hashlib.sha256(b"w" * 10).hexdigest(),
            False,
        ),
    ]
    assert second.cached and first.path == tmp_path / "Llama-2-7b-hf"
    assert kw["tqdm_class"] is LoggedTqdm


def test_hub_progress_bars_become_rate_limited_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="llama_core.fetch")
    with LoggedTqdm(
        total=1 << 30, unit="B", unit_scale=True, desc="Downloading bytes", name="hf-group"
    ) as bar:
        for _ in range(5000):
            bar.update(1 << 10)
    lines = [r.getMessage() for r in caplog.records]
    # one line when the bar opens and one when it closes; the 5000 updates fall within 5 s
    assert len(lines) == 2 and lines[-1].startswith("Downloading bytes:   0% 5.12M/1.07G")


def test_cli_prints_result_and_turns_errors_into_exit_2(server, tmp_path, capsys):
    url = server.add("/w/a.json", BODY)
    assert main([url, "--dest", str(tmp_path), "--sha256", SHA]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["files"][0]["sha256"], doc["total_bytes"], doc["cached"]) == (SHA, len(BODY), False)
    code = subprocess.run(
        [sys.executable, "-m", "llama_core.fetch", server.base + "/nope", "--dest", str(tmp_path)],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert code.returncode == 2 and code.stderr.strip().endswith(
        f"HTTP 404 Not Found for HEAD {server.base}/nope"
    )


@pytest.mark.parametrize(("partial", "body_gets"), [(BODY, []), (BODY + b"extra", [(None, 200)])])
def test_partial_that_is_complete_or_too_long(server, tmp_path, partial, body_gets):
    """416 for the resume range: a complete partial is kept (no body sent), a longer one refetched."""
    url = server.add("/w/t.model", BODY)
    (tmp_path / ".t.model.part").write_bytes(partial)
    validator = server.specs["/w/t.model"].etag
    (tmp_path / ".t.model.part.json").write_text(json.dumps({"validator": validator, "size": len(BODY)}))
    assert fetch(url, tmp_path, retry=FAST).files[0].sha256 == SHA and _sha(tmp_path / "t.model") == SHA
    assert [(g.range, g.status) for g in server.body_gets("/w/t.model")] == body_gets
    assert next(r.status for r in server.log if r.method == "GET") == 416


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_sink_stages_aligned_blocks_and_resumes_an_unaligned_partial(tmp_path, monkeypatch, direct):
    """Full blocks are written at aligned offsets (with O_DIRECT where the file system allows it),
    the block in progress reaches the file when the transfer pauses, and a partial whose length is
    not aligned is continued byte-exactly."""
    from llama_core.fetch import core

    block = 64 << 10
    monkeypatch.setattr(core._Sink, "_BLOCK", block)
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    fd = core._open_direct(probe)
    if direct and fd is None:
        pytest.skip(f"the file system at {tmp_path} refuses O_DIRECT")
    if fd is not None:
        os.close(fd)
    if not direct:
        monkeypatch.setattr(core, "_open_direct", lambda path: None)
    writes: list[tuple[bool, int, int]] = []
    real_pwrite_all = core._pwrite_all

    def recording(fd: int, data, pos: int) -> None:
        writes.append((fd == sink.direct_fd, pos, len(data)))
        real_pwrite_all(fd, data, pos)

    monkeypatch.setattr(core, "_pwrite_all", recording)
    rng = random.Random(0)
    prefix = os.urandom(5000)
    chunks = [os.urandom(rng.randint(1, 150_000)) for _ in range(20)]
    path = tmp_path / "part"
    path.write_bytes(prefix)
    with core._Sink(path, hashlib.sha256(prefix)) as sink:
        for i, chunk in enumerate(chunks):
            sink.put(chunk)
            if i == 9:  # a broken connection: the file must hold everything put so far
                sink.drain()
                assert path.read_bytes() == prefix + b"".join(chunks[:10])
        digest = sink.hexdigest()
        assert (sink.direct_fd is not None) == direct
    body = prefix + b"".join(chunks)
    assert path.read_bytes() == body and digest == hashlib.sha256(body).hexdigest()
    first = len(prefix) - len(prefix) % core._Sink._ALIGN  # the partial's last aligned offset
    full = [(d, pos) for d, pos, n in writes if n == block]
    assert [pos for _, pos in full] == list(range(first, len(body) - block + 1, block))
    assert all(d == direct for d, _ in full)
    assert all(not d for d, _, n in writes if n != block)  # tails go through the page cache


def test_sink_write_error_reaches_the_caller(tmp_path, monkeypatch):
    from llama_core.fetch import core

    monkeypatch.setattr(core._Sink, "_BLOCK", 64 << 10)

    def disk_full(fd: int, data, pos: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core, "_pwrite_all", disk_full)
    path = tmp_path / "part"
    path.write_bytes(b"")
    with pytest.raises(OSError, match="No space left"), core._Sink(path, hashlib.sha256()) as sink:
        for _ in range(64):  # far more than the blocks in use: the writer keeps handing them back
            sink.put(os.urandom(32 << 10))
        sink.drain()
