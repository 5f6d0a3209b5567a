"""Where a training run writes, and which of its checkpoints is the newest.

  OUTPUT/train_summary.json                                         rank 0, at the end
  OUTPUT/checkpoint/parallel.json                                   rank 0, tensor parallel runs:
                                                                    the layout and model the rank
                                                                    checkpoints are slices of
  OUTPUT/checkpoint/rank_<i>/<prefix>_rank_<i>-<epoch>_<step>.ckpt   epoch 1-based, step = optimizer
                                                                    steps done in that epoch

MindFormers names its checkpoints the same way. No MindSpore import here: the Airflow operator
and the checkpoint tools read this layout without loading the framework.

The newest checkpoint is the one with the greatest (epoch, step) in its name, never the newest
modification time: names survive copies and restores that reset times, and keep-max and resume
order by them too. A folder whose only .ckpt has another name (a converted or sharded checkpoint)
stands for that file; several files not all named so are refused rather than guessed between. A
checkpoint is complete once it has its final name (the trainer writes under a hidden temporary
name and renames); one damaged later is the trainer's to skip on resume, with a warning, as only
reading it back (CRC) tells.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llama_core.errors import InputError

logger = logging.getLogger("llama_core.train")

SUMMARY_NAME = "train_summary.json"
CHECKPOINT_DIR = "checkpoint"
TRAINED_LAYOUT_NAME = "parallel.json"
TRAINED_LAYOUT_FORMAT = "llama_core.trained/1"

_RANK_FOLDER = re.compile(r"rank_(\d+)\Z")
# Hidden names are temporary files of a write still under way (or of a dead one), never checkpoints.
_CHECKPOINT = re.compile(r"(?P<prefix>[^.].*)_rank_(?P<rank>\d+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt\Z")


@dataclass(frozen=True, order=True)
class CheckpointName:
    """A checkpoint file name's parts; instances order from oldest to newest."""

    epoch: int
    step: int
    prefix: str
    rank: int

    @classmethod
    def parse(cls, name: str) -> CheckpointName | None:
        """The parts of `<prefix>_rank_<i>-<epoch>_<step>.ckpt`, or None for any other name."""
        m = _CHECKPOINT.match(name)
        if not m:
            return None
        return cls(epoch=int(m["epoch"]), step=int(m["step"]), prefix=m["prefix"], rank=int(m["rank"]))

    def __str__(self) -> str:
        return f"{self.prefix}_rank_{self.rank}-{self.epoch}_{self.step}.ckpt"


def read_trained_layout(folder: str | Path) -> dict | None:
    """The layout file a tensor-parallel run writes beside its rank folders (`checkpoint/`), or None."""
    try:
        doc = json.loads((Path(folder) / TRAINED_LAYOUT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == TRAINED_LAYOUT_FORMAT else None


def rank_dir(output_dir: str | Path, rank: int) -> Path:
    """The folder of one rank's checkpoints in a run's output folder."""
    return Path(output_dir) / CHECKPOINT_DIR / f"rank_{rank}"


def checkpoint_path(output_dir: str | Path, prefix: str, rank: int, epoch: int, step: int) -> Path:
    """Where the trainer saves rank `rank`'s checkpoint after `step` steps of `epoch`."""
    return rank_dir(output_dir, rank) / str(CheckpointName(epoch=epoch, step=step, prefix=prefix, rank=rank))


def list_checkpoints(folder: str | Path, prefix: str | None = None, rank: int | None = None) -> list[Path]:
    """The checkpoints in `folder` (of this prefix and rank when given), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        name = CheckpointName.parse(path.name)
        if name and prefix in (None, name.prefix) and rank in (None, name.rank):
            found.append((name, path))
    return [path for _name, path in sorted(found)]


def newest_checkpoint(folder: str | Path) -> Path:
    """The checkpoint a rank folder stands for: its only .ckpt file, or the newest among several."""
    folder = Path(folder)
    files = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")]
    if not files:
        raise InputError(f"{folder}: no .ckpt file")
    if len(files) == 1:
        return files[0]
    named = list_checkpoints(folder)
    if len(named) < len(files):
        raise InputError(
            f"{folder} holds several .ckpt files, not all named <prefix>_rank_<i>-<epoch>_<step>.ckpt, "
            f"so none is known to be the newest: keep or name one"
        )
    logger.info("%s holds %d checkpoints: using the newest, %s", folder, len(named), named[-1].name)
    return named[-1]


def find_rank_folders(folder: str | Path) -> dict[int, Path]:
    """{i: folder/rank_<i>} for the rank folders present in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {int(m[1]): p for p in folder.iterdir() if p.is_dir() and (m := _RANK_FOLDER.match(p.name))}


def has_checkpoint(output_dir: str | Path) -> bool:
    """Whether a run's output folder holds a checkpoint of any rank to resume from."""
    ranks = find_rank_folders(Path(output_dir) / CHECKPOINT_DIR).values()
    return any(list_checkpoints(folder) for folder in ranks)


def checkpoint_file(path: str | os.PathLike[str], what: str) -> Path:
    """A checkpoint argument as one file: a .ckpt as is; a folder with rank_<i>/ (a run's
    `checkpoint/`) or a run's output folder: rank 0's newest (data parallel: every rank holds the
    same weights), which is a run's final checkpoint; any other folder: its newest
    (`train_state.base_checkpoint_file` for rank 0, without importing MindSpore)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"{what} not found: {path}")
    ranks = find_rank_folders(path) or find_rank_folders(path / CHECKPOINT_DIR)
    return newest_checkpoint(ranks.get(0, path))
