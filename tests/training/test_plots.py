"""Plots: MAML Figure 2 for sinusoids, learning curves; matplotlib stays optional."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from metagrad.tasks import SinusoidTasks
from metagrad.training import TrainConfig, Trainer, plot_learning_curves, plot_sinusoid_fits


def test_plots_are_written(tmp_path: Path, tiny_sinusoid: TrainConfig) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    t = Trainer(tiny_sinusoid, tmp_path, progress=False)
    t.train()
    fits = plot_sinusoid_fits(t.learner, SinusoidTasks(5, seed=0), tmp_path / "fits.png")
    curves = plot_learning_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    for p in (fits, curves):
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width > 300


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (tmp_path / "m.csv").write_text("iteration,train_loss\n1,0.5\n")
    with pytest.raises(ImportError, match=r"pip install metagrad\[viz\]"):
        plot_learning_curves(tmp_path / "m.csv", tmp_path / "c.png")
