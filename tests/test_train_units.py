"""Trainer pieces in isolation: lr schedule, sample sharding, checkpoint files, greedy decoding."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from llama_core.errors import InputError
from llama_core.train import state as train_state
from llama_core.train.dataset import ShardPlan
from llama_core.train.outputs import has_checkpoint, list_checkpoints, newest_checkpoint
from llama_core.train.predict import greedy_generate
from llama_core.train.schedule import cosine_with_warmup


def test_cosine_with_warmup_by_hand() -> None:
    lrs = cosine_with_warmup(10, 1.0, 0.2, 0.1)  # 2 warm-up steps, 8 cosine steps from 1.0 to 0.1
    expected = [0.0, 0.5] + [0.1 + 0.45 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert cosine_with_warmup(4, 2.0, 0.0, 0.0)[0] == 2.0  # no warm-up: starts at the peak


def test_shards_of_a_global_batch_are_the_one_process_batch() -> None:
    one = ShardPlan(num_records=11, batch_size=4, num_shards=1, shard_id=0, shuffle=True, seed=3)
    ranks = [
        ShardPlan(num_records=11, batch_size=2, num_shards=2, shard_id=r, shuffle=True, seed=3)
        for r in (0, 1)
    ]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch == 2  # 11 // 4; the 3 left over are dropped
    for epoch in (0, 1):
        full = one.indices(epoch)
        r0, r1 = ranks[0].indices(epoch), ranks[1].indices(epoch)
        assert full == r0[0:2] + r1[0:2] + r0[2:4] + r1[2:4]
        assert len(set(full)) == 8 and set(full) <= set(range(11))
        assert ranks[0].indices(epoch, skip_batches=1) == r0[2:]
    assert one.indices(0) != one.indices(1)  # a new order each epoch
    assert ShardPlan(11, 4, 1, 0, shuffle=False, seed=3).indices(0) == list(range(8))


class _State(nn.Cell):
    """Stands in for the train-step cell: a trainable weight, a frozen one, optimizer state."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.full((2, 3), value, np.float32)), name="w")
        self.frozen = ms.Parameter(ms.Tensor(np.ones(4, np.float32)), name="frozen", requires_grad=False)
        self.m = ms.Parameter(ms.Tensor(np.full((2, 3), value, np.float32)), name="adam_m.w")
        self.step = ms.Parameter(ms.Tensor(np.array([int(value)], np.int32)), name="global_step")
        self.acc = ms.Parameter(ms.Tensor(np.zeros((2, 3), np.float32)), name="accu_grads.w")


def _save(tmp: Path, value: float, epoch: int, step: int, **kw) -> Path:
    kw.setdefault("trainable_only", False)
    return train_state.save(
        _State(value),
        tmp,
        "p",
        1,
        train_state.Counters(epoch, step, int(value)),
        trainable_names={"w"},
        keep_max=kw.pop("keep_max", 3),
        **kw,
    )


def test_checkpoint_names_keep_max_and_contents(tmp_path: Path) -> None:
    for i, (epoch, step) in enumerate([(1, 5), (1, 10), (2, 5), (2, 10)], start=1):
        path = _save(tmp_path, float(i), epoch, step)
    assert path == tmp_path / "checkpoint" / "rank_1" / "p_rank_1-2_10.ckpt"
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoint" / "rank_1", "p", 1)]
    assert names == ["p_rank_1-1_10.ckpt", "p_rank_1-2_5.ckpt", "p_rank_1-2_10.ckpt"]  # keep 3, oldest gone
    assert sorted(p.name for p in (tmp_path / "checkpoint" / "rank_1").iterdir()) == sorted(names)  # no temp
    stored = ms.load_checkpoint(str(path))
    assert {"w", "frozen", "adam_m.w", "global_step", "epoch_num", "step_num", "loss_scale"} <= set(stored)
    assert "accu_grads.w" not in stored
    assert train_state.counters_of(stored) == train_state.Counters(epoch=2, step_in_epoch=10, global_step=4)
    lora_only = _save(tmp_path / "lora", 1.0, 1, 5, trainable_only=True)
    assert "frozen" not in ms.load_checkpoint(str(lora_only)) and "w" in ms.load_checkpoint(str(lora_only))


