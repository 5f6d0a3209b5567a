"""A full disk: with the work folder on a small tmpfs, every stage that writes fails with one message
naming the stage, the path and "no space left", leaves nothing a later run would take as complete (no
final name, no temporary file), keeps the last good checkpoint, and succeeds when run again once space
is freed. The free-space check of validate is held to the same disk. Needs root (mount -t tmpfs)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from llama_core.atomic import TMP_MARK
from llama_core.errors import ConfigError, DiskFullError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "lora_llama2_tiny.yaml")
KIB, MIB = 1 << 10, 1 << 20


class Tmpfs:
    """A mounted tmpfs and a filler file that takes its free space."""

    def __init__(self, path: Path) -> None:
        self.path, self.filler = path, path / "filler"

    def fill(self, leave: int) -> None:
        """Take every free byte but `leave`."""
        self.free_space()
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, shutil.disk_usage(self.path).free - leave)
        finally:
            os.close(fd)

    def free_space(self) -> None:
        self.filler.unlink(missing_ok=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Tmpfs]:
    """A tmpfs of `size` bytes mounted at `path` while the block runs; skips the test when it cannot be."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs, and mounting one needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {proc.stderr.strip()}")
    try:
        yield Tmpfs(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Tmpfs]:
    # MindSpore's MindRecord writer refuses to start below 10 MiB free: room for it once space is freed
    with tmpfs(tmp_path / "mnt", 32 * MIB) as mounted:
        yield mounted


def leftovers(root: Path) -> list[Path]:
    """Temporary entries under `root`: atomic writes' `.<name>.tmp-*` and MindSpore's `<name>.tmp`."""
    return [p for p in root.rglob("*") if TMP_MARK in p.name or p.suffix == ".tmp"]


def assert_full_disk(exc: BaseException, stage: str, path: Path) -> None:
    """The operator's failure: the stage's message alone, without the write's traceback chained."""
    assert f"{stage}: no space left on {path}" in str(exc), str(exc)
    assert exc.__cause__ is None and exc.__suppress_context__


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_on_a_full_disk_keeps_only_its_partial_then_resumes(disk: Tmpfs, demo_inputs: Any) -> None:
    from operators.stages import FetchOperator

    dest = disk.path / "downloads" / "weights"
    op = FetchOperator(task_id="fetch_weights", source=str(demo_inputs.checkpoint), dest=str(dest))
    disk.fill(leave=64 * KIB)
    with pytest.raises(AirflowFailException) as failed:
        op.execute({})
    assert_full_disk(failed.value, "fetch", dest)
    assert not (dest / demo_inputs.checkpoint.name).exists() and not leftovers(disk.path)
    assert (dest / f".{demo_inputs.checkpoint.name}.part").is_file()  # hidden, for the next fetch to resume
    disk.free_space()
    fetched = op.execute({})
    assert digest(Path(fetched["path"])) == digest(demo_inputs.checkpoint)


def test_preprocess_on_a_full_disk_leaves_no_mindrecord(
    disk: Tmpfs, demo_inputs: Any, tmp_path: Path
) -> None:
    from llama_core.data.alpaca_converter import convert_alpaca
    from operators.stages import TokenizeToMindRecordOperator

    conversations = convert_alpaca(demo_inputs.alpaca, tmp_path / "conversations.json").output_path
    out = disk.path / "data" / "seq160" / "alpaca-holdout0.1.mindrecord"
    op = TokenizeToMindRecordOperator(
        task_id="tokenize_to_mindrecord",
        input_glob=str(conversations),
        model_file=str(demo_inputs.tokenizer),
        output_file=str(out),
        seq_length=160,
        holdout_fraction=0.1,
        workers=1,
    )
    disk.fill(leave=64 * KIB)
    with pytest.raises(AirflowFailException) as failed:
        op.execute({})
    assert_full_disk(failed.value, "preprocess", out)
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == []
    assert not leftovers(disk.path)
    disk.free_space()
    assert op.execute({})["records_written"] > 0 and out.is_file()


def test_a_mindrecord_writer_that_fills_the_disk_gives_its_space_back(tmp_path: Path) -> None:
    import numpy as np

    from llama_core.data.mindrecord_sink import MindRecordSink

    schema = {"input_ids": {"type": "int32", "shape": [-1]}}
    rng = np.random.default_rng(0)
    with tmpfs(tmp_path / "mnt", 14 * MIB) as small:  # MindSpore's writer stops below 10 MiB free
        out = small.path / "x.mindrecord"
        sink = MindRecordSink(out, 1, schema, "qa", {"input_ids": 0})
        with pytest.raises(OSError) as full:
            for _ in range(100):  # 20 MiB of incompressible rows
                sink.write(
                    [{"input_ids": (rng.integers(0, 2**30, 4096, dtype=np.int32).tobytes(), 4096)}] * 64
                )
        assert (full.value.errno, full.value.filename) == (errno.ENOSPC, str(out))
        sink.discard()
        assert shutil.disk_usage(small.path).used == 0 and list(small.path.iterdir()) == []


