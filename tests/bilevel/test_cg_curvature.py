"""CG's non-positive-curvature flag: the linear solve, its batched twin and iMAML's warning."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad.algorithms._imaml_vmap import batched_cg
from metagrad.bilevel import cg

D = torch.float64
PD = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=D)
INDEF = torch.tensor([[1.0, 0.0], [0.0, -3.0]], dtype=D)  # b^T A b = -2 at the first step


@pytest.mark.parametrize(("A", "flag"), [(PD, False), (INDEF, True)])
def test_cg_flags_non_positive_curvature(A: torch.Tensor, flag: bool) -> None:
    b = {"x": torch.ones(2, dtype=D)}
    res = cg(lambda v: {"x": A @ v["x"]}, b, maxiter=2)
    assert res.indefinite is flag
    if not flag:  # the flag changes nothing else: the PD solve is exact in 2 steps
        assert torch.allclose(res.x["x"], torch.linalg.solve(A, b["x"]), rtol=1e-12)


def test_batched_cg_flags_each_task() -> None:
    A = torch.stack([PD, INDEF])
    b = {"x": torch.ones(2, 2, dtype=D)}
    res = batched_cg(lambda p: {"x": torch.einsum("tij,tj->ti", A, p["x"])}, b, 2, 1e-12)
    assert res.indefinite.tolist() == [False, True]
    alone = cg(lambda v: {"x": PD @ v["x"]}, {"x": b["x"][0]}, maxiter=2, tol=1e-12)
    assert torch.allclose(res.x["x"][0], alone.x["x"], rtol=1e-12)


def _imaml(lam: float, loop: bool) -> mg.IMAML:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).to(D)
    learner = mg.IMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=20, lam=lam, cg_steps=60)
    if loop:
        learner._vmap_ok = False  # the per-task loop (custom_root), as on a non-vmap-safe model
    return learner


def _tasks() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    xs, xq = (4 * torch.randn(3, 8, 2, generator=g, dtype=D) for _ in range(2))
    ys, yq = (torch.randn(3, 8, 1, generator=g, dtype=D) for _ in range(2))
    return xs, ys, xq, yq


@pytest.mark.parametrize("loop", [False, True])
def test_imaml_warns_once_when_cg_meets_negative_curvature(loop: bool) -> None:
    """With a small lam the inner Hessian's negative eigenvalues make I + H/lam indefinite:
    iMAML says so once, naming lam and the fix; a large lam gives a PD system and no warning."""
    tasks = _tasks()
    small = _imaml(1e-3, loop)
    with pytest.warns(RuntimeWarning, match=r"metagrad.IMAML: CG met non-positive curvature"):
        small.meta_grad(*tasks)
    assert any(small.last_indefinite) and len(small.last_indefinite) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small.meta_grad(*tasks)  # once per learner
        large = _imaml(100.0, loop)
        large.meta_grad(*tasks)
    assert large.last_indefinite == [False, False, False]


def test_imaml_batched_and_loop_flag_the_same_tasks() -> None:
    tasks = _tasks()
    got = []
    for loop in (False, True):
        learner = _imaml(1e-3, loop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.meta_grad(*tasks)
        got.append(learner.last_indefinite)
    assert got[0] == got[1]
