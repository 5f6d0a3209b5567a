"""`python -m llama_core.run --config CFG --run_mode {finetune,train,eval,predict} ...`

The flags of MindFormers' run_mindformer.py; any other `--a.b.c value` sets that config key (value
parsed as YAML; an unknown key path is an error). `--print_params` prints the model's parameter
counts computed from the config, without building the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from llama_core.cli import exit_code
from llama_core.config import TrainConfig, apply_overrides, load_config, parse_override_args, set_key
from llama_core.errors import ConfigError

logger = logging.getLogger("llama_core.run")

UNSUPPORTED = {
    "src_strategy_path_or_dir": "strategy files only matter for model/pipeline parallel layouts "
    "(llama_core runs data parallel)",
    "auto_trans_ckpt": "not needed for data parallel (each rank holds whole weights)",
    "profile": "profiling is not implemented; use MindSpore's profiler on the device directly",
}


def str2bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_core.run",
        description="Train, fine-tune, evaluate or generate with a Llama (+LoRA) config. Other --a.b.c VALUE "
        "arguments override that config key.",
    )
    p.add_argument("--config", required=True, help="YAML run config (MindFormers structure)")
    p.add_argument("--run_mode", choices=["train", "finetune", "eval", "predict"], help="overrides run_mode")
    p.add_argument(
        "--train_dataset_dir", help="MindRecord file or folder (train_dataset.data_loader.dataset_dir)"
    )
    p.add_argument(
        "--eval_dataset_dir", help="MindRecord file or folder (eval_dataset.data_loader.dataset_dir)"
    )
    p.add_argument("--load_checkpoint", help=".ckpt file, or folder with rank_<i>/ sub-folders")
    p.add_argument("--use_parallel", type=str2bool, help="True under msrun: data parallel over all ranks")
    p.add_argument("--resume_training", type=str2bool, help="continue from the newest complete checkpoint")
    p.add_argument("--output_dir", help="where checkpoints and the summary go")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int, help="runner_config.epochs")
    p.add_argument("--batch_size", type=int, help="runner_config.batch_size (per device)")
    p.add_argument(
        "--gradient_accumulation_steps", type=int, help="runner_config.gradient_accumulation_steps"
    )
    p.add_argument("--device_target", choices=["CPU", "Ascend", "GPU"], help="context.device_target")
    p.add_argument("--device_id", type=int, help="context.device_id")
    p.add_argument("--mode", type=int, choices=[0, 1], help="context.mode: 0 graph, 1 PyNative (debugging)")
    p.add_argument("--do_eval", type=str2bool, help="evaluate every eval_step_interval steps and at the end")
    p.add_argument("--predict_data", nargs="+", help="prompt(s) for run_mode predict")
    p.add_argument("--tokenizer", help="sentencepiece model for predict (processor.tokenizer.vocab_file)")
    p.add_argument(
        "--max_new_tokens", type=int, help="predict: tokens to generate (model_config.max_decode_length)"
    )
    p.add_argument(
        "--print_params", action="store_true", help="print parameter counts and exit (no allocation)"
    )
    for name in UNSUPPORTED:
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    return p


# CLI flag -> config key path it sets.
FLAG_KEYS = {
    "run_mode": "run_mode",
    "train_dataset_dir": "train_dataset.data_loader.dataset_dir",
    "eval_dataset_dir": "eval_dataset.data_loader.dataset_dir",
    "load_checkpoint": "load_checkpoint",
    "use_parallel": "use_parallel",
    "resume_training": "resume_training",
    "output_dir": "output_dir",
    "seed": "seed",
    "epochs": "runner_config.epochs",
    "batch_size": "runner_config.batch_size",
    "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "device_target": "context.device_target",
    "device_id": "context.device_id",
    "mode": "context.mode",
    "do_eval": "do_eval",
    "tokenizer": "processor.tokenizer.vocab_file",
    "max_new_tokens": "model.model_config.max_decode_length",
}


def resolve_config(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse the command line into (flags, the config dict with flags and overrides applied)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    for name, why in UNSUPPORTED.items():
        value = getattr(args, name)
        if value not in (None, "", "False", "false"):
            raise ConfigError(f"--{name} is not supported by llama_core.run: {why}")
    cfg = apply_overrides(load_config(args.config), parse_override_args(rest))
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            set_key(cfg, key, value)
    return args, cfg


def param_counts(cfg: dict[str, Any]) -> dict[str, int]:
    """Total and trainable parameter counts of the config's model, computed without allocating."""
    from llama_core.model import LlamaConfig, LoraConfig, lora_num_parameters

    tc = TrainConfig.from_dict(cfg)
    model_cfg = LlamaConfig.from_dict({k: v for k, v in tc.model_config.items() if k != "pet_config"})
    base = model_cfg.num_parameters()
    if tc.pet_config:
        lora = lora_num_parameters(model_cfg, LoraConfig.from_pet_config(tc.pet_config))
        return {"base": base, "lora": lora, "total": base + lora, "trainable": lora}
    return {"base": base, "lora": 0, "total": base, "trainable": base}


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = resolve_config(argv)
    if args.print_params:
        counts = param_counts(cfg)
        print(json.dumps(counts))
        logger.info(
            "parameters: total %s (base %s), trainable %s",
            f"{counts['total']:,}",
            f"{counts['base']:,}",
            f"{counts['trainable']:,}",
        )
        return 0
    tc = TrainConfig.from_dict(cfg)
    if not tc.use_parallel and os.environ.get("MS_ROLE") == "MS_SCHED":
        # msrun runs this command in its scheduler too, which only serves the ranks' init(); a
        # non-parallel rank never calls init(), so left alone the scheduler would train as well,
        # into the same run folder as the rank
        logger.info("msrun scheduler of a non-parallel run: nothing to schedule")
        return 0
    if tc.run_mode in ("train", "finetune"):
        from llama_core.train.trainer import train

        train(tc)
        return 0
    if tc.run_mode == "eval":
        from llama_core.train.predict import evaluate_checkpoint

        evaluate_checkpoint(tc)
        return 0
    if tc.run_mode == "predict":
        from llama_core.train.predict import predict_prompts

        if not args.predict_data:
            raise ConfigError("run_mode predict needs --predict_data PROMPT [PROMPT ...]")
        for prompt, text in predict_prompts(tc, args.predict_data):
            print(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False))
        return 0
    raise ConfigError(f"run_mode must be train, finetune, eval or predict, got {tc.run_mode!r}")


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