def test_shard_on_a_full_disk_leaves_no_rank_files(disk: Tmpfs, demo_inputs: Any) -> None:
    from operators.stages import ShardCheckpointOperator

    out = disk.path / "checkpoint" / "transformed"
    op = ShardCheckpointOperator(
        task_id="shard_checkpoint",
        load_checkpoint=str(demo_inputs.checkpoint),
        config=TINY,
        overrides={"parallel_config.model_parallel": 2, "parallel_config.data_parallel": 1},
        output_dir=str(out),
    )
    disk.fill(leave=128 * KIB)
    with pytest.raises(AirflowFailException) as failed:
        op.execute({})
    assert_full_disk(failed.value, "shard", out)
    assert not out.exists() and not leftovers(disk.path)
    disk.free_space()
    assert op.execute({})["world_size"] == 2 and (out / "rank_1" / "checkpoint_1.ckpt").is_file()


# -- the fine-tune: one run saves, the next fills the disk at its first save, a third resumes
RUN_OVERRIDES = {"parallel_config.data_parallel": 1, "callbacks.1.keep_checkpoint_max": 1}


def _finetune(records: Path, run_dir: Path, base: Path, epochs: int) -> dict[str, Any]:
    from operators.finetune import MsrunFinetuneOperator

    return MsrunFinetuneOperator(
        task_id="finetune",
        config=TINY,
        overrides={**RUN_OVERRIDES, "runner_config.epochs": epochs},
        train_dataset_dir=str(records),
        load_checkpoint=str(base),
        output_dir=str(run_dir),
        device_target="CPU",
    ).execute({})


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, demo_inputs: Any) -> Iterator[SimpleNamespace]:
    """Epoch 1 (8 steps) saves step 8 (keep_checkpoint_max 1); then, on a full disk, a run of 2 epochs
    resumes and fails at its first save (step 10); once space is freed the same run resumes from step 8
    and ends. The tmpfs stays mounted for the stages after the fine-tune."""
    from test_train_runs import write_records

    from llama_core.launch import LaunchError

    tmp = tmp_path_factory.mktemp("finetune")
    records = write_records(tmp / "train.mindrecord", 16, patterns=4)
    with tmpfs(tmp / "mnt", 16 * MIB) as mounted:
        run_dir = mounted.path / "runs" / "r1"
        _finetune(records, run_dir, demo_inputs.checkpoint, epochs=1)
        kept = run_dir / "checkpoint" / "rank_0" / "llama_tiny_lora_rank_0-1_8.ckpt"
        before = digest(kept)
        mounted.fill(leave=kept.stat().st_size // 2)  # the rank's logs fit, a checkpoint does not
        with pytest.raises(LaunchError) as failed:
            _finetune(records, run_dir, demo_inputs.checkpoint, epochs=2)
        state = SimpleNamespace(
            disk=mounted, run_dir=run_dir, records=records, kept=kept, before=before, after=digest(kept),
            size=kept.stat().st_size, failure=failed.value,
            rank_log=(run_dir / "msrun_log" / "worker_0.log").read_text(),  # before the next run's
            scheduler_log=(run_dir / "msrun_log" / "scheduler.log").read_text(),
            files={str(p.relative_to(mounted.path)): p.stat().st_size for p in mounted.path.rglob("*")},
            after_failure=sorted(p.name for p in kept.parent.iterdir()), leftovers=leftovers(mounted.path),
        )  # fmt: skip
        mounted.free_space()
        state.summary = _finetune(records, run_dir, demo_inputs.checkpoint, epochs=2)
        yield state


@pytest.mark.slow
def test_a_rank_whose_save_finds_the_disk_full_fails_with_the_message(finetuned: SimpleNamespace) -> None:
    message = str(finetuned.failure)
    saving = finetuned.run_dir / "checkpoint" / "rank_0" / "llama_tiny_lora_rank_0-2_2.ckpt"
    assert f"finetune: no space left on {saving} (needs about" in message, message  # the launcher's
    seen = "\n".join([*finetuned.rank_log.splitlines()[-30:], f"files: {finetuned.files}"])
    assert f"error: finetune: no space left on {saving}" in finetuned.rank_log, seen  # the rank's own
    assert finetuned.after_failure == [finetuned.kept.name] and finetuned.leftovers == []
    # msrun's scheduler runs the same command: one rank, so it does not train into the run folder too
    assert "nothing to schedule" in finetuned.scheduler_log and " step=" not in finetuned.scheduler_log


@pytest.mark.slow
def test_the_estimate_of_a_checkpoint_is_its_size(finetuned: SimpleNamespace, demo_inputs: Any) -> None:
    from llama_core.config import apply_overrides, load_config
    from llama_core.space import estimate_space

    cfg = apply_overrides(load_config(TINY), RUN_OVERRIDES.items())
    est = estimate_space(finetuned.run_dir, cfg, _sources(demo_inputs))
    per_checkpoint = est.terms["checkpoints"] / 2  # one rank, keep_checkpoint_max 1, and the one being saved
    assert 0.95 < per_checkpoint / finetuned.size < 1.05


@pytest.mark.slow
def test_the_last_good_checkpoint_survives_and_the_resume_continues_from_it(
    finetuned: SimpleNamespace,
) -> None:
    assert finetuned.after == finetuned.before  # untouched by the failed save, and not deleted by keep-max
    assert finetuned.summary["resumed_from"] == str(finetuned.kept)
    assert finetuned.summary["steps"] == 16 and finetuned.summary["steps_this_run"] == 8


@pytest.mark.slow
def test_evaluate_on_a_full_disk_writes_no_result(
    finetuned: SimpleNamespace, demo_inputs: Any, tmp_path: Path
) -> None:
    from operators.evaluate import write_resolved_config

    config, _ = write_resolved_config(tmp_path, TINY, RUN_OVERRIDES, None)
    out = finetuned.run_dir / "evaluation.json"
    cmd = [
        sys.executable, "-m", "llama_core.evaluation", "--config", str(config),
        "--base_checkpoint", str(demo_inputs.checkpoint), "--finetuned_checkpoint", str(finetuned.run_dir),
        "--output_path", str(out), "--eval_data", str(finetuned.records), "--device_target", "CPU",
    ]  # fmt: skip
    finetuned.disk.fill(leave=0)
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        finetuned.disk.free_space()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: evaluate: no space left on {out}")
    assert not out.exists() and not leftovers(finetuned.disk.path)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["finetuned"]["eval_loss"] > 0


@pytest.mark.slow
def test_exports_on_a_full_disk_leave_no_adapter_and_no_merged_model(
    finetuned: SimpleNamespace, demo_inputs: Any
) -> None:
    from llama_core.checkpoint.convert import convert_ms_to_hf
    from llama_core.checkpoint.export_peft import export_peft
    from llama_core.checkpoint.merge_lora import merge_lora
    from llama_core.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(TINY), RUN_OVERRIDES.items())
    final = finetuned.run_dir / "checkpoint"  # rank 0's newest
    adapter, merged, hf = (finetuned.run_dir / name for name in ("adapter", "merged.ckpt", "merged_hf"))
    steps = [
        ("export_peft", adapter, lambda: export_peft(final, adapter, "tiny", config=cfg)),
        ("merge_lora", merged, lambda: merge_lora(demo_inputs.checkpoint, merged, final, config=cfg)),
        ("convert", hf, lambda: convert_ms_to_hf(merged, hf, config=cfg)),
    ]
    for stage, out, run in steps:
        finetuned.disk.fill(leave=16 * KIB)
        try:
            with pytest.raises(DiskFullError, match=f"^{stage}: no space left on {re.escape(str(out))}"):
                run()
        finally:
            finetuned.disk.free_space()
        assert not out.exists() and not leftovers(finetuned.disk.path), stage
        assert not run().cached and out.exists()


