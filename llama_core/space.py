"""Will the run fit on its disk? What a fine-tune writes under its work folder, term by term.

`check_free_space` is validate's check before any work: a run that cannot fit is refused at once,
naming the shortfall, instead of failing hours later on a full disk. Sizes come from what is known
without the network: local sources' sizes, the model's parameter count (from the config) at its dtype,
the records of an Alpaca file already on disk. What the work folder already holds complete (a cached
download, MindRecord, converted or sharded checkpoint) is not counted; it is looked for where the DAG
(operators/pipeline.py) puts it: downloads/<source>/, data/alpaca-<sha>/seq<N>/, checkpoint/llama2.ckpt,
checkpoint/transformed/. The terms:

- downloads: each source's size (local: its files; an interrupted download: what it still lacks;
  remote and not fetched yet: the weights estimated from the parameter count, the others unknown);
- conversations and MindRecord: the Alpaca file plus the prompt template per record, and two int32
  columns of seq_length + 1 per record (an upper bound: MindRecord stores small ints compactly, and
  packing fills fewer rows);
- the converted checkpoint (an HF source, fp32 as import_checkpoint writes it) and the shards (none
  when model_parallel and pipeline_stage are 1: the rank files are hard links);
- checkpoints: each rank's saved state x (keep_checkpoint_max + 1), since a new checkpoint is complete
  before the oldest is deleted;
- exports: the adapter, and the merged .ckpt with its HF copy when asked; a margin for logs and reports.

`python -m llama_core.space --params run.json` prints the estimate for a JSON file of pipeline params.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llama_core.atomic import free_bytes
from llama_core.cache import Manifest, cached, file_sha256, manifest_path_for, read_manifest
from llama_core.checkpoint.layout import MANIFEST_NAME
from llama_core.cli import exit_code
from llama_core.config import TrainConfig, apply_overrides, layout_from_config, load_config
from llama_core.errors import ConfigError
from llama_core.fetch.source import Source, parse_source
from llama_core.model.config import LlamaConfig
from llama_core.plan import DTYPE_BYTES, memory_plan
from llama_core.progress import human_bytes
from llama_core.results import print_result

SOURCES = ("alpaca", "tokenizer", "weights")
LOGS_AND_REPORTS = 16 << 20  # rank logs, evaluation.json, report.md and .json, loss_curve.png
CONVERTED_DTYPE_BYTES = 4  # import_checkpoint writes an HF source as fp32
MAX_COUNTED_JSON = 64 << 20  # a larger Alpaca file is not parsed (validate stays fast): MindRecord unknown
# a conversation record's prompt template and keys beyond its Alpaca text (295 bytes in the demo's)
CONVERSATION_BYTES_PER_RECORD = 320


@dataclasses.dataclass
class SpaceEstimate:
    """Bytes a run will write under `work_dir`, by term (cached terms left out), and its free space."""

    work_dir: str
    free_bytes: int | None
    terms: dict[str, int] = dataclasses.field(default_factory=dict)
    # left out of the terms: complete in the work folder already, or not sizable before the fetch
    cached: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)
    hints: list[str] = dataclasses.field(default_factory=list)  # settings that would need less

    @property
    def needed_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def shortfall_bytes(self) -> int:
        """What the free space lacks (0 when it fits, or when the free space is unknown)."""
        return 0 if self.free_bytes is None else max(0, self.needed_bytes - self.free_bytes)

    @property
    def fits(self) -> bool:
        return self.shortfall_bytes == 0

    def to_dict(self) -> dict[str, Any]:
        """The estimate as JSON values, with the total and the one-line summary."""
        return {**dataclasses.asdict(self), "needed_bytes": self.needed_bytes, "summary": self.describe()}

    def describe(self) -> str:
        """'work_dir /x has 12.0 MiB free; this run needs about 1.4 GiB: weights download 1.2 GiB, ...'"""
        free = "unknown free space" if self.free_bytes is None else f"{human_bytes(self.free_bytes)} free"
        terms = sorted(((n, b) for n, b in self.terms.items() if b), key=lambda term: -term[1])
        text = f"work_dir {self.work_dir} has {free}; this run needs about {human_bytes(self.needed_bytes)}: "
        text += ", ".join(f"{name} {human_bytes(n)}" for name, n in terms)
        if self.cached:
            text += f" (already there: {', '.join(self.cached)})"
        if self.unknown:
            text += f" (not counted, unknown before the fetch: {', '.join(self.unknown)})"
        return "; ".join([text, *self.hints])


def _complete(manifest_path: Path) -> Manifest | None:
    """A stage's manifest if it is there and every output it lists has its recorded size."""
    manifest = read_manifest(manifest_path)
    return None if manifest is None else cached(manifest_path, manifest.key)


