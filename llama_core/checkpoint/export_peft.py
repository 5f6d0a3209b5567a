"""Export MindSpore LoRA weights as a Hugging Face PEFT adapter folder.

`python -m llama_core.checkpoint.export_peft --load_checkpoint CKPT --output_dir ADAPTER
     --base_model NAME (--config CFG | --lora_alpha A [--lora_dropout P])`

ADAPTER gets `adapter_model.safetensors` (PEFT names: `base_model.model.<hf linear>.lora_A.weight`
[r, in] and `lora_B.weight` [out, r]) and `adapter_config.json` (peft_type LORA, task_type
CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules such as q_proj/k_proj/v_proj/o_proj,
base_model_name_or_path). `peft.PeftModel.from_pretrained(hf_base, ADAPTER)` then computes what
the MindSpore LoRA model computes. CKPT may be a LoRA-only or a full training checkpoint (other
tensors are ignored), a .ckpt or a rank_<i>/ folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_core.atomic import atomic_path, clean_leftovers, disk_full_stage, write_json_atomic
from llama_core.cache import StageKey, write_manifest
from llama_core.checkpoint.lora_args import lora_alpha, pet_config
from llama_core.checkpoint.names import lora_pairs, ms_lora_to_peft
from llama_core.checkpoint.safetensors_io import PlannedTensor, write_safetensors
from llama_core.checkpoint.sources import CheckpointSource
from llama_core.cli import exit_code
from llama_core.errors import InputError

log = logging.getLogger("llama_core.checkpoint.export_peft")

FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ExportPeftResult:
    output_dir: Path
    rank: int
    target_modules: list[str]
    tensors: int
    cached: bool


@disk_full_stage("export_peft", "output_dir")
def export_peft(
    load_checkpoint: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    base_model: str,
    alpha: float | None = None,
    dropout: float | None = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> ExportPeftResult:
    """Write the LoRA weights of `load_checkpoint` as a PEFT adapter folder (atomic, cached).

    alpha and dropout default to the run config's pet_config (dropout 0.0 without either).
    """
    out = Path(output_dir)
    alpha_value = lora_alpha(alpha, config)
    dropout_value = float(dropout if dropout is not None else pet_config(config).get("lora_dropout", 0.0))
    with CheckpointSource(load_checkpoint) as src:
        metas = {m.name: m for m in src.tensors}
        pairs = lora_pairs({n: m.shape for n, m in metas.items()})
        if not pairs:
            raise InputError(f"{src.path}: no LoRA weights (mindpet_delta_lora_a/b) found")
        ranks = {metas[a].shape[0] for a, _ in pairs.values()}
        if len(ranks) != 1:
            raise InputError(
                f"{src.path}: LoRA weights have different ranks {sorted(ranks)}; PEFT needs one r"
            )
        rank = ranks.pop()
        plan, sources = [], []
        for linear in sorted(pairs):
            for name in pairs[linear]:
                meta = metas[name]
                plan.append(PlannedTensor(ms_lora_to_peft(name), meta.dtype, meta.shape))
                sources.append(meta)
        targets = sorted({p.name.split(".")[-3] for p in plan})
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": alpha_value,
            "lora_dropout": dropout_value,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }
        manifest_path = out / "export_manifest.json"
        key = StageKey(manifest_path, "checkpoint.export_peft", FORMAT_VERSION, src.files, adapter_config)
        if key.hit():
            log.info("cache hit: %s is already this adapter", out)
            return ExportPeftResult(out, rank, targets, len(plan), True)
        clean_leftovers(out.parent, out.name)
        with atomic_path(out) as tmp:
            tmp.mkdir()
            write_safetensors(
                tmp / ADAPTER_WEIGHTS, plan, (src.read(m) for m in sources), metadata={"format": "pt"}
            )
            write_json_atomic(tmp / ADAPTER_CONFIG, adapter_config)
            write_manifest(
                tmp / manifest_path.name,
                stage="checkpoint.export_peft",
                key=key.value(),
                outputs=[tmp / ADAPTER_WEIGHTS, tmp / ADAPTER_CONFIG],
                extra={"source": str(src.path.resolve())},
            )
    log.info("wrote PEFT adapter %s: r=%d, %d tensors, target_modules %s", out, rank, len(plan), targets)
    return ExportPeftResult(out, rank, targets, len(plan), False)


def build_parser(prog: str = "python -m llama_core.checkpoint.export_peft") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export MindSpore LoRA weights as a Hugging Face PEFT adapter folder.",
    )
    p.add_argument(
        "--load_checkpoint", required=True, help=".ckpt or rank_<i>/ folder holding the LoRA weights"
    )
    p.add_argument("--output_dir", required=True, help="adapter folder to create")
    p.add_argument("--base_model", required=True, help="base_model_name_or_path for adapter_config.json")
    p.add_argument("--config", help="run config YAML (pet_config.lora_alpha, lora_dropout)")
    p.add_argument("--lora_alpha", type=float, help="LoRA alpha (overrides the config)")
    p.add_argument("--lora_dropout", type=float, help="LoRA dropout (overrides the config)")
    return p


def stage_from_args(args: argparse.Namespace) -> ExportPeftResult:
    """The export the parsed command line asks for."""
    return export_peft(
        args.load_checkpoint,
        args.output_dir,
        args.base_model,
        args.lora_alpha,
        args.lora_dropout,
        args.config,
    )


def main(argv: Sequence[str] | None = None) -> int:
    res = stage_from_args(build_parser().parse_args(argv))
    print(
        json.dumps({"output_dir": str(res.output_dir), "r": res.rank, "target_modules": res.target_modules})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