def test_resume_skips_truncated_and_corrupt_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = _save(tmp_path, 1.0, 1, 5)
    newer = _save(tmp_path, 2.0, 1, 10)
    blob = newer.read_bytes()
    newer.write_bytes(blob[: len(blob) - 40])  # truncated
    newest = _save(tmp_path, 3.0, 1, 15)
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the CRC catches it
    newest.write_bytes(bytes(raw))
    path, params = train_state.load_newest(tmp_path, "p", 1)
    assert path == good and train_state.counters_of(params).global_step == 1
    assert sum("skipping unreadable checkpoint" in r.message for r in caplog.records) == 2
    assert train_state.load_newest(tmp_path / "none", "p", 1) is None


def test_base_checkpoint_file_takes_this_ranks_file(tmp_path: Path) -> None:
    for r in (0, 1):
        (tmp_path / f"rank_{r}").mkdir()
        (tmp_path / f"rank_{r}" / f"m_{r}.ckpt").write_bytes(b"x")
    assert train_state.base_checkpoint_file(tmp_path, 1) == tmp_path / "rank_1" / "m_1.ckpt"
    assert (
        train_state.base_checkpoint_file(tmp_path / "rank_0" / "m_0.ckpt", 1)
        == tmp_path / "rank_0" / "m_0.ckpt"
    )
    with pytest.raises(InputError, match="not found"):
        train_state.base_checkpoint_file(tmp_path / "missing", 0)


def test_newest_checkpoint_goes_by_epoch_and_step_not_mtime(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint" / "rank_0"
    folder.mkdir(parents=True)
    assert not has_checkpoint(tmp_path)
    for i, name in enumerate(["p_rank_0-2_3.ckpt", "p_rank_0-1_10.ckpt", "p_rank_0-2_12.ckpt"]):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, ns=(0, (3 - i) * 10**9))  # the newest by name is the oldest by mtime
    (folder / ".p_rank_0-3_1.ckpt.tmp-1-ab.ckpt").write_bytes(b"x")  # a dead write's leftover
    assert newest_checkpoint(folder).name == "p_rank_0-2_12.ckpt"
    assert has_checkpoint(tmp_path)
    (folder / "copy.ckpt").write_bytes(b"x")
    with pytest.raises(InputError, match="not all named"):
        newest_checkpoint(folder)
    (tmp_path / "lone").mkdir()
    with pytest.raises(InputError, match=r"no \.ckpt file"):
        newest_checkpoint(tmp_path / "lone")
    (tmp_path / "lone" / "base.ckpt").write_bytes(b"x")
    assert newest_checkpoint(tmp_path / "lone").name == "base.ckpt"