def _download(est: SpaceEstimate, work: Path, name: str, src: Source, guess: int | None) -> Path | None:
    """Count source `name`'s download: a local source's size, what an interrupted download still lacks
    (its recorded Content-Length), else `guess` or unknown; return the file its content is in on this
    machine, if it is."""
    store = work / "downloads" / name
    manifest = _complete(store / f".{src.name}.fetch.json")
    if manifest is not None and manifest.extra.get("source") == src.redacted:
        est.cached.append(f"{name} download")
        return store / src.name
    if src.scheme == "file" and src.path is not None:
        path = Path(src.path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        est.terms[f"{name} download"] = sum(p.stat().st_size for p in files)
        return path
    partial = store / f".{src.name}.part"  # fetch.core's resumable download and its record
    try:
        size = json.loads(Path(f"{partial}.json").read_text())["size"]
        est.terms[f"{name} download"] = max(0, int(size) - partial.stat().st_size)
        return None
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no interrupted download, or one whose size the store did not say
    if guess is None:
        est.unknown.append(f"{name} download")
    else:
        est.terms[f"{name} download (estimated)"] = guess
    return None


def _alpaca_records(path: Path | None) -> int | None:
    """Records of an Alpaca file on disk (a JSON list, or JSON Lines); None when it cannot be told."""
    if path is None or not path.is_file() or path.stat().st_size > MAX_COUNTED_JSON:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return sum(1 for line in text.splitlines() if line.strip())
    return len(doc) if isinstance(doc, list) else None


def _data(est: SpaceEstimate, work: Path, alpaca: Path | None, seq: int, layout: str, holdout: float) -> None:
    """Count the conversations JSON and the MindRecord (named as the DAG names them), unless cached."""
    records = _alpaca_records(alpaca)
    if alpaca is None or records is None:
        est.unknown.append("MindRecord")
        return
    folder = work / "data" / f"alpaca-{file_sha256(alpaca)[:16]}"
    name = "alpaca" + ("-packed" if layout == "packed" else "") + (f"-holdout{holdout:g}" if holdout else "")
    if _complete(folder / f"seq{seq}" / f"{name}.mindrecord.report.json"):
        est.cached.append("MindRecord")
        return
    if not _complete(manifest_path_for(folder / "alpaca-conversation.json")):
        est.terms["conversations"] = alpaca.stat().st_size + records * CONVERSATION_BYTES_PER_RECORD
    est.terms["MindRecord"] = records * 2 * (seq + 1) * 4  # input_ids and labels, int32


def _checkpoints(
    est: SpaceEstimate, work: Path, cfg: Mapping[str, Any], weights: Path | None, is_ckpt: bool, merged: bool
) -> None:
    """Count the converted base checkpoint, the shards, the training checkpoints and the exports."""
    model = LlamaConfig.from_run_config(cfg)
    layout, tc = layout_from_config(cfg), TrainConfig.from_dict(cfg)
    base = model.num_parameters() * (DTYPE_BYTES[model.param_init_type] if is_ckpt else CONVERTED_DTYPE_BYTES)
    if is_ckpt and weights is not None and weights.is_file():
        base = weights.stat().st_size
    if not is_ckpt:
        if _complete(manifest_path_for(work / "checkpoint" / "llama2.ckpt")):
            est.cached.append("converted checkpoint")
        else:
            est.terms["converted checkpoint"] = base
    if layout.mp > 1 or layout.pp > 1:
        if _complete(work / "checkpoint" / "transformed" / MANIFEST_NAME):
            est.cached.append("shards")
        else:
            est.terms["shards"] = base
    terms = memory_plan(cfg, "CPU").terms  # per rank, at param_init_type
    lora = terms["trainable_parameters"].bytes
    per_rank = lora + terms["optimizer_state"].bytes
    saved = layout.world_size * (tc.keep_checkpoint_max + 1)  # every rank saves its own
    if not (tc.save_trainable_params and tc.pet_config):
        if tc.pet_config:
            lora_only = human_bytes(per_rank * saved)
            est.hints.append(
                f"CheckpointMonitor's save_trainable_params: True would save {lora_only} of checkpoints "
                "(LoRA and optimizer state, not the frozen base weights)"
            )
        per_rank += terms["base_weights"].bytes
    est.terms["checkpoints"] = per_rank * saved
    # the adapter; under model_parallel the final checkpoint is first made whole, once
    est.terms["adapter export"] = lora * layout.mp + (per_rank * layout.mp if layout.mp > 1 else 0)
    if merged:
        est.terms["merged export"] = 2 * base  # the merged .ckpt and its HF safetensors copy
    est.terms["logs and reports"] = LOGS_AND_REPORTS


def estimate_space(
    work_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any],
    sources: Mapping[str, str],
    *,
    layout: str = "buckets",
    holdout_fraction: float = 0.0,
    export_merged: bool = False,
) -> SpaceEstimate:
    """What a run of `cfg` (overrides and seq_length applied) on `sources` ({"alpaca": url, "tokenizer":
    url, "weights": url}) will write under `work_dir`, and the free space there. No network."""
    work = Path(work_dir)
    est = SpaceEstimate(str(work), free_bytes(work))
    model = LlamaConfig.from_run_config(cfg)
    parsed = {name: parse_source(sources[name]) for name in SOURCES}
    is_ckpt = parsed["weights"].name.endswith(".ckpt")
    guess = model.num_parameters() * DTYPE_BYTES[model.param_init_type]
    found = {
        name: _download(est, work, name, src, guess if name == "weights" else None)
        for name, src in parsed.items()
    }
    _data(est, work, found["alpaca"], model.seq_length, layout, holdout_fraction)
    _checkpoints(est, work, cfg, found["weights"], is_ckpt, export_merged)
    return est


