"""Meta-gradients with closed forms: quadratics, the seeds' linear toy, MAML++ loss weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import msl_weights_reference
from torch import Tensor, nn

from metagrad.algorithms import MAML, MetaSGD, Reptile, msl_weights

F64 = torch.float64
N = 4


class Vector(nn.Module):
    """A single parameter vector ``t``; every row of the output is ``t`` (x only sets the shape)."""

    def __init__(self, t0: Tensor) -> None:
        super().__init__()
        self.t = nn.Parameter(t0.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.t + 0 * x


def quadratic_loss(A: Tensor):
    """Targets ``[K, N+1]``: last column 0 -> support ``1/2 t'At - b't`` (b = first N columns),
    1 -> query ``1/2 ||t - c||^2``. Blended arithmetically so that it also runs under vmap."""

    def loss(pred: Tensor, y: Tensor) -> Tensor:
        flag, target = y[:, -1], y[:, :-1]
        support = 0.5 * ((pred @ A) * pred).sum(-1) - (pred * target).sum(-1)
        query = 0.5 * ((pred - target) ** 2).sum(-1)
        return ((1 - flag) * support + flag * query).mean()

    return loss


def quadratic_problem(T: int = 2, K: int = 3):
    torch.manual_seed(3)
    M = torch.randn(N, N, dtype=F64)
    A = M @ M.T / N + 0.5 * torch.eye(N, dtype=F64)
    t0 = torch.randn(N, dtype=F64)
    b = torch.randn(T, N, dtype=F64)
    c = torch.randn(T, N, dtype=F64)
    x = torch.zeros(T, K, N, dtype=F64)
    ys = torch.cat([b[:, None].expand(T, K, N), torch.zeros(T, K, 1, dtype=F64)], -1)
    yq = torch.cat([c[:, None].expand(T, K, N), torch.ones(T, K, 1, dtype=F64)], -1)
    return A, t0, b, c, (x, ys, x, yq)


STRATEGIES = ["loop", "vmap"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("order", [1, 2])
def test_quadratic_sgd(strategy: str, steps: int, order: int) -> None:
    """t_{k+1} = (I - aA) t_k + a b;  g2 = (I - aA)^K (t_K - c);  g1 = t_K - c."""
    A, t0, b, c, batch = quadratic_problem()
    alpha = 0.3
    learner = MAML(Vector(t0), quadratic_loss(A), alpha, steps, order, strategy=strategy)
    got = learner.meta_grad(*batch)["module.t"]
    J = torch.eye(N, dtype=F64) - alpha * A
    want = torch.zeros(N, dtype=F64)
    for i in range(b.shape[0]):
        t = t0.clone()
        for _ in range(steps):
            t = t - alpha * (A @ t - b[i])
        g = t - c[i]
        want += (torch.linalg.matrix_power(J, steps) @ g if order == 2 else g) / b.shape[0]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_quadratic_meta_sgd_rates(strategy: str) -> None:
    """t1 = t - a*(At - b): dL/dt = (I - A diag(a))(t1 - c), dL/da = -(At - b) * (t1 - c)."""
    A, t0, b, c, batch = quadratic_problem(T=1)
    learner = MetaSGD(Vector(t0), quadratic_loss(A), 0.2, 1, strategy=strategy)
    with torch.no_grad():
        learner.inner_lrs["t"].copy_(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    a = learner.inner_lrs["t"].detach()
    g = learner.meta_grad(*batch)
    grad_s = A @ t0 - b[0]
    t1 = t0 - a * grad_s
    want_t = (torch.eye(N, dtype=F64) - A @ torch.diag(a)) @ (t1 - c[0])
    assert torch.allclose(g["module.t"], want_t, rtol=1e-12, atol=1e-14)
    assert torch.allclose(g["inner_lrs.t"], -grad_s * (t1 - c[0]), rtol=1e-12, atol=1e-14)


def test_quadratic_reptile_one_step() -> None:
    """One SGD step: theta - phi_i = a (A theta - b_i); .grad is its mean over tasks."""
    A, t0, b, _, batch = quadratic_problem()
    model = Vector(t0)
    Reptile(model, quadratic_loss(A), 0.3, 1).meta_loss(*batch).backward()
    want = 0.3 * (A @ t0 - b).mean(0)
    assert model.t.grad is not None
    assert torch.allclose(model.t.grad, want, rtol=1e-12, atol=1e-14)


# -- the seeds' linear toy ---------------------------------------------------------------------
def linear_toy(w0: float) -> tuple[nn.Linear, tuple[Tensor, ...]]:
    """nn.Linear(1, 1), b0 = 0; support (x=1, y=0), query (x=2, y=0); MSE; inner lr 1.

    After one step w1 = -w - 2b, b1 = -2w - b, so the query loss is (-4w - 5b)^2: second order
    gives d/dw = 32 w0, d/db = 40 w0 at b0 = 0; first order gives 4(2w1 + b1) = -16 w0 and
    2(2w1 + b1) = -8 w0.
    """
    lin = nn.Linear(1, 1).to(F64)
    with torch.no_grad():
        lin.weight.fill_(w0)
        lin.bias.zero_()
    one = torch.ones(1, 1, 1, dtype=F64)
    zero = torch.zeros(1, 1, 1, dtype=F64)
    return lin, (one, zero, 2 * one, zero)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize(
    ("w0", "order", "dw", "db"),
    [
        (-0.5258, 2, 32 * -0.5258, 40 * -0.5258),
        (-0.5258, 1, -16 * -0.5258, -8 * -0.5258),
        (-0.7597505450248718, 2, -24.3120174407959, None),
        (-1.9347891807556152, 1, 30.956626892089844, None),
    ],
)
def test_linear_toy(w0: float, order: int, dw: float, db: float | None, strategy: str) -> None:
    lin, batch = linear_toy(w0)
    g = MAML(lin, F.mse_loss, 1.0, 1, order, strategy=strategy).meta_grad(*batch)
    assert abs(float(g["module.weight"]) - dw) <= 1e-9 * abs(dw)
    if db is not None:
        assert abs(float(g["module.bias"]) - db) <= 1e-12 * abs(db)


def test_linear_toy_seed_value() -> None:
    """The seed prints -16.826 for the second-order gradient of w at w0 = -0.5258."""
    lin, batch = linear_toy(-0.5258)
    g = MAML(lin, F.mse_loss, 1.0, 1, 2).meta_grad(*batch)
    assert round(float(g["module.weight"]), 3) == -16.826


# -- MAML++ multi-step loss weights ------------------------------------------------------------
def test_msl_weights_known_values() -> None:
    assert msl_weights(0, 5, 10) == ()
    assert msl_weights(1, 0, 10) == pytest.approx((1.0,))
    assert msl_weights(4, 0, 100) == pytest.approx((0.25,) * 4)
    # Fully annealed: every non-final weight at its floor 0.03/K.
    assert msl_weights(3, 10**6, 100) == pytest.approx((0.01, 0.01, 0.98))
    # Halfway for K = 2, anneal 10: early weight 0.5 - 5 * 0.05 = 0.25.
    assert msl_weights(2, 5, 10) == pytest.approx((0.25, 0.75))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=1, max_value=2000),
)
def test_msl_weights_property(K: int, step: int, anneal: int) -> None:
    w = msl_weights(K, step, anneal)
    assert len(w) == K
    assert sum(w) == pytest.approx(1.0, abs=1e-12)
    assert all(x > 0 for x in w)
    assert w == pytest.approx(msl_weights_reference(K, step, anneal), abs=1e-15)
