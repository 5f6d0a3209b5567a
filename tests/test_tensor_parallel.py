"""Tensor parallelism (`llama_core.model.parallel`) on 2 CPU msrun ranks against the whole model.

- model: for a tiny Llama with GQA, a Qwen2-style one (q/k/v bias, tied head, a single kv head
  replicated over the ranks) and a Qwen3-style one (q/k norm, explicit head_dim), each
  with LoRA on all seven projections and the head, the ranks' logits, loss and LoRA gradients
  equal the whole model's within 1e-5, and each rank holds half the split base weights' bytes;
- training: model_parallel 2 (2 ranks) and model_parallel 2 x data_parallel 2 (4 ranks) follow
  model_parallel 1 step by step, bucketed and packed, and their unsharded LoRA weights match.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_runs import (
    BUCKETS,
    CONFIG,
    lora_weights,
    write_documents,
    write_padded_records,
    write_records,
)

from llama_core.launch.preflight import free_port

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
ALL_LINEARS = ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3|lm_head"

TINY = {
    "seq_length": 16,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 512,
    "intermediate_size": 96,
    "max_position_embedding": 64,
    "pet_config": {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                   "target_modules": ALL_LINEARS},
}  # fmt: skip
FAMILIES = {
    "llama": TINY,
    # one kv head for 2 ranks: k/v (and their bias) computed whole on each rank, their gradient
    # summed over the ranks
    "qwen2": {**TINY, "n_kv_heads": 1, "qkv_has_bias": True, "tie_word_embeddings": True, "theta": 1.0e6},
    "qwen3": {**TINY, "qk_norm": True, "head_dim": 32},
}


def whole_checkpoint(config: dict, path: Path, seed: int) -> Path:
    """A complete checkpoint of the model with LoRA whose B is not zero (so every LoRA tensor has a
    gradient worth comparing) and q/k/v biases and norms away from their initial values."""
    import mindspore as ms

    from llama_core.model import LlamaConfig, LlamaForCausalLM, LoraConfig, apply_lora

    ms.set_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    apply_lora(model, LoraConfig.from_pet_config(config["pet_config"]))
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        if "lora_b" in p.name or p.name.endswith((".bias", "norm.weight")):
            p.set_data(ms.Tensor(rng.normal(0.0, 0.05, p.shape).astype(np.float32) + (p.ndim == 1)))
    ms.save_checkpoint(model, str(path))
    return path


def run_config(config: dict, mp: int, dp: int = 1) -> dict:
    return {"model": {"model_config": config}, "parallel_config": {"data_parallel": dp, "model_parallel": mp}}


@pytest.fixture(scope="module")
def model_check(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every family's worker output, one npz per rank (one msrun launch for all of them)."""
    from llama_core.checkpoint.shard import shard_checkpoint
    from llama_core.launch import launch

    tmp = tmp_path_factory.mktemp("tp_model")
    cases = []
    for i, (family, config) in enumerate(FAMILIES.items()):
        full = whole_checkpoint(config, tmp / f"{family}.ckpt", seed=i)
        shards = tmp / f"{family}_mp2"
        shard_checkpoint(full, run_config(config, mp=2), shards)
        out = tmp / family
        out.mkdir()
        cases.append({"config": config, "full": str(full), "shards": str(shards), "out": str(out)})
    (tmp / "cases.json").write_text(json.dumps(cases))
    launch(
        [str(tmp / "cases.json")],
        worker_num=2,
        local_worker_num=2,
        master_port=free_port(),
        log_dir=tmp / "msrun_log",
        join=True,
        command=[sys.executable, str(WORKER)],
    )
    return {family: [dict(np.load(tmp / family / f"rank_{r}.npz")) for r in range(2)] for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_parallel_2_equals_the_whole_model(model_check: dict, family: str) -> None:
    for rank, out in enumerate(model_check[family]):
        np.testing.assert_allclose(out["split_logits"], out["whole_logits"], rtol=0, atol=1e-5)
        assert np.ptp(out["whole_logits"]) > 1e-2  # logits that say something
        np.testing.assert_allclose(out["split_loss"], out["whole_loss"], rtol=1e-6)
        grads = sorted(k.split("/", 1)[1] for k in out if k.startswith("whole_grad/"))
        assert grads == sorted(k.split("/", 1)[1] for k in out if k.startswith("split_grad/"))
        # A and B of all seven projections in every layer (and of the head when untied)
        assert len(grads) == 2 * (7 * FAMILIES[family]["num_layers"] + (family != "qwen2"))
        for name in grads:
            whole, split = out[f"whole_grad/{name}"], out[f"split_grad/{name}"]
            assert np.abs(whole).max() > 1e-6, f"rank {rank} {name}: no gradient to compare"
            np.testing.assert_allclose(split, whole, rtol=0, atol=1e-6, err_msg=f"rank {rank} {name}")


def test_each_rank_holds_half_the_base_weights(model_check: dict) -> None:
    from llama_core.model import LlamaConfig, LlamaForCausalLM

    for family, config in FAMILIES.items():
        params = LlamaForCausalLM(LlamaConfig.from_dict(config)).get_parameters()
        sizes = {p.name: p.asnumpy().nbytes for p in params}
        # the RMSNorm weights are replicated on every rank (and k/v with fewer kv heads than
        # ranks), everything else is split in two
        kv_whole = config.get("n_kv_heads", config["num_heads"]) % 2 != 0
        replicated = sum(
            n
            for name, n in sizes.items()
            if "norm" in name or (kv_whole and (".attention.wk." in name or ".attention.wv." in name))
        )
        expected = (sum(sizes.values()) - replicated) // 2 + replicated
        for rank, out in enumerate(model_check[family]):
            assert int(out["base_bytes"]) == expected, f"{family} rank {rank}"


# -- training: model_parallel 2 (x data_parallel 2) step by step against model_parallel 1

# lr 1e-3: at the tiny config's 5e-3 these random-token runs turn unstable after a dozen steps
# (gradient norms of 15-20) and amplify fp32 summation-order noise past 1e-5, whatever the layout.
EXACT = [
    "--lr_schedule.learning_rate", "1.e-3",
    "--model.model_config.pet_config.target_modules", ALL_LINEARS,
    "--model.model_config.pet_config.lora_dropout", "0",
    "--callbacks.1.save_trainable_params", "True",
    "--parallel.gradients_mean", "True",
]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny config with GQA (`config`), one complete base checkpoint with LoRA on every linear
    (A included, so every run starts from the same adapter) and its model_parallel 2 shards, one per
    data_parallel size."""
    import yaml

    from llama_core.checkpoint.shard import shard_checkpoint
    from llama_core.config import apply_overrides, load_config, parse_override_args

    tmp = tmp_path_factory.mktemp("tp_base")
    cfg = load_config(CONFIG)
    cfg["model"]["model_config"]["n_kv_heads"] = 2
    cfg["recompute_config"] = {"recompute": False, "select_recompute": False}
    (tmp / "tiny_gqa.yaml").write_text(yaml.safe_dump(cfg))
    cfg = apply_overrides(cfg, parse_override_args(EXACT))
    full = whole_checkpoint(cfg["model"]["model_config"], tmp / "base.ckpt", seed=7)
    out = {"config": tmp / "tiny_gqa.yaml", "full": full}
    for dp in (1, 2):
        cfg["parallel_config"] = {"data_parallel": dp, "model_parallel": 2}
        out[f"mp2_dp{dp}"] = shard_checkpoint(full, cfg, tmp / f"mp2_dp{dp}").output_dir
    return out


def train_mp(tmp: Path, base: dict, name: str, mp: int, dp: int, args: list[str]) -> Path:
    """Train with model_parallel x data_parallel ranks (one process when both are 1) from `base`'s
    checkpoint for that layout; the output folder."""
    from llama_core.launch import launch

    out = tmp / name
    load = base["full"] if mp == 1 else base[f"mp2_dp{dp}"]
    common = ["--config", str(base["config"]), "--run_mode", "finetune", "--output_dir", str(out),
              "--load_checkpoint", str(load), *EXACT, "--parallel_config.model_parallel", str(mp),
              "--parallel_config.data_parallel", str(dp), *args]  # fmt: skip
    if mp * dp == 1:
        proc = subprocess.run([sys.executable, "-m", "llama_core.run", *common], cwd=REPO,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        launch(
            [*common, "--use_parallel", "True"],
            worker_num=mp * dp,
            local_worker_num=mp * dp,
            master_port=free_port(),
            log_dir=tmp / f"{name}_msrun_log",
            join=True,
        )
    return out


def assert_same_training(reference: Path, parallel: Path, steps: int) -> None:
    """Per-step losses and gradient norms within 1e-5 (relative), and the LoRA weights and their
    optimizer state that the parallel run's checkpoint folder rebuilds whole within 1e-5 of the
    reference's."""
    import mindspore as ms

    from llama_core.checkpoint.unshard import complete_checkpoint

    ref, par = (
        json.loads((p / "train_summary.json").read_text())["loss_series"] for p in (reference, parallel)
    )
    assert len(ref) == len(par) == steps
    for key in ("loss", "grad_norm"):
        a, b = np.array([r[key] for r in ref]), np.array([r[key] for r in par])
        np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=key)
    assert np.ptp([r["loss"] for r in ref]) > 1e-3  # the curve moves
    whole = lora_weights(reference)
    final = complete_checkpoint(parallel, "run folder")  # what evaluate and the exports read
    assert final.parent == parallel / "checkpoint" / "complete"
    rebuilt = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(final)).items() if "lora" in k}
    # A and B of 7 linears x 2 layers and of the head, each with its two AdamW moments
    assert rebuilt.keys() == whole.keys() and len(whole) == 3 * (2 * 7 * 2 + 2)
    for name, w in whole.items():
        np.testing.assert_allclose(rebuilt[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
    assert max(np.abs(w).max() for name, w in whole.items() if "lora_b" in name) > 1e-3


def test_model_parallel_2_trains_as_one_process_with_length_buckets(tmp_path: Path, base: dict) -> None:
    """...and with every decoder layer recomputed in the backward pass (recompute_config.recompute)."""
    data = write_padded_records(tmp_path / "train.mindrecord", 44)
    args = ["--train_dataset_dir", str(data), "--batch_size", "2", *BUCKETS]
    one = train_mp(tmp_path, base, "mp1", 1, 1, args)
    two = train_mp(tmp_path, base, "mp2", 2, 1, [*args, "--recompute_config.recompute", "True"])
    assert_same_training(one, two, steps=22)
    buckets = json.loads((two / "train_summary.json").read_text())["length_buckets"]
    assert len(buckets["micro_batches_per_bucket"]) >= 2  # several bucket shapes ran


def test_model_parallel_2_trains_packed_rows_as_one_process(tmp_path: Path, base: dict) -> None:
    """...and with the attention probabilities and FFN activations recomputed (select_recompute)."""
    _padded, packed = write_documents(tmp_path, groups=11)
    args = [
        "--train_dataset_dir",
        str(packed),
        "--batch_size",
        "1",
        "--train_dataset.data_loader.shuffle",
        "False",
    ]
    one = train_mp(tmp_path, base, "mp1", 1, 1, args)
    two = train_mp(tmp_path, base, "mp2", 2, 1, [*args, "--recompute_config.select_recompute", "True"])
    assert_same_training(one, two, steps=22)


def test_model_parallel_2_by_data_parallel_2_trains_as_one_process(tmp_path: Path, base: dict) -> None:
    """4 ranks: each data-parallel pair of tensor-parallel ranks reads half of every global batch."""
    data = write_records(tmp_path / "train.mindrecord", 44, patterns=44)
    args = ["--train_dataset_dir", str(data), "--runner_config.epochs", "2"]
    one = train_mp(tmp_path, base, "mp1", 1, 1, [*args, "--batch_size", "4"])
    four = train_mp(tmp_path, base, "mp2dp2", 2, 2, [*args, "--batch_size", "2"])
    assert_same_training(one, four, steps=22)


def test_a_tensor_parallel_rank_refuses_the_whole_checkpoint(base: dict) -> None:
    """Each rank reads only its own slices: given the complete checkpoint, it stops before reading."""
    from llama_core.config import TrainConfig, apply_overrides, load_config
    from llama_core.errors import ConfigError
    from llama_core.train.components import load_base

    cfg = apply_overrides(
        load_config(base["config"]),
        [("use_parallel", True), ("parallel_config.model_parallel", 2), ("parallel_config.data_parallel", 1),
         ("load_checkpoint", str(base["full"]))],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="model_parallel = 2 loads each rank's slices: shard it first"):
        load_base(None, TrainConfig.from_dict(cfg), rank=0)