def check_free_space(
    work_dir: str | os.PathLike[str], params: Mapping[str, Any], cfg: Mapping[str, Any]
) -> SpaceEstimate:
    """The estimate for pipeline `params` (sources, layout, holdout_fraction, export_merged) and the run
    config `cfg`; ConfigError naming param 'work_dir' when its disk has less free space than that."""
    est = estimate_space(
        work_dir,
        cfg,
        {name: params[f"{name}_url"] for name in SOURCES},
        layout=str(params.get("layout") or "buckets"),
        holdout_fraction=float(params.get("holdout_fraction") or 0.0),
        export_merged=str(params.get("export_merged")).lower() in ("true", "1"),
    )
    if not est.fits:
        raise ConfigError(
            f"param 'work_dir': {est.describe()}; free {human_bytes(est.shortfall_bytes)} there or choose "
            "another work_dir"
        )
    return est


def build_parser(prog: str = "python -m llama_core.space") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="JSON file of the pipeline's params (work_dir, ...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = json.loads(Path(args.params).read_text())
        cfg = apply_overrides(load_config(params["config"]), (params.get("overrides") or {}).items())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--params {args.params}: cannot read params with a config: {exc}") from exc
    seq = params.get("seq_length")
    if seq:
        cfg = apply_overrides(cfg, [("model.model_config.seq_length", int(seq))])
    est = check_free_space(params["work_dir"], params, cfg)
    print_result(est)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))
