"""Hyperparameter optimization: the hypergradient is exact, the protocol is fair, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from metagrad import bilevel
from metagrad.workloads import (
    HPOConfig,
    Split,
    grid_search,
    hpo_problem,
    init_mlp,
    tune_hyperparameters,
)

D = torch.float64


def tiny(dtype: torch.dtype = torch.float32) -> tuple[Split, Split, Split]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g, dtype=dtype)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return Split(x[:24], y[:24]), Split(x[24:36], y[24:36]), Split(x[36:], y[36:])


CFG = HPOConfig(hidden=(6,), inner_steps=8, grid_lr=(0.1, 0.3), grid_wd=(1e-4, 1e-2))


def test_per_layer_hypergradient_matches_finite_differences() -> None:
    train, val, _ = tiny(D)
    w0 = init_mlp((5, 6, 3), seed=0, dtype=D)
    pb = hpo_problem(CFG)
    h = {
        "log_lr": torch.tensor([math.log(0.2), math.log(0.05)], dtype=D, requires_grad=True),
        "log_wd": torch.tensor([math.log(1e-2), math.log(3e-2)], dtype=D, requires_grad=True),
    }
    res = bilevel.hypergrad(pb, w0, h, (train.x, train.y), (val.x, val.y))

    def G(key: str, i: int, eps: float) -> float:
        hh = {k: v.detach().clone() for k, v in h.items()}
        hh[key][i] += eps
        return float(
            bilevel.hypergrad(pb, w0, hh, (train.x, train.y), (val.x, val.y), need_grad=False).value
        )

    for key in h:
        for i in range(2):
            fd = (G(key, i, 1e-6) - G(key, i, -1e-6)) / 2e-6
            assert float(res.grads.h[key][i]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_both_methods_get_the_same_number_of_runs_and_select_on_validation() -> None:
    data = tiny()
    hgd = tune_hyperparameters(*data, CFG, seed=0)
    grid = grid_search(*data, CFG, seed=0)
    assert len(hgd.runs) == len(grid.runs) == CFG.runs == 4
    for res in (hgd, grid):
        assert res.best.val_loss == min(r.val_loss for r in res.runs)
    # hypergradient descent moves the per-layer rates apart; the grid shares them
    assert len(set(hgd.runs[-1].lr)) == 2
    assert all(len(set(r.lr)) == 1 for r in grid.runs)
    # the first run is the starting point
    assert hgd.runs[0].lr == pytest.approx([CFG.init_lr] * 2)


def test_a_diverging_run_is_recorded_and_backed_off() -> None:
    data = tiny()
    cfg = HPOConfig(
        hidden=(6,), inner_steps=8, init_lr=1e4, max_lr=1e5, grid_lr=(1.0,), grid_wd=(1e-4, 1e-3)
    )
    res = tune_hyperparameters(*data, cfg)
    assert math.isinf(res.runs[0].val_loss) and res.runs[0].val_accuracy == 0.0


def test_hyperparameters_that_cannot_reach_the_validation_loss() -> None:
    data = tiny()
    with pytest.raises(
        ValueError,
        match=r"tune_hyperparameters: inner_steps=0.*cannot reach the validation loss.*inner_steps >= 1",
    ):
        tune_hyperparameters(*data, HPOConfig(inner_steps=0))
    with pytest.raises(
        ValueError, match=r"tune_hyperparameters: tune=\('momentum',\).*\['momentum'\]"
    ):
        tune_hyperparameters(*data, HPOConfig(tune=("momentum",)))
    with pytest.raises(
        ValueError, match=r"grid_search: learning rates and weight decays must be > 0.*\[0\.0\]"
    ):
        grid_search(*data, HPOConfig(grid_wd=(0.0, 1e-3)))
    train, val, test = data
    with pytest.raises(ValueError, match="tune_hyperparameters: the val split is empty"):
        tune_hyperparameters(train, Split(val.x[:0], val.y[:0]), test, CFG)
