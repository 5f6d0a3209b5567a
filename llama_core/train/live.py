"""A fine-tune's progress while it runs: one small JSON file rank 0 rewrites every few seconds.

`progress.json` in the run folder holds where training is (step of total, epoch, loss raw and smoothed,
learning rate, real tokens per second, elapsed, ETA) and the curve so far, downsampled so that the
file stays a few KB however long the run: the fine-tune task reads it to log a progress line.
Progress is for watching: a write that fails (a full disk) warns once and training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_core.atomic import write_json_atomic
from llama_core.progress import human_seconds

PROGRESS_NAME = "progress.json"
CURVE_POINTS = 200  # points of each curve kept: a few KB of JSON, enough for a chart
SMOOTHING = 0.9  # TensorBoard-style exponential moving average of the train loss
WRITE_EVERY_S = 2.0

logger = logging.getLogger("llama_core.train")


def downsample(points: list[list[float]], limit: int = CURVE_POINTS) -> list[list[float]]:
    """At most `limit` points, evenly spread, the first and last kept."""
    if len(points) <= limit:
        return [list(p) for p in points]
    stride = (len(points) - 1) / (limit - 1)
    return [list(points[round(i * stride)]) for i in range(limit)]


@dataclass
class LiveProgress:
    """What a running fine-tune shows; `state` is training, evaluating, saving or done."""

    state: str = "starting"
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    loss_smoothed: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None  # real (not padding) tokens per second on rank 0's device
    elapsed_s: float = 0.0
    eta_s: float | None = None
    eval_loss: float | None = None
    curve: list[list[float]] = field(default_factory=list)  # [step, loss, smoothed]
    eval_curve: list[list[float]] = field(default_factory=list)  # [step, eval loss]
    updated_at: float = 0.0  # unix time of the write

    def line(self) -> str:
        """'step 120/2000 (6.0 %) epoch 1/3 loss 1.2345 (smoothed 1.3012) lr 2.0e-04 tokens/s 4,560
        elapsed 5m02s ETA 1h02m00s'"""
        pct = 100.0 * self.step / self.total_steps if self.total_steps else 0.0
        parts = [f"step {self.step}/{self.total_steps} ({pct:.1f} %)", f"epoch {self.epoch}/{self.epochs}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f} (smoothed {self.loss_smoothed:.4f})")
        if self.eval_loss is not None:
            parts.append(f"eval loss {self.eval_loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.1e}")
        if self.tokens_per_s is not None:
            parts.append(f"tokens/s {self.tokens_per_s:,.0f}")
        parts.append(f"elapsed {human_seconds(self.elapsed_s)}")
        if self.eta_s is not None and self.state != "done":
            parts.append(f"ETA {human_seconds(self.eta_s)}")
        return " ".join(parts) + ("" if self.state == "training" else f" [{self.state}]")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ProgressWriter:
    """Rank 0's side: `step()` after each optimizer step and `eval()` after each evaluation; the file
    is rewritten at most every `every_s` seconds (and always by `set_state`), atomically."""

    def __init__(self, run_dir: Path, total_steps: int, epochs: int, every_s: float = WRITE_EVERY_S) -> None:
        self.path = Path(run_dir) / PROGRESS_NAME
        self.every_s, self.started = every_s, time.monotonic()
        self.progress = LiveProgress(total_steps=total_steps, epochs=epochs)
        self.points: list[list[float]] = []
        self.evals: list[list[float]] = []
        self.written = -math.inf
        self.failed = False

    def resume(self, step: int) -> None:
        """Continue the run folder's earlier progress (an earlier try's) at `step`: its curve and evals
        up to that step are kept, as the view would otherwise start the curve at the resumed step."""
        earlier = read_progress(self.path.parent)
        if earlier is not None:
            self.points = [p for p in earlier.curve if p[0] <= step]
            self.evals = [e for e in earlier.eval_curve if e[0] <= step]
            if self.points:
                self.progress.loss_smoothed = self.points[-1][2]

    def step(
        self, step: int, epoch: int, loss: float, lr: float, tokens_per_s: float, eta_s: float | None
    ) -> None:
        p = self.progress
        smoothed = loss if p.loss_smoothed is None else SMOOTHING * p.loss_smoothed + (1 - SMOOTHING) * loss
        p.state, p.step, p.epoch, p.loss, p.loss_smoothed = "training", step, epoch, loss, smoothed
        p.learning_rate, p.tokens_per_s, p.eta_s = lr, tokens_per_s, eta_s
        self.points.append([step, loss, smoothed])
        self.write(force=False)

    def eval(self, step: int, loss: float) -> None:
        self.progress.eval_loss = loss
        self.evals.append([step, loss])
        self.write(force=True)

    def set_state(self, state: str) -> None:
        self.progress.state = state
        self.write(force=True)

    def write(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.written < self.every_s:
            return
        p = self.progress
        p.elapsed_s, p.updated_at = now - self.started, time.time()
        p.curve, p.eval_curve = downsample(self.points), downsample(self.evals)
        self.written = now
        try:
            write_json_atomic(self.path, p.to_json())
        except OSError as exc:
            if not self.failed:
                logger.warning("progress not written (%s); training goes on", exc)
            self.failed = True


def read_progress(run_dir: str | Path) -> LiveProgress | None:
    """The run folder's progress; None before rank 0 wrote it (or when it cannot be read)."""
    try:
        return LiveProgress(**json.loads((Path(run_dir) / PROGRESS_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None
