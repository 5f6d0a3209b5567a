"""Learning-rate schedules, as per-step arrays fed to the optimizer (indexed by its global_step).

CosineWithWarmUpLR (MindFormers semantics): `warmup_steps = int(total_steps * warmup_ratio)`; during
warm-up lr_t = lr * t / warmup_steps (t from 0); then
lr_t = lr_end + 0.5 * (lr - lr_end) * (1 + cos(pi * (t - warmup_steps) / (total_steps - warmup_steps))).
"""

from __future__ import annotations

import math

import numpy as np

from llama_core.errors import ConfigError


def cosine_with_warmup(
    total_steps: int, learning_rate: float, warmup_ratio: float, lr_end: float
) -> np.ndarray:
    """Learning rate of each optimizer step 0..total_steps-1 (float32)."""
    if total_steps < 1:
        raise ConfigError(f"lr_schedule.total_steps must be >= 1, got {total_steps}")
    warmup = int(total_steps * warmup_ratio)
    decay = max(total_steps - warmup, 1)
    out = np.empty(total_steps, np.float64)
    for t in range(total_steps):
        if t < warmup:
            out[t] = learning_rate * t / warmup
        else:
            out[t] = lr_end + 0.5 * (learning_rate - lr_end) * (1 + math.cos(math.pi * (t - warmup) / decay))
    return out.astype(np.float32)


def lr_array(
    kind: str, total_steps: int, learning_rate: float, warmup_ratio: float, lr_end: float
) -> np.ndarray:
    """The per-step learning rates for an `lr_schedule.type`."""
    if kind == "CosineWithWarmUpLR":
        return cosine_with_warmup(total_steps, learning_rate, warmup_ratio, lr_end)
    if kind == "constant":
        return np.full(total_steps, learning_rate, np.float32)
    raise ConfigError(f"unsupported lr_schedule.type {kind!r}")
