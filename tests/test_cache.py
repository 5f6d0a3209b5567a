from pathlib import Path

from llama_core.cache import StageKey, cache_key, cached, file_sha256, write_manifest


def test_key_depends_on_content_params_and_version(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("one")
    base = cache_key("stage", 1, [a], {"seq_length": 8})
    assert cache_key("stage", 1, [a], {"seq_length": 8}) == base
    assert cache_key("stage", 2, [a], {"seq_length": 8}) != base
    assert cache_key("stage", 1, [a], {"seq_length": 9}) != base
    assert cache_key("other", 1, [a], {"seq_length": 8}) != base
    a.write_text("two")  # new size and mtime: re-hashed, not served from the memo
    assert cache_key("stage", 1, [a], {"seq_length": 8}) != base


def test_moved_input_keeps_its_key(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("same bytes")
    b = tmp_path / "b.txt"
    b.write_text("same bytes")
    assert cache_key("s", 1, [a], {}) == cache_key("s", 1, [b], {})


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    p = tmp_path / "blob"
    p.write_bytes(b"\x00\x01" * 10_000_000)
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()  # memo hit


def test_cached_requires_key_and_intact_outputs(tmp_path: Path) -> None:
    out = tmp_path / "data.bin"
    out.write_bytes(b"12345")
    manifest = tmp_path / "data.manifest.json"
    write_manifest(manifest, stage="s", key="k1", outputs=[out], extra={"records": 3})

    hit = cached(manifest, "k1")
    assert hit is not None and hit.extra == {"records": 3} and hit.outputs == {"data.bin": 5}
    assert cached(manifest, "k2") is None
    out.write_bytes(b"123")  # truncated output
    assert cached(manifest, "k1") is None
    out.unlink()
    assert cached(manifest, "k1") is None
    manifest.write_text("{not json")
    assert cached(manifest, "k1") is None


def test_a_stage_output_is_identified_by_its_producers_key(tmp_path: Path, monkeypatch) -> None:
    import os

    import llama_core.cache as cache

    out = tmp_path / "model.ckpt"
    out.write_bytes(b"weights" * 1000)
    write_manifest(cache.manifest_path_for(out), stage="checkpoint.convert", key="k1", outputs=[out])
    assert cache.content_id(out) == "checkpoint.convert:k1"

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(cache, "file_sha256", no_hashing)
    downstream = cache_key("checkpoint.shard", 1, [out], {"tp": 2})
    monkeypatch.undo()
    assert downstream != cache_key("checkpoint.shard", 1, [out], {"tp": 4})

    # edited in place after its manifest: no longer the producer's output, so hashed
    later = cache.manifest_path_for(out).stat().st_mtime_ns + 1_000_000
    os.utime(out, ns=(later, later))
    assert cache.content_id(out) == "sha256:" + file_sha256(out)
    # truncated: hashed too
    out.write_bytes(b"w")
    assert cache.content_id(out).startswith("sha256:")


def test_plain_files_are_identified_by_sha256(tmp_path: Path) -> None:
    import hashlib

    import llama_core.cache as cache

    f = tmp_path / "alpaca.json"
    f.write_text("[]")
    assert cache.content_id(f) == "sha256:" + hashlib.sha256(b"[]").hexdigest()


def test_stage_key_hits_only_a_manifest_of_the_same_key(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"input")
    out = tmp_path / "out.bin"
    manifest = tmp_path / "out.bin.manifest.json"
    expected = cache_key("s", 1, [src], {"p": 1})

    first = StageKey(manifest, "s", 1, [src], {"p": 1})
    assert first.hit() is None  # no manifest: the key is hashed in the background
    out.write_bytes(b"output")
    assert first.value() == expected
    write_manifest(manifest, stage="s", key=first.value(), outputs=[out])

    hit = StageKey(manifest, "s", 1, [src], {"p": 1}).hit()
    assert hit is not None and hit.key == expected
    other = StageKey(manifest, "s", 1, [src], {"p": 2})
    assert other.hit() is None and other.value() == cache_key("s", 1, [src], {"p": 2})
