"""Sharding to data x model x pipeline parallel layouts, unsharding and re-sharding (issue 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from llama_core.checkpoint.msckpt import load_ckpt_dict, write_ckpt
from llama_core.checkpoint.shard import main, shard_checkpoint
from llama_core.checkpoint.unshard import unshard_checkpoint
from llama_core.cli import exit_code
from llama_core.errors import ConfigError, InputError

H, HEADS, KV, FFN, VOCAB, LAYERS, R = 32, 4, 2, 64, 64, 3, 4
D = H // HEADS


def model_config(**parallel) -> dict:
    return {
        "parallel_config": {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1, **parallel},
        "model": {
            "model_config": {
                "hidden_size": H,
                "num_layers": LAYERS,
                "num_heads": HEADS,
                "n_kv_heads": KV,
                "intermediate_size": FFN,
                "vocab_size": VOCAB,
            }
        },
    }


def tensors(lora: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    t = {"model.tok_embeddings.embedding_weight": w(VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "attention_norm.weight"] = w(H)
        t[p + "attention.wq.weight"] = w(HEADS * D, H)
        t[p + "attention.wk.weight"] = w(KV * D, H)
        t[p + "attention.wv.weight"] = w(KV * D, H)
        t[p + "attention.wo.weight"] = w(H, HEADS * D)
        t[p + "ffn_norm.weight"] = w(H)
        t[p + "feed_forward.w1.weight"] = w(FFN, H)
        t[p + "feed_forward.w2.weight"] = w(H, FFN)
        t[p + "feed_forward.w3.weight"] = w(FFN, H)
        if lora:
            t[p + "attention.wq.mindpet_delta_lora_a"] = w(R, H)
            t[p + "attention.wq.mindpet_delta_lora_b"] = w(HEADS * D, R)
            t[p + "attention.wo.mindpet_delta_lora_a"] = w(R, HEADS * D)
            t[p + "attention.wo.mindpet_delta_lora_b"] = w(H, R)
            t["adam_m." + p + "attention.wo.mindpet_delta_lora_a"] = w(R, HEADS * D)
    t["model.norm_out.weight"] = w(H)
    t["lm_head.weight"] = w(VOCAB, H)
    return t


def save(path: Path, t: dict[str, np.ndarray], crc: bool = False) -> Path:
    items = [(k, v, "F32") for k, v in t.items()] + [("global_step", np.array(12, np.int32), "I32")]
    write_ckpt(path, items, crc=crc)
    return path


# Expected slicing, written out by hand from the table: (axis, which stage) per name.
def expected_axis(name: str) -> int | None:
    if name.endswith(
        ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "wq.mindpet_delta_lora_b")
    ):
        return 0
    if name.endswith(("wo.weight", "w2.weight", "wo.mindpet_delta_lora_a")):
        return 1
    if name in ("model.tok_embeddings.embedding_weight", "lm_head.weight"):
        return 0
    return None


def expected_stage(name: str) -> int | None:
    """Stage for 3 layers over 2 stages: layers 0-1 on stage 0, layer 2 on stage 1."""
    if "tok_embeddings" in name:
        return 0
    if name in ("model.norm_out.weight", "lm_head.weight"):
        return 1
    if "layers." in name:
        return 0 if int(name.split("layers.")[1].split(".")[0]) < 2 else 1
    return None  # global_step: everywhere


@pytest.fixture
def src(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    t = tensors()
    return save(tmp_path / "src" / "full.ckpt", t), t


def test_pure_data_parallel_links_the_source(src, tmp_path):
    path, _ = src
    out = tmp_path / "dp4"
    res = shard_checkpoint(path, model_config(data_parallel=4), out)
    assert res.world_size == 4 and res.link == "hardlink" and res.bytes_written == 0
    new = [f.name for f in out.rglob("*") if f.is_file() and f.stat().st_ino != path.stat().st_ino]
    assert new == ["manifest.json"]  # no weight bytes written (the 1% bound is measured in bench/)
    for r in range(4):
        f = out / f"rank_{r}" / f"checkpoint_{r}.ckpt"
        assert f.stat().st_ino == path.stat().st_ino
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == {
        "data_parallel": 4,
        "model_parallel": 1,
        "pipeline_stage": 1,
        "world_size": 4,
    }
    assert manifest["source"]["digest"] == {
        str(path.resolve()): "sha256:" + __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    }

    again = shard_checkpoint(path, model_config(data_parallel=4), out)
    assert again.cached
    shutil.rmtree(out)
    assert path.exists()  # removing the shards never touches the source


def test_tensor_and_pipeline_parallel_slices(src, tmp_path):
    path, t = src
    out = tmp_path / "tp2pp2dp2"
    res = shard_checkpoint(path, model_config(data_parallel=2, model_parallel=2, pipeline_stage=2), out)
    assert res.world_size == 8
    ms = pytest.importorskip("mindspore")
    for rank in range(8):
        stage, rest = divmod(rank, 4)
        d, m = divmod(rest, 2)
        f = out / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        got = load_ckpt_dict(f)
        want = {}
        for name, arr in t.items():
            if expected_stage(name) not in (None, stage):
                continue
            axis = expected_axis(name)
            if axis == 0:
                n = arr.shape[0] // 2
                arr = arr[m * n : (m + 1) * n]
            elif axis == 1:
                n = arr.shape[1] // 2
                arr = arr[:, m * n : (m + 1) * n]
            want[name] = arr
        assert set(got) == set(want) | {"global_step"}, rank
        for name, arr in want.items():
            np.testing.assert_array_equal(got[name], arr, err_msg=f"rank {rank} {name}")
        if d == 1:  # data-parallel replica shares the file of its dp-0 twin
            twin = out / f"rank_{rank - 2}" / f"checkpoint_{rank - 2}.ckpt"
            assert f.stat().st_ino == twin.stat().st_ino
    # whole kv heads: 2 kv heads over 2 ranks -> one head (8 rows) each
    assert load_ckpt_dict(out / "rank_1" / "checkpoint_1.ckpt")[
        "model.layers.0.attention.wk.weight"
    ].shape == (8, H)
    loaded = ms.load_checkpoint(str(out / "rank_5" / "checkpoint_5.ckpt"))
    assert loaded["lm_head.weight"].shape == (VOCAB // 2, H)


@pytest.mark.parametrize("crc", [False, True])
def test_unshard_is_byte_identical(tmp_path, crc):
    path = save(tmp_path / "full.ckpt", tensors(), crc=crc)
    out = tmp_path / "sharded"
    shard_checkpoint(path, model_config(model_parallel=2, pipeline_stage=3), out)
    back = unshard_checkpoint(out, tmp_path / "back.ckpt")
    assert (tmp_path / "back.ckpt").read_bytes() == path.read_bytes()
    assert not back.cached and unshard_checkpoint(out, tmp_path / "back.ckpt").cached


def test_reshard_from_distributed_equals_shard_from_complete(src, tmp_path):
    path, _ = src
    a = tmp_path / "a"
    shard_checkpoint(path, model_config(model_parallel=2, pipeline_stage=2), a)
    via = shard_checkpoint(a, model_config(data_parallel=2, pipeline_stage=3), tmp_path / "b")
    direct = shard_checkpoint(path, model_config(data_parallel=2, pipeline_stage=3), tmp_path / "c")
    for f_via, f_direct in zip(via.rank_files, direct.rank_files, strict=True):
        assert f_via.read_bytes() == f_direct.read_bytes()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["source"]["kind"] == "sharded"


def test_replicated_training_output_is_a_valid_source(src, tmp_path):
    path, t = src
    dist = tmp_path / "checkpoint"
    for r in range(2):
        (dist / f"rank_{r}").mkdir(parents=True)
        shutil.copy(path, dist / f"rank_{r}" / f"llama_rank_{r}-1_5.ckpt")
    res = shard_checkpoint(dist, model_config(model_parallel=2), tmp_path / "out")
    got = load_ckpt_dict(res.rank_files[1])
    np.testing.assert_array_equal(
        got["model.layers.2.feed_forward.w2.weight"], t["model.layers.2.feed_forward.w2.weight"][:, 32:]
    )


def test_bad_inputs_fail_naming_the_culprit_and_leave_no_dir(src, tmp_path):
    path, t = src
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"num_heads = 4 .*model_parallel = 3"):
        shard_checkpoint(path, model_config(model_parallel=3), out)
    assert not out.exists()

    bad = dict(t)
    bad["model.layers.1.feed_forward.w1.weight"] = np.zeros((FFN + 1, H), np.float32)
    with pytest.raises(InputError, match=r"model\.layers\.1\.feed_forward\.w1\.weight.*\[64, 32\]"):
        shard_checkpoint(save(tmp_path / "bad.ckpt", bad), model_config(model_parallel=2), out)
    assert not out.exists()

    sharded = tmp_path / "sharded"
    shard_checkpoint(path, model_config(model_parallel=2, data_parallel=2), sharded)
    shutil.rmtree(sharded / "rank_3")
    with pytest.raises(InputError, match=r"rank_3.*missing"):
        shard_checkpoint(sharded, model_config(data_parallel=2), out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    with pytest.raises(InputError, match=r"q_norm.*not a Llama weight"):
        shard_checkpoint(
            save(
                tmp_path / "u.ckpt",
                {**t, "model.layers.0.attention.q_norm.weight": t["model.norm_out.weight"]},
            ),
            model_config(),
            out,
        )


def test_cli_with_yaml_and_override(src, tmp_path, capsys):
    path, _ = src
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(model_config(data_parallel=2)))
    out = tmp_path / "cli"
    argv = ["--load_checkpoint", str(path), "--config", str(cfg), "--output_dir", str(out)]
    assert main([*argv, "--parallel_config.model_parallel", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["world_size"] == 4
    assert exit_code(main, [*argv, "--parallel_config.model_parallel", "3"]) == 2
    assert "model_parallel = 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])


def test_tensors_split_over_several_values(tmp_path, monkeypatch):
    """MindSpore splits tensors > 512 MiB into several Values; slices must cross those seams."""
    from llama_core.checkpoint import msckpt

    monkeypatch.setattr(msckpt, "CHUNK_BYTES", 1000)  # 64x32 fp32 = 8192 bytes -> 9 Values
    t = tensors(lora=False)
    path = save(tmp_path / "full.ckpt", t)
    assert len(msckpt.scan_ckpt(path)[0].chunks) == 9
    res = shard_checkpoint(path, model_config(model_parallel=2), tmp_path / "tp2")
    got = load_ckpt_dict(res.rank_files[1])
    np.testing.assert_array_equal(
        got["model.tok_embeddings.embedding_weight"], t["model.tok_embeddings.embedding_weight"][32:]
    )
    np.testing.assert_array_equal(
        got["model.layers.0.feed_forward.w2.weight"], t["model.layers.0.feed_forward.w2.weight"][:, 32:]
    )
    unshard_checkpoint(tmp_path / "tp2", tmp_path / "back.ckpt")
    assert (tmp_path / "back.ckpt").read_bytes() == path.read_bytes()
