"""Pictures of a run: the MAML paper's Figure 2 for sinusoids, and learning curves.

matplotlib is an optional dependency (``pip install metagrad[viz]``), imported on first use.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metagrad._errors import NonFiniteError
from metagrad.algorithms._base import Learner
from metagrad.tasks import SinusoidTasks

_log = logging.getLogger("metagrad")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "metagrad plots need matplotlib: pip install metagrad[viz] (or pip install matplotlib)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt: Any, fig: Any, path: str | os.PathLike[str]) -> Path:
    """Lay out ``fig``, write it to ``path`` (110 dpi), close it; returns the path."""
    fig.tight_layout()
    out_path = Path(path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_sinusoid_fits(
    learner: Learner,
    tasks: SinusoidTasks,
    path: str | os.PathLike[str],
    *,
    n_tasks: int = 3,
    steps: Sequence[int] = (1, 10),
) -> Path:
    """MAML paper Figure 2: ground truth, the K support points, pre-update and adapted fits.

    Args:
        learner: a trained learner on the 1-D sinusoid regressor.
        tasks: the sampler whose ``shots`` support points are shown (its generator advances).
        path: PNG file to write.
        n_tasks: one panel per task.
        steps: inner step counts drawn besides the pre-update (0 steps) prediction. A step
            count whose inner loop diverges (NaN/Inf, e.g. Meta-SGD's learned rates run past the
            steps they were trained for) is marked "diverged" in the legend and logged as a
            warning (logger ``"metagrad"``), not raised: the plot is drawn regardless.
    """
    plt = _pyplot()
    amp, phase = tasks.sample_functions(n_tasks)
    xs, ys, _, _ = tasks.batch_for(amp, phase)
    p0 = next(iter(learner.parameters()))
    grid = torch.linspace(-5, 5, 200, dtype=p0.dtype, device=p0.device).unsqueeze(1)
    fig, axes = plt.subplots(1, n_tasks, figsize=(4.2 * n_tasks, 3.4), squeeze=False)
    colors = ["#d62728", "#2ca02c", "#9467bd", "#8c564b"]
    for i, ax in enumerate(axes[0]):
        x, y = xs[i].to(p0), ys[i].to(p0)
        truth = SinusoidTasks.function(float(amp[i]), float(phase[i]), grid.cpu())
        ax.plot(grid.cpu(), truth, color="#1f77b4", lw=2, label="ground truth")
        with torch.no_grad():
            pre = learner.predict(learner.adapt(x, y, steps=0), grid)
        ax.plot(grid.cpu(), pre.cpu(), ":", color="#7f7f7f", lw=1.8, label="pre-update")
        for c, s in zip(colors, steps):
            label = f"{s} grad step" + ("s" if s != 1 else "")
            try:
                params = learner.adapt(x, y, steps=s)
                with torch.no_grad():
                    out = learner.predict(params, grid)
            except NonFiniteError as err:
                out = torch.full_like(grid, math.nan)
                label += " (diverged)"
                _log.warning(
                    "%s: the inner loop of %s diverged on panel %d at %d steps (inner step %s); "
                    "that fit is left out. This is the learner's behaviour beyond the step count "
                    "it was trained with, not a data problem.",
                    Path(path).name, type(learner).__name__, i + 1, s, err.step,
                )  # fmt: skip
            ax.plot(grid.cpu(), out.cpu(), "--", color=c, lw=1.6, label=label)
        ax.scatter(x.cpu(), y.cpu(), marker="^", color="k", zorder=5, label=f"{x.shape[0]} points")
        lim = float(amp[i]) * 1.6 + 0.5  # keep the truth readable if an adapted fit runs off
        ax.set_ylim(-lim, lim)
        ax.set_title(f"A={float(amp[i]):.2f}, phase={float(phase[i]):.2f}")
        ax.set_xlim(-5, 5)
        ax.set_xlabel("x")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{type(learner).__name__}, K={xs.shape[1]}")
    return _save_figure(plt, fig, path)


def read_metrics(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as column -> [(iteration, value)] for the non-empty cells."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            it = int(row["iteration"])
            for k, v in row.items():
                if k != "iteration" and v not in ("", None):
                    out.setdefault(k, []).append((it, float(v)))
    return out


def _steps_label(cols: dict[str, list[tuple[int, float]]]) -> str:
    steps = sorted({int(v) for _, v in cols.get("val_steps", [])})
    if not steps:
        return ""
    return f" after {', '.join(map(str, steps))} step" + ("s" if steps != [1] else "")


def _line_with_band(ax: Any, cols: dict[str, Any], key: str, scale: float, **kw: Any) -> bool:
    """Plot column ``key`` (finite points) with its ``key_ci95`` band; False if nothing to draw."""
    pts = [(i, v) for i, v in cols.get(key, []) if math.isfinite(v)]
    if not pts:
        return False
    it, v = zip(*pts)
    line = ax.plot(it, [scale * x for x in v], **kw)[0]
    ci = {i: c for i, c in cols.get(f"{key}_ci95", []) if math.isfinite(c)}
    if ci:
        lo = [scale * (x - ci.get(i, 0.0)) for i, x in pts]
        hi = [scale * (x + ci.get(i, 0.0)) for i, x in pts]
        ax.fill_between(it, lo, hi, color=line.get_color(), alpha=0.2, lw=0, label="95% CI")
    return True


def plot_learning_curves(
    metrics: str | os.PathLike[str], path: str | os.PathLike[str], *, log_scale: bool = True
) -> Path:
    """Training meta-loss and validation metrics against iterations, from ``metrics.csv``.

    Validation curves carry their 95% confidence band over tasks and, in the legend, the inner
    step count they were measured after.
    """
    plt = _pyplot()
    cols = read_metrics(metrics)
    has_acc = bool(cols.get("val_accuracy") or cols.get("train_accuracy"))
    fig, axes = plt.subplots(
        1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 3.8), squeeze=False
    )
    after = _steps_label(cols)
    ax = axes[0][0]
    _line_with_band(ax, cols, "train_loss", 1.0, label="train meta-loss")
    _line_with_band(ax, cols, "val_loss", 1.0, label=f"validation loss{after}", marker="o", ms=3)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        ax2 = axes[0][1]
        _line_with_band(ax2, cols, "train_accuracy", 100.0, label="train accuracy", marker=".")
        _line_with_band(
            ax2, cols, "val_accuracy", 100.0, label=f"validation accuracy{after}", marker="o", ms=3
        )
        ax2.set_xlabel("meta-iteration")
        ax2.set_ylabel("query accuracy (%)")
        ax2.legend()
        ax2.grid(alpha=0.3)
    return _save_figure(plt, fig, path)
