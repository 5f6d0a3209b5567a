"""HF <-> MindSpore checkpoint conversion for the Llama family (Llama 2/3.x, Qwen2/2.5, Qwen3; the
architecture comes from config.json), streaming one tensor at a time.

Forward (`convert_hf_to_ms`): an HF model folder (`config.json` + `model.safetensors`, or shards
with `model.safetensors.index.json`) -> one MindSpore `.ckpt` with the parameter names of
docs/REFERENCE.md, checked name by name and shape by shape against `config.json` before anything is written.
Reversed (`convert_ms_to_hf`): a complete MindSpore `.ckpt` -> an HF folder (safetensors shards
with index, `config.json`); HF -> MS -> HF gives back bit-identical tensors.

CLI: python -m llama_core.checkpoint.convert --model llama --input_path HF_DIR --output_path OUT.ckpt
     [--dtype fp32|bf16|fp16]   (add --reversed --config CONFIG for MindSpore -> HF)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llama_core.atomic import atomic_path, clean_leftovers, disk_full_stage, write_json_atomic
from llama_core.cache import StageKey, manifest_path_for, write_manifest
from llama_core.checkpoint.dtypes import CLI_DTYPES, FLOAT_TYPES, cast
from llama_core.checkpoint.msckpt import CkptWriter
from llama_core.checkpoint.names import (
    HF_DERIVED,
    OPTIMIZER_PREFIXES,
    check_shape,
    expected_ms_names,
    is_training_scalar,
    match_hf,
    match_ms,
    split_lora_name,
)
from llama_core.checkpoint.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    PlannedTensor,
    StEntry,
    hf_weight_files,
    read_entry,
    scan_hf_folder,
    write_safetensors,
)
from llama_core.checkpoint.sources import CheckpointSource
from llama_core.cli import exit_code
from llama_core.config import load_config
from llama_core.errors import ConfigError, InputError
from llama_core.model.config import LlamaConfig, LlamaDims
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


def plan_hf_import(input_path: Path, dims: LlamaDims) -> tuple[list[tuple[str, StEntry]], list[str]]:
    """Map every HF tensor to its MindSpore name in model order; fail on any misfit.

    Returns [(ms_name, entry)] and the HF names deliberately skipped (derived RoPE buffers, and the
    copy of the embedding some tied models also store as lm_head.weight).
    """
    by_ms: dict[str, StEntry] = {}
    skipped = []
    for entry in scan_hf_folder(input_path):
        if HF_DERIVED.fullmatch(entry.name):
            skipped.append(entry.name)
            continue
        if dims.tied and entry.name == "lm_head.weight":
            log.info("tie_word_embeddings: lm_head.weight is the embedding table; its stored copy is skipped")
            skipped.append(entry.name)
            continue
        m = match_hf(entry.name, dims)
        if m is None:
            raise InputError(
                f"{entry.path}: tensor {entry.name!r} is not a weight of this model: not a Llama-family "
                "name, or a part its config.json does not have (q/k/v bias: Qwen2; q/k norm: Qwen3)"
            )
        check_shape(entry.name, entry.shape, m, dims)
        if entry.dtype not in FLOAT_TYPES:
            raise InputError(f"{entry.path}: tensor {entry.name!r} has non-float type {entry.dtype}")
        by_ms[m.ms_name] = entry
    plan = []
    for name in expected_ms_names(dims):
        if by_ms.get(name) is None:
            raise InputError(f"{input_path}: tensor for {name!r} is missing from the HF checkpoint")
        plan.append((name, by_ms[name]))
    return plan, skipped


@disk_full_stage("convert", "output_path")
def convert_hf_to_ms(
    input_path: str | Path, output_path: str | Path, dtype: str = "fp32", crc: bool = False
) -> ConvertResult:
    """Convert an HF Llama folder to one MindSpore .ckpt at `output_path` (atomic, cached).

    `dtype` is the stored type: fp32, bf16 or fp16. `crc` appends MindSpore's CRC32 trailer.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    target = _target_dtype(dtype)
    hf_config = _read_json(input_path / "config.json")
    dims = LlamaConfig.from_hf_config(hf_config).dims
    plan, skipped = plan_hf_import(input_path, dims)

    manifest_path = manifest_path_for(output_path)
    inputs = [input_path / "config.json", *hf_weight_files(input_path)]
    key = StageKey(manifest_path, "checkpoint.convert", FORMAT_VERSION, inputs, {"dtype": target, "crc": crc})
    if key.hit():
        log.info("cache hit: %s is already the conversion of %s", output_path, input_path)
        return ConvertResult(output_path, manifest_path, len(plan), 0, True, skipped)
    clean_leftovers(output_path.parent, output_path.name)

    total = sum(e.nbytes for _, e in plan)
    progress = Progress(f"convert {input_path.name}", total=total, unit="bytes", logger=log)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(output_path))
        writer = CkptWriter(stack.enter_context(open(tmp, "wb")), crc=crc)
        inputs_fd = {}
        for ms_name, entry in plan:
            if entry.dtype == target:  # same type: copy the bytes file to file in the kernel
                if entry.path not in inputs_fd:
                    inputs_fd[entry.path] = stack.enter_context(open(entry.path, "rb")).fileno()
                writer.write_ranges(
                    ms_name, entry.shape, target, inputs_fd[entry.path], [(entry.offset, entry.nbytes)]
                )
            else:
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


