"""Import a Hugging Face PEFT LoRA adapter into MindSpore LoRA names, to continue training it here.

`python -m llama_core.checkpoint.import_peft --adapter_dir ADAPTER --output_path OUT.ckpt
     [--base_checkpoint BASE.ckpt]`

`base_model.model.<hf linear>.lora_A.weight` / `lora_B.weight` become
`<ms linear>.mindpet_delta_lora_a` / `_lora_b` (docs/REFERENCE.md, parameter names). With BASE, OUT
holds the base weights followed by the LoRA weights (one file for `--load_checkpoint`); without, only the LoRA
weights. The matching `pet_config` (lora_rank, lora_alpha, lora_dropout, target_modules regex) is
returned and printed. Adapters this model cannot reproduce are refused: rsLoRA, DoRA, LoRA bias,
per-module rank/alpha patterns, modules_to_save, non-Llama-linear targets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import atomic_path, clean_leftovers, disk_full_stage
from llama_core.cache import StageKey, manifest_path_for, write_manifest
from llama_core.checkpoint.export_peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from llama_core.checkpoint.msckpt import CkptWriter
from llama_core.checkpoint.names import (
    OPTIMIZER_PREFIXES,
    is_training_scalar,
    lora_pairs,
    peft_to_ms_lora,
    split_lora_name,
)
from llama_core.checkpoint.safetensors_io import read_entry, scan_safetensors
from llama_core.checkpoint.sources import CheckpointSource
from llama_core.cli import exit_code
from llama_core.errors import ConfigError, InputError

log = logging.getLogger("llama_core.checkpoint.import_peft")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImportPeftResult:
    output_path: Path
    pet_config: dict[str, Any]  # for model.model_config.pet_config of the run config
    tensors: int
    cached: bool


def _check_adapter_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing") from None
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    refusals = {
        "peft_type": ("LORA", cfg.get("peft_type")),
        "use_rslora": (False, bool(cfg.get("use_rslora", False))),
        "use_dora": (False, bool(cfg.get("use_dora", False))),
        "bias": ("none", cfg.get("bias", "none")),
        "modules_to_save": (None, cfg.get("modules_to_save") or None),
        "rank_pattern": (None, cfg.get("rank_pattern") or None),
        "alpha_pattern": (None, cfg.get("alpha_pattern") or None),
        "fan_in_fan_out": (False, bool(cfg.get("fan_in_fan_out", False))),
    }
    for key, (want, got) in refusals.items():
        if got != want:
            raise ConfigError(f"{path}: {key} = {got!r} is not supported (MindSpore LoRA needs {want!r})")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ConfigError(f"{path}: {key!r} is missing")
    return cfg


@disk_full_stage("import_peft", "output_path")
def import_peft(
    adapter_dir: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    base_checkpoint: str | os.PathLike[str] | None = None,
) -> ImportPeftResult:
    """Convert a PEFT LoRA adapter folder to a MindSpore .ckpt (optionally with the base weights)."""
    adapter = Path(adapter_dir)
    out = Path(output_path)
    cfg = _check_adapter_config(adapter / ADAPTER_CONFIG)
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise InputError(f"{weights} is missing (only safetensors adapters are supported)")
    entries, _ = scan_safetensors(weights)
    renamed = {peft_to_ms_lora(e.name): e for e in entries}
    pairs = lora_pairs({n: e.shape for n, e in renamed.items()})
    r = int(cfg["r"])
    for a_name, _ in pairs.values():
        a = renamed[a_name]
        if a.shape[0] != r:
            raise InputError(f"{weights}: tensor {a.name!r} has rank {a.shape[0]}, adapter_config r={r}")
    linears = sorted({n.rsplit(".", 1)[-1] for n in pairs})
    pet_config = {
        "pet_type": "lora",
        "lora_rank": r,
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": float(cfg.get("lora_dropout", 0.0)),
        "target_modules": "|".join(f".*{name}" for name in linears),
    }
    manifest_path = manifest_path_for(out)
    base = CheckpointSource(base_checkpoint) if base_checkpoint is not None else None
    try:
        inputs = [adapter / ADAPTER_CONFIG, weights, *(base.files if base else [])]
        key = StageKey(
            manifest_path, "checkpoint.import_peft", FORMAT_VERSION, inputs, {"base": base is not None}
        )
        base_keep = []
        if base is not None:
            shapes = {m.name: m.shape for m in base.tensors}
            for linear, (a_name, b_name) in pairs.items():
                w = shapes.get(f"{linear}.weight")
                want = (renamed[b_name].shape[0], renamed[a_name].shape[1])
                if w != want:
                    raise InputError(
                        f"tensor {linear}.weight: base shape {w} does not fit the adapter's {list(want)}"
                    )
            base_keep = [
                m
                for m in base.tensors
                if not split_lora_name(m.name)
                and not m.name.startswith(OPTIMIZER_PREFIXES)
                and not is_training_scalar(m.name, int(np.prod(m.shape, dtype=np.int64)))
            ]
        total = len(base_keep) + len(renamed)
        if key.hit():
            log.info("cache hit: %s is already this import", out)
            return ImportPeftResult(out, pet_config, total, True)
        clean_leftovers(out.parent, out.name)
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            writer = CkptWriter(f)
            for meta in base_keep:
                writer.write(meta.name, base.read(meta), meta.dtype)  # type: ignore[union-attr]
            for name in sorted(renamed):
                e = renamed[name]
                writer.write(name, read_entry(e), e.dtype)
            writer.finish()
        write_manifest(
            manifest_path,
            stage="checkpoint.import_peft",
            key=key.value(),
            outputs=[out],
            extra={"adapter": str(adapter.resolve()), "pet_config": pet_config},
        )
    finally:
        if base is not None:
            base.close()
    log.info(
        "wrote %s: %d LoRA tensors (+%d base); pet_config %s", out, len(renamed), len(base_keep), pet_config
    )
    return ImportPeftResult(out, pet_config, total, False)


def build_parser(prog: str = "python -m llama_core.checkpoint.import_peft") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Import a Hugging Face PEFT LoRA adapter as MindSpore LoRA weights.",
    )
    p.add_argument(
        "--adapter_dir", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)"
    )
    p.add_argument("--output_path", required=True, help=".ckpt to write")
    p.add_argument(
        "--base_checkpoint", help="base .ckpt to include, giving one file to continue training from"
    )
    return p


def stage_from_args(args: argparse.Namespace) -> ImportPeftResult:
    """The import the parsed command line asks for."""
    return import_peft(args.adapter_dir, args.output_path, args.base_checkpoint)


def main(argv: Sequence[str] | None = None) -> int:
    res = stage_from_args(build_parser().parse_args(argv))
    print(
        json.dumps(
            {"output_path": str(res.output_path), "pet_config": res.pet_config, "tensors": res.tensors}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
