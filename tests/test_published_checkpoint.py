"""``metagrad eval results/<run>/checkpoint.pt`` reproduces the recorded evaluation.

Each recorded run scored 600 test tasks (the run's seed, drawn 25 at a time) and wrote each
task's query loss to ``test_losses.csv`` beside ``results.json``. Re-evaluating a published
checkpoint on the first tasks draws exactly the same tasks, so every one of their losses must
come back; the recorded rows must be the means (and CIs) of the per-task losses (accuracies are
not in the file, so for classification the loss rows are checked).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from metagrad.cli import main
from metagrad.training import mean_ci95

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "results" / "sinusoid-maml"
SUBSET = 100  # a multiple of the 25 tasks drawn per call: an exact prefix of the 600
# An Omniglot row of the algorithm table (a second-order conv-4 + BN run), if the data is here.
OMNIGLOT_RUN = ROOT / "results" / "algorithms" / "omniglot-5w1s-maml"
OMNIGLOT_DATA = ROOT.parent / "shared" / "data" / "omniglot"


def _losses(path: Path) -> dict[int, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    steps = [int(k.removeprefix("loss_")) for k in rows[0] if k.startswith("loss_")]
    return {s: np.array([float(r[f"loss_{s}"]) for r in rows]) for s in steps}


def test_recorded_rows_are_the_per_task_means() -> None:
    res = json.loads((RUN / "results.json").read_text())
    losses = _losses(RUN / "test_losses.csv")
    assert all(len(v) == res["test"]["tasks"] == 600 for v in losses.values())
    for row in res["test"]["rows"]:
        mean, ci = mean_ci95(losses[row["steps"]].tolist())
        assert mean == pytest.approx(row["loss"], rel=1e-12)
        assert ci == pytest.approx(row["loss_ci95"], rel=1e-12)


def test_published_checkpoint_reproduces_recorded_tasks(tmp_path: Path) -> None:
    res = json.loads((RUN / "results.json").read_text())
    steps = ",".join(str(r["steps"]) for r in res["test"]["rows"])
    argv = ["--quiet", "eval", str(RUN / "checkpoint.pt"), "--tasks", str(SUBSET),
            "--test-steps", steps, "--no-plots", "--output", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["config"]["seed"] == res["config"]["seed"]
    assert again["config"]["inner_lr"] == res["config"]["inner_lr"]
    recorded, now = _losses(RUN / "test_losses.csv"), _losses(tmp_path / "test_losses.csv")
    for s, values in now.items():
        np.testing.assert_allclose(values, recorded[s][:SUBSET], rtol=1e-5, atol=1e-7)


def test_published_omniglot_checkpoint_reproduces_recorded_tasks(tmp_path: Path) -> None:
    if not OMNIGLOT_DATA.is_dir():
        pytest.skip(f"Omniglot zips not found at {OMNIGLOT_DATA}")
    res = json.loads((OMNIGLOT_RUN / "results.json").read_text())
    recorded = _losses(OMNIGLOT_RUN / "test_losses.csv")
    for row in res["test"]["rows"]:  # the recorded loss rows are the per-task means
        mean, _ = mean_ci95(recorded[row["steps"]].tolist())
        assert mean == pytest.approx(row["loss"], rel=1e-12)
    steps = ",".join(str(r["steps"]) for r in res["test"]["rows"])
    argv = ["--quiet", "eval", str(OMNIGLOT_RUN / "checkpoint.pt"), "--tasks", "50",
            "--data", str(OMNIGLOT_DATA), "--test-steps", steps, "--no-plots",
            "--output", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    now = _losses(tmp_path / "test_losses.csv")
    # float32 conv-4 recorded with 2 threads: other thread counts sum in another order (~1e-5)
    for s, values in now.items():
        np.testing.assert_allclose(values, recorded[s][:50], rtol=1e-3, atol=1e-4)
