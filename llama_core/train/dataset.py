"""MindRecord input pipeline with a deterministic, resumable, rank-sharded sample order.

Each epoch's order is a permutation drawn from `seed + epoch` (identity when shuffle is off). Global
batch g holds positions [g*B, (g+1)*B) of that order, B = batch_size x num_shards; rank r reads the
r-th block of batch_size inside it. So a 2-rank run sees exactly the samples a 1-process run with
batch 2 x batch_size sees, in the same order, and a resumed run can skip consumed batches exactly.
The tail that does not fill a global batch is dropped (drop_remainder) and the count is logged.

A packed dataset (`llama_preprocess --packing pack`) has a third column, the rows' document ends;
batches then carry them as [batch, max documents per row of the dataset], padded with
`NO_DOCUMENT` (past any row: the model ignores it), so every batch has one shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_core.data.packing import DOC_ENDS
from llama_core.errors import InputError

logger = logging.getLogger("llama_core.train")

COLUMNS = ["input_ids", "labels"]
# pads the document-ends lists: past any row, so the model ignores it; exact in float32, which
# padded_batch passes the value through (int32's max would come back as its min)
NO_DOCUMENT = 1 << 30


def mindrecord_files(path: str | Path) -> str | list[str]:
    """What MindDataset should open for `path`: a shard file as is, or the data files of a folder."""
    path = Path(path)
    if path.is_file():
        return str(path)
    if path.is_dir():
        files = sorted(
            str(p) for p in path.iterdir() if p.is_file() and p.suffix != ".db" and not p.name.startswith(".")
        )
        if not files:
            raise InputError(f"{path}: folder holds no MindRecord files")
        return files
    raise InputError(f"dataset not found: {path}")


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know of a MindRecord dataset before reading it."""

    path: str
    num_records: int
    max_documents: int  # the most documents in a packed row; 0: not packed (one record per row)

    @property
    def packed(self) -> bool:
        return self.max_documents > 0

    @property
    def columns(self) -> list[str]:
        return [*COLUMNS, DOC_ENDS] if self.packed else COLUMNS


def inspect_dataset(path: str | Path) -> DatasetInfo:
    """Record count and packing of a MindRecord dataset (reads the document-ends column only)."""
    import mindspore.dataset as ds

    files = mindrecord_files(path)
    data = ds.MindDataset(files, shuffle=False)
    names = data.get_col_names()
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {names}); is it a qa MindRecord?")
    max_documents = 0
    if DOC_ENDS in names:
        ends = ds.MindDataset(files, columns_list=[DOC_ENDS], shuffle=False)
        for (row,) in ends.create_tuple_iterator(output_numpy=True, num_epochs=1):
            max_documents = max(max_documents, len(row))
    return DatasetInfo(str(path), data.get_dataset_size(), max_documents)


def read_batches(info: DatasetInfo, batch_size: int, indices: list[int] | None, drop_remainder: bool):
    """Iterate numpy batches (input_ids, labels) or, packed, (input_ids, labels, doc_ends) of the
    records at `indices` in that order (None: all, in file order)."""
    import mindspore.dataset as ds

    order = {"shuffle": False} if indices is None else {"sampler": ds.SubsetSampler(indices)}
    data = ds.MindDataset(mindrecord_files(info.path), columns_list=info.columns, **order)
    if info.packed:
        data = data.padded_batch(
            batch_size, drop_remainder, pad_info={DOC_ENDS: ([info.max_documents], NO_DOCUMENT)}
        )
    else:
        data = data.batch(batch_size, drop_remainder=drop_remainder)
    return data.create_tuple_iterator(output_numpy=True, num_epochs=1)


@dataclass(frozen=True)
class ShardPlan:
    """The sample order of one epoch as seen by one rank."""

    num_records: int
    batch_size: int
    num_shards: int
    shard_id: int
    shuffle: bool
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_shards

    @property
    def batches_per_epoch(self) -> int:
        return self.num_records // self.global_batch

    def indices(self, epoch: int, skip_batches: int = 0) -> list[int]:
        """Record indices this rank reads in `epoch` (0-based), after skipping consumed batches."""
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_records)
        else:
            order = np.arange(self.num_records)
        out: list[int] = []
        for g in range(skip_batches, self.batches_per_epoch):
            start = g * self.global_batch + self.shard_id * self.batch_size
            out.extend(int(i) for i in order[start : start + self.batch_size])
        return out


def epoch_batches(info: DatasetInfo, plan: ShardPlan, epoch: int, skip_batches: int = 0):
    """Iterate this rank's numpy batches for one epoch (see `read_batches`)."""
    indices = plan.indices(epoch, skip_batches)
    if not indices:
        return iter(())
    return read_batches(info, plan.batch_size, indices, drop_remainder=True)


def supervised_tokens(ids: np.ndarray, labels: np.ndarray, pad_id: int = 0, ignore_id: int = -100) -> int:
    """How many targets a batch's loss counts (docs/REFERENCE.md's mask: input not pad, target kept)."""
    return int(((ids[:, :-1] != pad_id) & (labels[:, 1:] != ignore_id)).sum())


def check_batch(ids: np.ndarray, labels: np.ndarray, seq_length: int, where: str) -> None:
    """Records must be seq_length + 1 long (the model shifts by one)."""
    for name, arr in (("input_ids", ids), ("labels", labels)):
        if arr.ndim != 2 or arr.shape[1] != seq_length + 1:
            raise InputError(
                f"{where}: column {name!r} has records of length {arr.shape[-1]}, "
                f"expected seq_length + 1 = {seq_length + 1}"
            )


def bucket_sizes(seq_length: int, configured: list[int] | None = None) -> list[int]:
    """The sequence lengths a batch may be trimmed to, ascending: `configured` (sizes above
    seq_length dropped) or powers of two from 128 up; seq_length is always one of them."""
    if configured:
        sizes = {int(b) for b in configured if int(b) < seq_length}
    else:
        sizes = {1 << k for k in range(7, seq_length.bit_length()) if 1 << k < seq_length}
    return sorted(sizes | {seq_length})


def content_length(ids: np.ndarray, pad_id: int = 0) -> int:
    """Input positions a batch's loss can count: 1 + the last input position (of ids[:, :-1]) holding
    a non-pad token in any row; 0 for a batch of padding only."""
    inputs = ids[:, :-1] != pad_id
    if not inputs.any():
        return 0
    return int(inputs.shape[1] - np.argmax(inputs[:, ::-1].any(axis=0)))


def choose_bucket(lengths: list[int] | np.ndarray, buckets: list[int]) -> int:
    """The smallest bucket that holds the longest of `lengths` (the content lengths of every rank's
    rows of one global batch), so every rank runs the same shape."""
    longest = int(np.max(lengths)) if len(lengths) else 0
    for size in buckets:
        if size >= longest:
            return size
    return buckets[-1]


def trim_to_bucket(ids: np.ndarray, labels: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Records cut to `bucket` + 1 tokens (the model shifts by one). Exact when `bucket` holds the
    batch's content length: with causal attention the cut positions feed only positions that are cut
    too, and the loss mask (input != pad) counts none of them."""
    return np.ascontiguousarray(ids[:, : bucket + 1]), np.ascontiguousarray(labels[:, : bucket + 1])
