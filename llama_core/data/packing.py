"""Packing: several tokenized conversations per row, so training computes tokens, not padding.

A packed row holds seq_length+1 tokens like an unpacked record: whole conversations placed one
after another, then padding. Beside `input_ids` and `labels` it stores `actual_seq_len`, the
cumulative end of each conversation in the row (MindFormers 1.5's convention, without the leading
0), which the model turns into per-document attention and positions.

Rows are filled by first-fit decreasing over a window of conversations (`WINDOW_TOKENS` tokens at a
time, so memory stays bounded): longest first, each into the first row with room, ties in input
order; a row lists its conversations in input order. Deterministic for the same input. A
conversation is never split; one longer than a row was already truncated by the tokenizer step and
fills a row alone. Conversations with no supervised token teach nothing: they are left out and
counted in the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llama_core.data.mindrecord_sink import MindRecordSink, Row

DOC_ENDS = "actual_seq_len"
MODES = ("none", "pack")
WINDOW_TOKENS = 1 << 23  # tokens of conversations packed together (about 64 MiB of ids and labels)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices (each in ascending index order) whose lengths sum to at most `capacity`:
    items longest first (ties by index) each go to the first bin with room."""
    free = np.zeros(len(lengths), np.int64)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"item {i} of length {lengths[i]} exceeds the capacity {capacity}")
        room = np.flatnonzero(free[: len(bins)] >= lengths[i])
        if len(room):
            b = int(room[0])
        else:
            b = len(bins)
            bins.append([])
            free[b] = capacity
        bins[b].append(i)
        free[b] -= lengths[i]
    return [sorted(b) for b in bins]


@dataclass
class PackingStats:
    """What packing did; the `packing` section of the preprocess report."""

    documents: int = 0
    rows: int = 0
    tokens: int = 0  # conversation tokens placed in rows
    row_length: int = 0
    documents_per_row_max: int = 0
    skipped_unsupervised: dict[str, Any] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        """The stats plus the derived figures: fill ratio, and the rows (and so the tokens computed)
        saved against the unpacked output (one row per record, the left-out ones included)."""
        unpacked = self.documents + int(self.skipped_unsupervised.get("count", 0))
        return {
            "mode": "pack",
            "documents": self.documents,
            "rows": self.rows,
            "documents_per_row_mean": round(self.documents / self.rows, 3) if self.rows else 0.0,
            "documents_per_row_max": self.documents_per_row_max,
            "fill_ratio": round(self.tokens / (self.rows * self.row_length), 4) if self.rows else 0.0,
            "unpacked_rows": unpacked,
            "rows_saved_ratio": round(unpacked / self.rows, 3) if self.rows else 0.0,
            "skipped_unsupervised": self.skipped_unsupervised,
        }


class Packer:
    """Collects tokenized conversations and writes them to `sink` as packed rows of `row_length`."""

    def __init__(self, sink: MindRecordSink, row_length: int) -> None:
        self.sink = sink
        self.stats = PackingStats(row_length=row_length)
        self._docs: list[tuple[bytes, bytes]] = []  # (input_ids, labels) int32 bytes, equal lengths
        self._tokens = 0

    def add(self, row: Row) -> None:
        """One conversation as the tokenizer step makes it (ids cut to the row length, labels as
        long as its ids); call only for conversations with a supervised token."""
        ids, _ = row["input_ids"]
        labels = row["labels"][0][: len(ids)]
        self._docs.append((ids, labels))
        self._tokens += len(ids) // 4
        if self._tokens >= WINDOW_TOKENS:
            self.flush()

    def flush(self) -> None:
        """Pack and write the conversations collected so far."""
        if not self._docs:
            return
        length = self.stats.row_length
        bins = first_fit_decreasing([len(ids) // 4 for ids, _ in self._docs], length)
        rows: list[Row] = []
        for members in bins:
            sizes = [len(self._docs[i][0]) // 4 for i in members]
            ends = np.cumsum(sizes, dtype=np.int32)
            rows.append(
                {
                    "input_ids": (b"".join(self._docs[i][0] for i in members), length),
                    "labels": (b"".join(self._docs[i][1] for i in members), length),
                    DOC_ENDS: (ends.tobytes(), len(ends)),
                }
            )
        self.sink.write(rows)
        st = self.stats
        st.documents += len(self._docs)
        st.rows += len(rows)
        st.tokens += self._tokens
        st.documents_per_row_max = max(st.documents_per_row_max, *map(len, bins))
        self._docs, self._tokens = [], 0