_HF_TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
SHARD_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as transformers uses; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for unit in sorted(SHARD_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * SHARD_UNITS[unit])
    if t.isdigit():
        return int(t)
    raise ConfigError(f"max_shard_size {text!r}: expected e.g. 5GB, 500MB or a byte count")


def load_hf_config(config: str | os.PathLike[str] | Mapping[str, Any], torch_dtype: str) -> dict[str, Any]:
    """HF config.json content from an HF config.json path, a run-config YAML path or a run-config dict."""
    if isinstance(config, Mapping):
        return LlamaConfig.from_run_config(config).to_hf_config(torch_dtype)
    path = Path(config)
    if path.suffix == ".json":
        hf = _read_json(path)
        for key in ("dtype", "torch_dtype"):
            if key in hf:
                hf[key] = torch_dtype
        return hf
    return LlamaConfig.from_run_config(load_config(path)).to_hf_config(torch_dtype)


def _plan_shards(tensors: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


@disk_full_stage("convert", "output_path")
def convert_ms_to_hf(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: str | os.PathLike[str] | Mapping[str, Any],
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
) -> ConvertResult:
    """Convert a MindSpore Llama checkpoint (complete .ckpt or rank_<i>/ folder) to an HF folder.

    `config` gives the architecture (HF config.json, or a run config with model.model_config);
    `dtype` None keeps the stored type. Optimizer states and step counters are left out (listed in
    `skipped`); LoRA weights are refused (use merge_lora or export_peft).
    """
    out = Path(output_path)
    target = _target_dtype(dtype)
    manifest_path = out / "convert_manifest.json"
    with CheckpointSource(input_path) as src:
        by_name, skipped = _hf_weights(src)
        first = src.tensors[0].dtype if src.tensors else "F32"
        hf_config = load_hf_config(config, _HF_TORCH_DTYPE.get(target or first, "float32"))
        plan = _hf_plan(src, by_name, hf_config, target)
        if skipped:
            log.info("left out %d optimizer/step tensors (e.g. %s)", len(skipped), skipped[0])
        shards = _plan_shards([t for t, _ in plan], parse_size(max_shard_size))
        params = {"dtype": target, "config": hf_config, "max_shard_size": parse_size(max_shard_size)}
        key = StageKey(manifest_path, "checkpoint.convert_reversed", FORMAT_VERSION, src.files, params)
        if key.hit():
            log.info("cache hit: %s is already the HF form of %s", out, src.path)
            return ConvertResult(out, manifest_path, len(plan), 0, True, skipped)
        clean_leftovers(out.parent, out.name)
        meta_of = {t.name: meta for t, meta in plan}
        progress = Progress(f"convert {src.path.name}", sum(t.nbytes for t, _ in plan), "bytes", logger=log)

        def arrays(shard: list[PlannedTensor]) -> Iterator[np.ndarray]:
            for t in shard:
                meta = meta_of[t.name]
                yield cast(src.read(meta), meta.dtype, t.dtype)
                progress.update(t.nbytes)

        with atomic_path(out) as tmp:
            tmp.mkdir()
            written, outputs = _write_hf_folder(tmp, shards, arrays, hf_config)
            write_manifest(
                tmp / manifest_path.name,
                stage="checkpoint.convert_reversed",
                key=key.value(),
                outputs=outputs,
                extra={"source": str(src.path.resolve()), "skipped": skipped},
            )
        progress.close()
    log.info("wrote %s: %d tensors in %d file(s)", out, len(plan), len(shards))
    return ConvertResult(out, manifest_path, len(plan), written, False, skipped)


def _hf_weights(src: CheckpointSource) -> tuple[dict[str, Any], list[str]]:
    """The source's weights by name, and the optimizer/step tensors left out; LoRA is refused."""
    skipped, by_name = [], {}
    for meta in src.tensors:
        if split_lora_name(meta.name):
            raise InputError(
                f"tensor {meta.name!r} is a LoRA weight: merge it (merge_lora) or export it (export_peft)"
            )
        if meta.name.startswith(OPTIMIZER_PREFIXES) or is_training_scalar(
            meta.name, int(np.prod(meta.shape))
        ):
            skipped.append(meta.name)
            continue
        by_name[meta.name] = meta
    return by_name, skipped


def _hf_plan(
    src: CheckpointSource, by_name: dict[str, Any], hf_config: Mapping[str, Any], target: str | None
) -> list[tuple[PlannedTensor, Any]]:
    """Every Llama weight in HF order, checked by name, shape and type: (HF tensor, its source)."""
    dims = LlamaConfig.from_hf_config(hf_config, check_features=False).dims
    plan = []
    for name in expected_ms_names(dims):
        meta = by_name.pop(name, None)
        if meta is None:
            raise InputError(f"{src.path}: tensor {name!r} is missing (not a complete Llama checkpoint)")
        m = match_ms(name, dims)
        assert m is not None
        check_shape(name, meta.shape, m, dims)
        if meta.dtype not in FLOAT_TYPES:
            raise InputError(f"{src.path}: tensor {name!r} has non-float type {meta.dtype}")
        plan.append((PlannedTensor(m.hf_name, target or meta.dtype, meta.shape), meta))
    if by_name:
        raise InputError(f"{src.path}: tensor {next(iter(by_name))!r} is not a Llama weight (unknown name)")
    return plan


def _write_hf_folder(
    folder: Path,
    shards: list[list[PlannedTensor]],
    arrays: Callable[[list[PlannedTensor]], Iterator[np.ndarray]],
    hf_config: Mapping[str, Any],
) -> tuple[int, list[Path]]:
    """safetensors shards (+ index when several) and config.json: (bytes written, files)."""
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    written = 0
    for fname, shard in zip(names, shards, strict=True):
        written += write_safetensors(folder / fname, shard, arrays(shard), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {t.name: fname for fname, shard in zip(names, shards, strict=True) for t in shard}
        total = sum(t.nbytes for shard in shards for t in shard)
        write_json_atomic(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json_atomic(folder / "config.json", hf_config)
    return written, [folder / n for n in names] + [folder / "config.json"]


class _ConvertParser(argparse.ArgumentParser):
    """Refuses --reversed without --config as a usage error, like argparse's own."""

    def parse_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        if parsed.reversed and not parsed.config:
            self.error("--reversed needs --config (HF config.json or run-config YAML)")
        return parsed


def build_parser(prog: str = "python -m llama_core.checkpoint.convert") -> argparse.ArgumentParser:
    p = _ConvertParser(
        prog=prog,
        description="Convert a Llama checkpoint between HF safetensors and MindSpore .ckpt.",
    )
    p.add_argument(
        "--model",
        default="llama",
        choices=["llama", "qwen2", "qwen3"],
        help="accepted for MindFormers' command line; the architecture comes from config.json",
    )
    p.add_argument("--input_path", required=True, help="HF model folder (or .ckpt with --reversed)")
    p.add_argument("--output_path", required=True, help="output .ckpt (or HF folder with --reversed)")
    p.add_argument("--dtype", choices=sorted(CLI_DTYPES), default=None, help="stored type (default fp32)")
    p.add_argument("--crc", action="store_true", help="append MindSpore's CRC32 trailer to the .ckpt")
    p.add_argument(
        "--reversed", action="store_true", help="MindSpore .ckpt (or rank_<i>/ folder) -> HF folder"
    )
    p.add_argument(
        "--config", help="with --reversed: HF config.json or run-config YAML giving the architecture"
    )
    p.add_argument("--max_shard_size", default="5GB", help="with --reversed: safetensors shard size (5GB)")
    return p


def stage_from_args(args: argparse.Namespace) -> ConvertResult:
    """The conversion the parsed command line asks for."""
    if args.reversed:
        return convert_ms_to_hf(
            args.input_path, args.output_path, args.config, args.dtype, args.max_shard_size
        )
    return convert_hf_to_ms(args.input_path, args.output_path, dtype=args.dtype or "fp32", crc=args.crc)


def main(argv: Sequence[str] | None = None) -> int:
    res = stage_from_args(build_parser().parse_args(argv))
    print(json.dumps({"output_path": str(res.output_path), "tensors": res.tensors, "cached": res.cached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