class _NextToken:
    """A model whose logits make token t+1 follow token t (so greedy decoding counts upwards)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: ms.Tensor) -> ms.Tensor:
        ids = input_ids.asnumpy()
        return ms.Tensor(np.eye(self.vocab, dtype=np.float32)[(ids + 1) % self.vocab] * 10.0)


def test_greedy_generate_stops_at_eos_and_limits() -> None:
    model = _NextToken(16)
    assert greedy_generate(model, [1, 2], seq_length=12, max_new_tokens=10, eos_id=6, pad_id=0) == [3, 4, 5]
    assert greedy_generate(model, [1, 2], seq_length=12, max_new_tokens=2, eos_id=6, pad_id=0) == [3, 4]
    assert greedy_generate(model, [7, 8], seq_length=5, max_new_tokens=10, eos_id=6, pad_id=0) == [9, 10, 11]
    # ids the tokenizer does not have (>= vocab_limit) are never chosen: after 9, the best allowed is 0
    assert greedy_generate(
        model, [8], seq_length=5, max_new_tokens=2, eos_id=6, pad_id=0, vocab_limit=10
    ) == [9, 0]
    # a chat format's stop ids (its end of turn) end the answer too, with or without eos
    stopped = greedy_generate(model, [1, 2], seq_length=12, max_new_tokens=9, stop_ids={9, 5}, pad_id=0)
    assert stopped == [3, 4]
    stopped = greedy_generate(model, [1], seq_length=12, max_new_tokens=9, eos_id=4, stop_ids={9}, pad_id=0)
    assert stopped == [2, 3]
    with pytest.raises(InputError, match="shorter than seq_length"):
        greedy_generate(model, [1] * 5, seq_length=5, max_new_tokens=1, eos_id=6, pad_id=0)


def test_supervised_tokens_counts_the_loss_mask() -> None:
    import numpy as np

    from llama_core.train.dataset import supervised_tokens

    # record 0: targets at positions 2,3 supervised; record 1: its answer was truncated away
    ids = np.array([[1, 5, 6, 7, 0], [1, 5, 6, 7, 8]], np.int32)
    labels = np.array([[-100, -100, 6, 7, 2], [-100, -100, -100, -100, -100]], np.int32)
    # inputs ids[:, :-1] = [1 5 6 7], targets labels[:, 1:] = [-100 6 7 2]: three counted
    assert supervised_tokens(ids, labels) == 3
    assert supervised_tokens(ids[1:], labels[1:]) == 0
    # a target after a pad input does not count: inputs [1, 0], targets [-100, 6]
    assert supervised_tokens(np.array([[1, 0, 0]]), np.array([[-100, -100, 6]])) == 0


def test_length_bucket_of_a_global_batch_takes_every_ranks_rows() -> None:
    from llama_core.train.dataset import bucket_sizes, choose_bucket, content_length, trim_to_bucket

    assert bucket_sizes(4096) == [128, 256, 512, 1024, 2048, 4096]
    assert bucket_sizes(1000) == [128, 256, 512, 1000]  # seq_length is always a bucket
    assert bucket_sizes(32) == [32]
    assert bucket_sizes(32, [16, 8, 64, 16]) == [8, 16, 32]  # sorted, deduplicated, capped, 32 added

    def rows(*lengths: int, seq: int = 32) -> np.ndarray:
        """Records of seq+1 ids: `n` non-pad tokens, then padding 0."""
        out = np.zeros((len(lengths), seq + 1), np.int32)
        for i, n in enumerate(lengths):
            out[i, :n] = 7
        return out

    # content length: 1 + the last input position (ids[:, :-1]) holding a non-pad token, over rows
    assert content_length(rows(5, 3)) == 5
    assert content_length(rows(33)) == 32  # a full record: its last id is only ever a target
    assert content_length(rows(0, 0)) == 0
    mid_pad = rows(6)
    mid_pad[0, 2] = 0  # a pad id inside the record does not end it
    assert content_length(mid_pad) == 6

    buckets = [8, 16, 32]
    # 2 ranks x 2 rows: rank 0 holds short rows, rank 1 a long one; both run rank 1's bucket
    rank0, rank1 = rows(3, 8), rows(2, 12)
    lengths = [content_length(rank0), content_length(rank1)]
    assert lengths == [8, 12]
    assert choose_bucket(lengths, buckets) == 16
    assert choose_bucket([lengths[0]], buckets) == 8  # rank 0 alone would have chosen 8
    assert choose_bucket([0, 1], buckets) == 8 and choose_bucket([32, 1], buckets) == 32
    assert choose_bucket([9], buckets) == 16 and choose_bucket([17], buckets) == 32

    ids, labels = trim_to_bucket(rank0, np.where(rank0 == 0, -100, rank0), 8)
    assert ids.shape == labels.shape == (2, 9)  # bucket + 1: the model shifts by one
    assert (ids[:, :8] == rank0[:, :8]).all() and ids.flags["C_CONTIGUOUS"]
