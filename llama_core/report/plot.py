"""loss_curve.png: the train loss per step (smoothed when long), the eval losses, the base model's eval
loss, drawn with matplotlib on a canvas of its own (no pyplot, no global backend change)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

from llama_core.atomic import write_bytes_atomic
from llama_core.report.values import num, series

PLOT_SIZE_INCHES = (8.0, 4.5)
PLOT_DPI = 120
SMOOTH_FROM_POINTS = 20  # train series this long also get a smoothed line


def _smoothed(values: list[float]) -> tuple[list[float], int]:
    """A centred moving average (the window shrinks at the ends) and its window."""
    n = len(values)
    half = max(2, n // 40)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out, 2 * half + 1


def loss_png(
    train_series: Any, eval_series: Any, *, base_eval_loss: float | None = None, title: str = ""
) -> bytes:
    """The loss curve as PNG bytes (Agg canvas of its own: no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = series(train_series)
    finite = [(s, v) for s, v in train if math.isfinite(v)]
    evals = [(s, v) for s, v in series(eval_series) if math.isfinite(v)]
    if not finite and not evals:
        raise ValueError("nothing to plot: no finite train or eval loss")
    fig = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        bad = len(train) - len(finite)
        label = "train loss" + (f" ({bad} non-finite step(s) not drawn)" if bad else "")
        smooth = len(finite) >= SMOOTH_FROM_POINTS
        ax.plot(
            [s for s, _ in train],
            [v for _, v in train],
            color="tab:blue",
            linewidth=1.0 if smooth else 1.6,
            alpha=0.35 if smooth else 1.0,
            marker="" if len(train) > 40 else ".",
            markersize=4,
            label=label,
        )
        if smooth:
            values, window = _smoothed([v for _, v in finite])
            ax.plot(
                [s for s, _ in finite],
                values,
                color="tab:blue",
                linewidth=2.0,
                label=f"train loss, smoothed ({window}-step mean)",
            )
    if evals:
        ax.plot(
            [s for s, _ in evals],
            [v for _, v in evals],
            linestyle="none",
            marker="o",
            markersize=6,
            color="tab:orange",
            markeredgecolor="black",
            markeredgewidth=0.6,
            label="eval loss",
            zorder=3,
        )
        last_step, last = evals[-1]
        ax.annotate(
            f"{last:.3f}",
            (last_step, last),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    base = num(base_eval_loss)
    if base is not None:
        ax.axhline(
            base, color="dimgray", linestyle="--", linewidth=1.2, label=f"base model eval loss ({base:.3f})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean cross-entropy per supervised token)")
    ax.set_title(title or "Fine-tune loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9, framealpha=1.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def plot_losses(
    train_series: Any,
    eval_series: Any,
    path: str | os.PathLike[str],
    *,
    base_eval_loss: float | None = None,
    title: str = "",
) -> Path:
    """Write the loss curve PNG to `path` atomically: train loss per step (and a smoothed line when
    long), eval losses as markers, the base model's eval loss as a dashed line. NaN losses are gaps."""
    return write_bytes_atomic(
        path, loss_png(train_series, eval_series, base_eval_loss=base_eval_loss, title=title)
    )
