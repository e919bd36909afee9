"""Inner-loop traces: rows, decreasing losses, CSV and plot."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metagrad.algorithms import MAML, MAMLpp, MetaSGD
from metagrad.viz import TRACE_KEYS, inner_trace, plot_trace, write_trace_csv


def _tasks(t: int = 3, k: int = 8) -> tuple[torch.Tensor, ...]:
    a = torch.randn(t, 1, 1)
    xs, xq = torch.randn(t, k, 2), torch.randn(t, k, 2)
    return xs, xs.sum(-1, keepdim=True) * a, xq, xq.sum(-1, keepdim=True) * a


def test_rows_keys_lengths_and_decrease() -> None:
    learner = MAML(torch.nn.Linear(2, 1), F.mse_loss, 0.2, 5)
    rows = inner_trace(learner, *_tasks())
    assert len(rows) == 3 * 6
    assert all(tuple(r) == TRACE_KEYS for r in rows)
    for t in range(3):
        mine = [r for r in rows if r["task"] == t]
        assert [r["step"] for r in mine] == list(range(6))
        assert mine[-1]["support_loss"] < mine[0]["support_loss"]
        assert mine[-1]["query_loss"] < mine[0]["query_loss"]
        assert all(r["step_size"] == pytest.approx(0.2) for r in mine[:-1])
        assert math.isnan(mine[-1]["step_size"]) and mine[0]["grad_norm"] > 0


def test_learned_rates_reported_and_model_untouched() -> None:
    learner = MetaSGD(torch.nn.Linear(2, 1), F.mse_loss, 0.05, 2)
    with torch.no_grad():
        learner.inner_lrs["weight"].fill_(0.3)
        learner.inner_lrs["bias"].fill_(0.1)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    rows = inner_trace(learner, *_tasks(2), steps=3)
    assert rows[0]["step_size"] == pytest.approx(0.2)
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert all(p.grad is None for p in learner.parameters())


def test_csv(tmp_path: Path) -> None:
    rows = inner_trace(MAML(torch.nn.Linear(2, 1), F.mse_loss, 0.1, 2), *_tasks(2))
    path = write_trace_csv(rows, tmp_path / "trace.csv")
    with path.open() as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == len(rows) and tuple(read[0]) == TRACE_KEYS
    assert float(read[1]["support_loss"]) == pytest.approx(rows[1]["support_loss"])


def test_bad_input() -> None:
    learner = MAML(torch.nn.Linear(2, 1), F.mse_loss, 0.1, 2)
    with pytest.raises(TypeError, match="metagrad learner"):
        inner_trace(object(), *_tasks())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        inner_trace(learner, *_tasks(), steps=-1)
    with pytest.raises(ValueError, match="empty"):
        plot_trace([], "x.png")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_png(tmp_path: Path) -> None:
    rows = inner_trace(MAML(torch.nn.Linear(2, 1), F.mse_loss, 0.2, 4), *_tasks())
    out = plot_trace(rows, tmp_path / "trace.png", title="adaptation")
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["maml", "mamlpp_bn"])
def test_trace_is_the_loop_adapt_runs(kind: str) -> None:
    """The last row is the state adapt() returns: same support and query losses, per task."""
    torch.manual_seed(0)
    if kind == "maml":
        learner = MAML(torch.nn.Linear(2, 1).double(), F.mse_loss, 0.2, 3)
        xs, ys, xq, yq = (t.double() for t in _tasks())
    else:  # learned per-step rates, per-step BatchNorm weights and statistics
        net = torch.nn.Sequential(
            torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 1)
        ).double()
        learner = MAMLpp(net, F.mse_loss, 0.1, 3)
        xs, ys, xq, yq = (t.double() for t in _tasks())
    rows = inner_trace(learner, xs, ys, xq, yq, steps=3)
    for t in range(xs.shape[0]):
        params = learner.adapt(xs[t], ys[t], steps=3)
        last = [r for r in rows if r["task"] == t][-1]
        assert last["step"] == 3
        support = float(F.mse_loss(learner.predict(params, xs[t]), ys[t]))
        query = float(F.mse_loss(learner.predict(params, xq[t]), yq[t]))
        assert math.isclose(last["support_loss"], support, rel_tol=1e-12, abs_tol=1e-14)
        assert math.isclose(last["query_loss"], query, rel_tol=1e-12, abs_tol=1e-14)
