"""Training checkpoints: MindFormers names, atomic writes, keep-max, newest-complete resume.

Layout: `OUTPUT/checkpoint/rank_<i>/<prefix>_rank_<i>-<epoch>_<step>.ckpt` (epoch 1-based, step =
optimizer steps done in that epoch). A checkpoint holds the weights (all, or only the trainable ones
when LoRA-only), the optimizer state (`adam_m.*`, `adam_v.*`, `global_step`) and the counters
`epoch_num`, `step_num`, `loss_scale` (the optimizer's `global_step` counts updates). Files are
written with a CRC and renamed into place, so a crash never leaves a half file under a final name;
a file that is truncated or corrupt anyway (copied badly, disk trouble) fails its CRC on
resume and the previous one is used.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms

from llama_core.atomic import atomic_path, clean_leftovers, remove_path
from llama_core.errors import InputError

logger = logging.getLogger("llama_core.train")

COUNTERS = ("epoch_num", "step_num", "global_step", "loss_scale")
# Parameters that are training machinery, not model or optimizer state.
TRANSIENT = ("accu_grads.", "learning_rate")


def rank_dir(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / "checkpoint" / f"rank_{rank}"


def checkpoint_name(prefix: str, rank: int, epoch: int, step: int) -> str:
    return f"{prefix}_rank_{rank}-{epoch}_{step}.ckpt"


def _pattern(prefix: str, rank: int) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}_rank_{rank}-(\d+)_(\d+)\.ckpt$")


def list_checkpoints(folder: Path, prefix: str, rank: int) -> list[Path]:
    """Checkpoints of this prefix and rank, oldest first (by epoch, then step)."""
    if not folder.is_dir():
        return []
    pat = _pattern(prefix, rank)
    found = [(int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := pat.match(p.name))]
    return [p for _e, _s, p in sorted(found)]


@dataclass(frozen=True)
class Counters:
    """Where training stands: `epoch` 1-based, `step_in_epoch` and `global_step` in optimizer steps."""

    epoch: int
    step_in_epoch: int
    global_step: int


def save(
    cell: ms.nn.Cell,
    output_dir: str | Path,
    prefix: str,
    rank: int,
    counters: Counters,
    *,
    trainable_only: bool,
    trainable_names: set[str],
    keep_max: int,
    loss_scale: float = 1.0,
) -> Path:
    """Write one checkpoint atomically, then delete the oldest beyond `keep_max`."""
    folder = rank_dir(output_dir, rank)
    final = folder / checkpoint_name(prefix, rank, counters.epoch, counters.step_in_epoch)
    clean_leftovers(folder, final.name)

    def keep(name: str) -> bool:
        if name.startswith(TRANSIENT):
            return False
        if not trainable_only or name.startswith(("adam_m.", "adam_v.", "global_step")):
            return True
        return name in trainable_names

    append = {
        "epoch_num": counters.epoch,
        "step_num": counters.step_in_epoch,
        "loss_scale": float(loss_scale),
    }
    with atomic_path(final) as tmp:
        # save_checkpoint appends ".ckpt" to names without it: write there, then move onto tmp.
        staging = Path(f"{tmp}.ckpt")
        try:
            ms.save_checkpoint(cell, str(staging), append_dict=append, choice_func=keep, crc_check=True)
            os.replace(staging, tmp)
        finally:
            remove_path(staging)
    for old in list_checkpoints(folder, prefix, rank)[:-keep_max]:
        remove_path(old)
        logger.info("removed old checkpoint %s (keep_checkpoint_max %d)", old.name, keep_max)
    return final


def load_newest(output_dir: str | Path, prefix: str, rank: int) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back whole (CRC ok), with its contents; None if there is none.

    Unreadable ones are skipped with a warning naming them.
    """
    for path in reversed(list_checkpoints(rank_dir(output_dir, rank), prefix, rank)):
        try:
            params = ms.load_checkpoint(str(path), crc_check=True)
        except Exception as exc:  # MindSpore raises ValueError/RuntimeError/protobuf errors alike
            logger.warning("skipping unreadable checkpoint %s: %s", path, str(exc).splitlines()[0][:200])
            continue
        missing = [k for k in COUNTERS if k not in params]
        if missing:
            logger.warning("skipping checkpoint %s: counters %s missing", path, missing)
            continue
        return path, params
    return None


def counters_of(params: dict[str, Any]) -> Counters:
    def num(key: str) -> int:
        return int(params[key].asnumpy().reshape(-1)[0])

    return Counters(epoch=num("epoch_num"), step_in_epoch=num("step_num"), global_step=num("global_step"))


def base_checkpoint_file(path: str | Path, rank: int) -> Path:
    """A `--load_checkpoint` value as one file: the file itself, or this rank's file in a folder
    with `rank_<i>/` sub-folders (the newest .ckpt there), or the only .ckpt of a plain folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"load_checkpoint not found: {path}")
    sub = path / f"rank_{rank}"
    folder = sub if sub.is_dir() else path
    files = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise InputError(f"load_checkpoint: no .ckpt file in {folder}")
    if folder is path and len(files) > 1 and not (path / "rank_0").is_dir():
        raise InputError(f"load_checkpoint: {path} holds several .ckpt files; name one")
    return files[-1]
