"""The trainer's own checkpoints (training state) with MindSpore: atomic writes, keep-max, resume.

Names and the newest-first order are `outputs`'. A checkpoint holds the weights (all, or only the
trainable ones when LoRA-only), the optimizer state (`adam_m.*`, `adam_v.*`, `global_step`) and the
counters `epoch_num`, `step_num`, `loss_scale` (the optimizer's `global_step` counts updates). Files
are written with a CRC and renamed into place, so a crash never leaves a half file under a final
name; a file that is truncated or corrupt anyway (copied badly, disk trouble) fails its CRC on
resume and the previous one is used.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms

from llama_core.atomic import atomic_path, clean_leftovers, disk_full, remove_path
from llama_core.errors import InputError
from llama_core.train.outputs import (
    checkpoint_path,
    find_rank_folders,
    list_checkpoints,
    newest_checkpoint,
    rank_dir,
)

logger = logging.getLogger("llama_core.train")

COUNTERS = ("epoch_num", "step_num", "global_step", "loss_scale")
# Parameters that are training machinery, not model or optimizer state.
TRANSIENT = ("accu_grads.", "learning_rate")


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
    """Write one checkpoint atomically, then delete the oldest beyond `keep_max`: only once the new one
    is complete, so a save that fails (a full disk) leaves every earlier checkpoint as it was."""
    final = checkpoint_path(output_dir, prefix, rank, counters.epoch, counters.step_in_epoch)
    clean_leftovers(final.parent, final.name)
    earlier = list_checkpoints(final.parent, prefix, rank)

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
    needs = earlier[-1].stat().st_size if earlier else None  # the last one's size: a full disk's message
    with disk_full("finetune", final, needs=needs), atomic_path(final) as tmp:
        # save_checkpoint appends ".ckpt" to names without it: write there, then move onto tmp.
        staging = Path(f"{tmp}.ckpt")
        try:
            ms.save_checkpoint(cell, str(staging), append_dict=append, choice_func=keep, crc_check=True)
            os.replace(staging, tmp)
        finally:  # and its own temporary file (`<name>.tmp`), which a failed save leaves behind
            remove_path(staging)
            remove_path(staging.with_suffix(".tmp"))
    for old in list_checkpoints(final.parent, prefix, rank)[:-keep_max]:
        remove_path(old)
        logger.info("removed old checkpoint %s (keep_checkpoint_max %d)", old.name, keep_max)
    return final


def load_newest(output_dir: str | Path, prefix: str, rank: int) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back whole, with its contents; None if there is none."""
    for path in reversed(list_checkpoints(rank_dir(output_dir, rank), prefix, rank)):
        if (params := _read_whole(path)) is not None:
            return path, params
    return None


def load_at_step(
    output_dir: str | Path, prefix: str, rank: int, global_step: int
) -> tuple[Path, dict[str, Any]] | None:
    """The readable checkpoint saved after `global_step` optimizer steps, with its contents."""
    for path in list_checkpoints(rank_dir(output_dir, rank), prefix, rank):
        params = _read_whole(path)
        if params is not None and counters_of(params).global_step == global_step:
            return path, params
    return None


def _read_whole(path: Path) -> dict[str, Any] | None:
    """A checkpoint's contents if its CRC holds and it has the counters; else None, with a warning."""
    try:
        params = ms.load_checkpoint(str(path), crc_check=True)
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError/protobuf errors alike
        logger.warning("skipping unreadable checkpoint %s: %s", path, str(exc).splitlines()[0][:200])
        return None
    missing = [k for k in COUNTERS if k not in params]
    if missing:
        logger.warning("skipping checkpoint %s: counters %s missing", path, missing)
        return None
    return params


def restore(cell: ms.nn.Cell, params: dict[str, Any]) -> Counters:
    """Load a checkpoint's model and optimizer state into the train-step cell; return its counters."""
    names = {p.name for p in cell.get_parameters()}
    state = {k: v for k, v in params.items() if k in names and not k.startswith(TRANSIENT)}
    ms.load_param_into_net(cell, state)
    return counters_of(params)


def counters_of(params: dict[str, Any]) -> Counters:
    """The counters a checkpoint was saved with."""

    def num(key: str) -> int:
        return int(params[key].asnumpy().reshape(-1)[0])

    return Counters(epoch=num("epoch_num"), step_in_epoch=num("step_num"), global_step=num("global_step"))


def base_checkpoint_file(path: str | Path, rank: int) -> Path:
    """A `--load_checkpoint` value as one file: the file itself, or the newest checkpoint of this
    rank's `rank_<i>/` sub-folder, or of the folder itself when it has none."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"load_checkpoint not found: {path}")
    return newest_checkpoint(find_rank_folders(path).get(rank, path))
