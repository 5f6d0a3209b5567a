"""Run configs: the 7B config carries the reference values, overrides and run_mindformer flags work,
parameter counts come out without building the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_core.config import TrainConfig, apply_overrides, load_config, parse_override_args
from llama_core.errors import ConfigError
from llama_core.run import main, param_counts, resolve_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEVEN_B = CONFIGS / "lora_llama2_7b.yaml"
TINY = CONFIGS / "lora_llama2_tiny.yaml"


def test_7b_config_has_reference_values() -> None:
    """Values of docs/REFERENCE.md (config values), read through the MindFormers key paths."""
    cfg = load_config(SEVEN_B)
    tc = TrainConfig.from_dict(cfg)
    assert (tc.seed, tc.output_dir, tc.run_mode) == (0, "./output", "finetune")
    assert (tc.epochs, tc.batch_size, tc.sink_size) == (2, 2, 2)
    assert cfg["optimizer"]["type"] == "FP32StateAdamWeightDecay"
    assert (tc.beta1, tc.beta2, tc.eps, tc.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert (tc.lr_schedule_type, tc.learning_rate, tc.warmup_ratio, tc.lr_end) == (
        "CosineWithWarmUpLR",
        1e-5,
        0.03,
        0.0,
    )
    assert (tc.use_clip_grad, tc.max_grad_norm, tc.scale_sense) == (True, 1.0, 1.0)
    assert cfg["train_dataset"]["data_loader"]["type"] == "MindDataset"
    assert tc.input_columns == ["input_ids", "labels"] and tc.train_shuffle and tc.train_drop_remainder
    assert (tc.data_parallel, tc.model_parallel, tc.pipeline_stage) == (8, 1, 1)
    assert cfg["parallel"]["enable_parallel_optimizer"] is True and cfg["parallel"]["full_batch"] is True
    assert tc.gradients_mean is False
    m = tc.model_config
    assert (m["seq_length"], m["hidden_size"], m["num_layers"], m["num_heads"], m["vocab_size"]) == (
        4096,
        4096,
        32,
        32,
        32000,
    )
    assert (m["multiple_of"], m["rms_norm_eps"], m["bos_token_id"], m["eos_token_id"], m["pad_token_id"]) == (
        256,
        1e-5,
        1,
        2,
        0,
    )
    assert m["ignore_token_id"] == -100 and m["compute_dtype"] == "bfloat16" and m["use_flash_attention"]
    assert (m["layernorm_compute_type"], m["softmax_compute_type"], m["param_init_type"]) == ("float32",) * 3
    assert tc.pet_config == {
        "pet_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ".*wq|.*wk|.*wv|.*wo",
    }
    assert (tc.ckpt_prefix, tc.save_checkpoint_steps, tc.keep_checkpoint_max) == ("llama_7b_lora", 100, 5)
    assert [c["type"] for c in cfg["callbacks"]][:2] == ["MFLossMonitor", "CheckpointMonitor"]
    assert (tc.mode, tc.device_target, tc.max_device_memory) == (0, "Ascend", "59GB")


def test_7b_parameter_counts_without_allocation() -> None:
    counts = param_counts(load_config(SEVEN_B))
    h, layers, vocab, ffn = 4096, 32, 32000, 11008
    # by hand: 4 attention + 3 FFN matrices and 2 norms per layer, embedding, lm_head, final norm
    base = layers * (4 * h * h + 3 * h * ffn + 2 * h) + 2 * vocab * h + h
    assert counts["base"] == base == 6_738_415_616
    assert counts["trainable"] == counts["lora"] == 32 * 4 * (16 * 4096 + 4096 * 16) == 16_777_216
    assert counts["total"] == base + 16_777_216


def test_print_params_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["--config", str(SEVEN_B), "--print_params", "--model.model_config.pet_config.lora_rank", "8"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["trainable"] == 16_777_216 // 2


def test_overrides_parse_yaml_scalars_and_reject_unknown_paths() -> None:
    cfg = load_config(TINY)
    pairs = parse_override_args(
        ["--lr_schedule.learning_rate", "1e-4", "--runner_config.sink_mode=True", "--callbacks.1.prefix", "x"]
    )
    assert pairs == [
        ("lr_schedule.learning_rate", 1e-4),
        ("runner_config.sink_mode", True),
        ("callbacks.1.prefix", "x"),
    ]
    out = apply_overrides(cfg, pairs)
    assert out["lr_schedule"]["learning_rate"] == 1e-4 and out["callbacks"][1]["prefix"] == "x"
    assert cfg["lr_schedule"]["learning_rate"] != 1e-4  # the input is not modified
    with pytest.raises(ConfigError, match=r"'lr_schedule\.learnin_rate'"):
        apply_overrides(cfg, [("lr_schedule.learnin_rate", 1.0)])
    with pytest.raises(ConfigError, match=r"'callbacks\.7'"):
        apply_overrides(cfg, [("callbacks.7.prefix", "y")])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_override_args(["--seed"])


def test_run_mindformer_flags_map_to_config_keys(tmp_path: Path) -> None:
    _, cfg = resolve_config(
        [
            "--config",
            str(TINY),
            "--run_mode",
            "train",
            "--train_dataset_dir",
            "/d/train",
            "--eval_dataset_dir",
            "/d/eval",
            "--load_checkpoint",
            "/c.ckpt",
            "--use_parallel",
            "True",
            "--resume_training",
            "true",
            "--output_dir",
            str(tmp_path),
            "--seed",
            "7",
            "--epochs",
            "3",
            "--batch_size",
            "5",
            "--gradient_accumulation_steps",
            "2",
            "--device_target",
            "Ascend",
            "--device_id",
            "3",
            "--mode",
            "1",
            "--do_eval",
            "True",
            "--runner_wrapper.max_grad_norm",
            "0.5",
        ]
    )
    tc = TrainConfig.from_dict(cfg)
    assert (tc.run_mode, tc.train_dataset_dir, tc.eval_dataset_dir, tc.load_checkpoint) == (
        "train",
        "/d/train",
        "/d/eval",
        "/c.ckpt",
    )
    assert tc.use_parallel and tc.resume_training and tc.do_eval
    assert (tc.output_dir, tc.seed, tc.epochs, tc.batch_size, tc.gradient_accumulation_steps) == (
        str(tmp_path),
        7,
        3,
        5,
        2,
    )
    assert (tc.device_target, tc.device_id, tc.mode, tc.max_grad_norm) == ("Ascend", 3, 1, 0.5)


@pytest.mark.parametrize("flag", ["--src_strategy_path_or_dir", "--auto_trans_ckpt", "--profile"])
def test_unsupported_flags_are_refused_with_a_reason(flag: str) -> None:
    with pytest.raises(ConfigError, match=f"{flag} is not supported"):
        resolve_config(["--config", str(TINY), flag, "True"])


def test_bad_values_name_their_key() -> None:
    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match=r"'runner_config\.batch_size'"):
        TrainConfig.from_dict(apply_overrides(cfg, [("runner_config.batch_size", 0)]))
    with pytest.raises(ConfigError, match=r"'optimizer\.eps' must be float"):
        TrainConfig.from_dict(apply_overrides(cfg, [("optimizer.eps", "tiny")]))
    with pytest.raises(ConfigError, match="pipeline parallelism is not implemented"):
        TrainConfig.from_dict(apply_overrides(cfg, [("parallel_config.pipeline_stage", 2)]))


def test_msruns_scheduler_of_a_non_parallel_run_does_not_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msrun runs the rank's command in its scheduler too; without init() to serve it must not train."""
    out = tmp_path / "run"
    argv = ["--config", str(TINY), "--run_mode", "finetune", "--use_parallel", "False"]
    argv += ["--output_dir", str(out), "--train_dataset_dir", str(tmp_path / "no_such_data")]
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    assert main(argv) == 0 and not out.exists()
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")  # the rank itself trains (and here finds no data)
    with pytest.raises(Exception, match="no_such_data"):
        main(argv)