@pytest.mark.slow
def test_the_report_on_a_full_disk_writes_nothing_of_itself(finetuned: SimpleNamespace) -> None:
    from operators.report import ReportOperator

    context = {
        "ti": SimpleNamespace(xcom_pull=lambda task_ids: None, xcom_push=lambda key, value: None),
        "params": {"seq_length": 32, "export_merged": False},
        "dag_run": SimpleNamespace(dag_id="d", run_id="r1", logical_date=None),
    }
    op = ReportOperator(
        task_id="report", run_dir=str(finetuned.run_dir), config=TINY, overrides=RUN_OVERRIDES
    )
    report = [finetuned.run_dir / name for name in ("loss_curve.png", "report.md", "report.json")]
    finetuned.disk.fill(leave=16 * KIB)  # the resolved config fits, the loss curve does not
    try:
        with pytest.raises(AirflowFailException) as failed:
            op.execute(context)
    finally:
        finetuned.disk.free_space()
    assert_full_disk(failed.value, "report", report[0])
    assert not any(p.exists() for p in report) and not leftovers(finetuned.disk.path)
    assert op.execute(context)["report"] == str(report[1]) and all(p.is_file() for p in report)


# -- validate's free-space check
_SOURCES = {"alpaca": "alpaca", "tokenizer": "tokenizer", "weights": "checkpoint"}  # DemoInputs' names


