"""Pictures of a navigation run: the MAML paper's Figure 5 and the training curves.

matplotlib is optional (``pip install metagrad[viz]``) and imported on first use.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from metagrad.training._plots import _pyplot, _save_figure

_STYLE = {
    "maml": ("MAML", "#d62728", "o"),
    "pretrained": ("pretrained", "#1f77b4", "s"),
    "random": ("random initialization", "#7f7f7f", "^"),
}


def plot_navigation_returns(evaluation: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Average return against adaptation steps for each policy, with 95% intervals (Figure 5)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for name, rows in evaluation["rows"].items():
        label, color, marker = _STYLE.get(name, (name, None, "o"))
        steps = [r["steps"] for r in rows]
        ax.errorbar(
            steps, [r["return"] for r in rows], yerr=[r["return_ci95"] for r in rows],
            label=label, color=color, marker=marker, capsize=3, lw=1.8,
        )  # fmt: skip
        ax.set_xticks(steps)
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("average return")
    ax.set_title(f"2D navigation ({evaluation['tasks']} test tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(plt, fig, path)


def plot_rl_learning_curves(metrics: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Training returns before and after adaptation against iterations, per phase."""
    plt = _pyplot()
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    with open(metrics, newline="") as f:
        for row in csv.DictReader(f):
            s = series.setdefault(row["phase"], {"before": [], "after": []})
            i = int(row["iteration"])
            s["before"].append((i, float(row["return_before"])))
            s["after"].append((i, float(row["return_after"])))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for phase, s in series.items():
        _, color, _ = _STYLE.get(phase, (phase, None, "o"))
        its, before = zip(*s["before"])
        if phase == "maml":
            ax.plot(its, before, color=color, alpha=0.5, lw=1.2, label="MAML, before adaptation")
            its, after = zip(*s["after"])
            ax.plot(its, after, color=color, lw=1.8, label="MAML, after adaptation")
        else:
            ax.plot(its, before, color=color, lw=1.5, label=f"{phase} (no adaptation)")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("average return (training tasks)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(plt, fig, path)
