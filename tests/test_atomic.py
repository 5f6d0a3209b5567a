import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llama_core.atomic import (
    TMP_MARK,
    atomic_path,
    clean_leftovers,
    disk_full,
    disk_full_stage,
    final_name,
    start_writeback,
    temp_sibling,
    write_json_atomic,
)
from llama_core.errors import DiskFullError


def test_file_appears_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []

    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_folder_replaces_previous_folder(tmp_path: Path) -> None:
    final = tmp_path / "shards"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_failed_folder_keeps_previous(tmp_path: Path) -> None:
    final = tmp_path / "shards"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(ValueError), atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("partial")
        raise ValueError("bad tensor")
    assert (final / "old").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_nothing_written_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x"):
        pass
    assert not (tmp_path / "x").exists()


def test_killed_writer_leaves_no_final_file(tmp_path: Path) -> None:
    """SIGKILL mid-write: no file under the final name; the leftover is cleaned by the next run."""
    final = tmp_path / "big.json"
    script = textwrap.dedent(
        f"""
        import sys, time
        from llama_core.atomic import atomic_path
        with atomic_path({str(final)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists()
    leftovers = [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
    assert len(leftovers) == 1
    assert clean_leftovers(tmp_path, "big.json") == 1
    assert list(tmp_path.iterdir()) == []


def test_clean_leftovers_spares_live_runs(tmp_path: Path) -> None:
    live = tmp_path / f".out{TMP_MARK}{os.getpid()}-abcd1234"
    live.write_text("in progress")
    assert clean_leftovers(tmp_path, "out") == 0
    assert live.exists()


def test_json_keeps_non_ascii(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "a.json", {"v": "café ✓"})
    assert "café ✓" in path.read_text(encoding="utf-8")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux-only")
def test_start_writeback_keeps_the_bytes_and_reports_a_bad_fd(tmp_path: Path) -> None:
    """On Linux it calls sync_file_range: the bytes stay readable, and an invalid descriptor is
    an OSError naming the call (not silently ignored)."""
    path = tmp_path / "f.bin"
    data = os.urandom(4 << 20)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        start_writeback(f.fileno())
    assert path.read_bytes() == data
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError, match="sync_file_range"):
        start_writeback(fd)


def _no_space(code: int = errno.ENOSPC, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), filename)


def test_a_full_disk_is_one_error_naming_the_stage_the_path_and_the_free_space(tmp_path: Path) -> None:
    out = tmp_path / "out.mindrecord"
    with pytest.raises(DiskFullError) as full, disk_full("preprocess", out, needs=3 << 20):
        raise _no_space()
    assert str(full.value).startswith(f"preprocess: no space left on {out} (needs about 3.0 MiB, ")
    assert " free); free space there and run it again" in str(full.value)
    quota = r"shard: no space left on /x/f \(.* disk quota exceeded\)"
    with pytest.raises(DiskFullError, match=quota), disk_full("shard", out):
        raise _no_space(errno.EDQUOT, "/x/f")  # the failing call's own path comes first
    with pytest.raises(PermissionError), disk_full("shard", out):
        raise PermissionError(errno.EACCES, "denied")  # not a full disk: unchanged


def test_a_write_that_finds_the_disk_full_names_its_output_and_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "adapter" / "weights.safetensors"

    @disk_full_stage("export_peft", "output_dir")
    def export(output_dir: Path) -> None:
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise _no_space()  # as a write to an open file raises it: no file name

    with pytest.raises(DiskFullError, match=f"^export_peft: no space left on {final} "):
        export(tmp_path / "adapter")
    assert list(final.parent.iterdir()) == []
    assert final_name(temp_sibling(final) / "config.json") == final / "config.json"