def _sources(demo_inputs: Any) -> dict[str, str]:
    return {name: str(getattr(demo_inputs, attr)) for name, attr in _SOURCES.items()}


def _params(work_dir: Path, demo_inputs: Any, **extra: Any) -> dict[str, Any]:
    urls = {f"{name}_url": url for name, url in _sources(demo_inputs).items()}
    return {"work_dir": str(work_dir), **urls, "holdout_fraction": 0.1, "export_merged": True, **extra}


def _demo_config() -> dict[str, Any]:
    from llama_core.config import apply_overrides, load_config

    return apply_overrides(load_config(TINY), [("model.model_config.seq_length", 160)])


def test_validate_refuses_a_work_dir_without_the_space_the_run_needs(disk: Tmpfs, demo_inputs: Any) -> None:
    from llama_core.space import check_free_space

    params = _params(disk.path / "work", demo_inputs)
    fits = check_free_space(params["work_dir"], params, _demo_config())
    assert fits.fits and fits.needed_bytes < 32 * MIB
    disk.fill(leave=fits.needed_bytes - MIB)
    with pytest.raises(ConfigError) as refused:
        check_free_space(params["work_dir"], params, _demo_config())
    message = str(refused.value)
    assert (
        message.startswith(f"param 'work_dir': work_dir {disk.path / 'work'} has ")
        and "free 1.0 MiB" in message
    )
    for term in ("weights download", "MindRecord", "checkpoints", "merged export"):
        assert term in message
    assert "save_trainable_params: True would save" in message  # the frozen weights in every checkpoint

    # the same refusal from the validate task's command, with the pipeline's other params
    full = {
        **params, "config": TINY, "seq_length": 160, "device_target": "CPU",
        "overrides": {"runner_config.epochs": 1},
    }  # fmt: skip
    (disk.path.parent / "params.json").write_text(json.dumps(full))
    env = {**os.environ, "LLAMA_LORA_SOURCE_ROOTS": str(Path(demo_inputs.alpaca).parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "llama_core.validate", "--params", str(disk.path.parent / "params.json"),
         "--work_root", str(disk.path)],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode != 0 and "param 'work_dir'" in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert "free 1.0 MiB" in proc.stderr + proc.stdout


def test_the_estimate_skips_what_is_cached_and_sizes_what_it_can(demo_inputs: Any, tmp_path: Path) -> None:
    from llama_core.cache import file_sha256
    from llama_core.data.alpaca_converter import convert_alpaca
    from llama_core.data.llama_preprocess import preprocess
    from llama_core.fetch import fetch
    from llama_core.space import check_free_space

    work = tmp_path / "work"
    fetch(str(demo_inputs.checkpoint), work / "downloads" / "weights")
    est = check_free_space(str(work), _params(work, demo_inputs), _demo_config())
    assert est.cached == ["weights download"] and "weights download" not in est.terms
    assert est.terms["alpaca download"] == demo_inputs.alpaca.stat().st_size
    assert est.terms["MindRecord"] == 240 * 2 * 161 * 4  # the demo's records, two int32 columns
    assert est.terms["merged export"] == 2 * demo_inputs.checkpoint.stat().st_size
    # the data as the DAG names it: then neither it nor the conversations are counted again
    data = work / "data" / f"alpaca-{file_sha256(demo_inputs.alpaca)[:16]}"
    conversations = Path(convert_alpaca(demo_inputs.alpaca, data / "alpaca-conversation.json").output_path)
    assert est.terms["conversations"] >= conversations.stat().st_size
    out = data / "seq160" / "alpaca-holdout0.1.mindrecord"
    preprocess("qa", str(conversations), demo_inputs.tokenizer, out, 160, holdout_fraction=0.1, workers=1)
    est = check_free_space(str(work), _params(work, demo_inputs), _demo_config())
    assert est.cached == ["weights download", "MindRecord"] and "conversations" not in est.terms
    remote = _params(work, demo_inputs, alpaca_url="http://127.0.0.1:9/a.json", weights_url="hf://org/llama")
    est = check_free_space(str(work), remote, _demo_config())  # no network: what is unknown is said
    assert est.unknown == ["alpaca download", "MindRecord"] and "weights download (estimated)" in est.terms
    store = work / "downloads" / "alpaca"  # an interrupted download: its Content-Length is known
    store.mkdir(parents=True)
    (store / ".a.json.part").write_bytes(b"x" * 100)
    (store / ".a.json.part.json").write_text(json.dumps({"validator": "etag", "size": 1000}))
    assert check_free_space(str(work), remote, _demo_config()).terms["alpaca download"] == 900
