"""Policy-gradient estimators against exact expectations (float64, fixed seeds).

On a small discrete MDP (defined below: two states, three actions, horizon 4, discount 0.9,
a tabular softmax policy ``theta[s, a]``) the expected return J(theta) is an explicit function
of the policy, so its gradient and Hessian are exact (``torch.autograd.functional.jacobian`` /
``hessian`` of the closed form) and its third directional derivative too
(``metagrad.nth_derivative``).
Each estimator is averaged over N = 400,000 sampled trajectories in B = 100 batches of 4,000;
the standard error (SE) of each entry is the standard deviation of the batch estimates over
sqrt(B). DiCE must agree with the exact derivatives within 5 SE in every entry (the largest
deviation seen: 3.3 SE); the naive REINFORCE surrogate's Hessian must be off by more than 20
SE (it is off by up to 3.84, ~1000 SE, where the largest exact entry is 0.45: it drops the
score products). The bandit checks orders 1 to 4 with N = 1,000,000.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.autograd.functional import hessian, jacobian

from metagrad import nth_derivative
from metagrad.rl import dice_objective, magic_box, reinforce_surrogate

# ---------------------------------------------------------------------- the MDP
# ``expected_return`` evaluates J(theta) = E sum_t gamma^t r(s_t, a_t) exactly by propagating
# the state distribution (differentiable, float64); ``sample`` draws trajectories with the same
# dynamics, vectorized; ``log_probs`` recomputes log pi_theta(a_t | s_t) of sampled actions.

DT = torch.float64
HORIZON, GAMMA = 4, 0.9
P0 = torch.tensor([0.6, 0.4], dtype=DT)
# P[s, a, s']
P = torch.tensor(
    [[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], [[0.3, 0.7], [0.6, 0.4], [0.05, 0.95]]], dtype=DT
)
# r[s, a]: around 3, so that returns are far from 0 and baselines matter (as in most tasks)
R = torch.tensor([[1.0, -0.5, 0.2], [0.3, 2.0, -1.0]], dtype=DT) + 3.0  # r[s, a]
THETA = torch.tensor([[0.2, -0.4, 0.1], [-0.3, 0.5, 0.0]], dtype=DT)


def expected_return(theta: Tensor) -> Tensor:
    pi = torch.softmax(theta, -1)
    d = P0
    total = torch.zeros((), dtype=DT)
    for t in range(HORIZON):
        total = total + GAMMA**t * (d[:, None] * pi * R).sum()
        d = torch.einsum("s,sa,sap->p", d, pi, P)
    return total


def values(theta: Tensor) -> Tensor:
    """``V[t, s] = E[sum_{t' >= t} gamma^(t'-t) r_t' | s_t = s]`` under ``theta`` (exact)."""
    pi = torch.softmax(theta, -1)
    v = torch.zeros(2, dtype=DT)
    out = []
    for _ in range(HORIZON):
        q = R + GAMMA * torch.einsum("sap,p->sa", P, v)
        v = (pi * q).sum(-1)
        out.append(v)
    return torch.stack(out[::-1])


def sample(theta: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` trajectories: states, actions ``[n, T]`` (long) and rewards ``[n, T]``."""
    pi = torch.softmax(theta.detach(), -1)
    s = (torch.rand(n, generator=generator, dtype=DT) > P0[0]).long()
    states, actions = [], []
    for _ in range(HORIZON):
        u = torch.rand(n, 1, generator=generator, dtype=DT)
        a = (u > pi[s].cumsum(-1)[:, :-1]).sum(-1)
        states.append(s)
        actions.append(a)
        u = torch.rand(n, generator=generator, dtype=DT)
        s = (u > P[s, a, 0]).long()
    st, ac = torch.stack(states, 1), torch.stack(actions, 1)
    return st, ac, R[st, ac]


def log_probs(theta: Tensor, states: Tensor, actions: Tensor) -> Tensor:
    return torch.log_softmax(theta, -1)[states, actions]


# ---------------------------------------------------------------------- estimators

N, B = 400_000, 100
Z = 5.0  # tolerance in standard errors
Objective = Callable[[Tensor, Tensor, Tensor], Tensor]  # (log_probs, rewards, baseline) -> [B, n]


@pytest.fixture(scope="module")
def samples() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """States, actions, rewards (``[B, n, T]``) and the exact-value baseline ``V_t(s_t)``."""
    g = torch.Generator().manual_seed(1234)
    st, ac, rw = sample(THETA, N, g)
    base = values(THETA)[torch.arange(HORIZON), st]
    shape = (B, N // B, HORIZON)
    return st.reshape(shape), ac.reshape(shape), rw.reshape(shape), base.reshape(shape)


def _batched_log_probs(theta_b: Tensor, st: Tensor, ac: Tensor) -> Tensor:
    bi = torch.arange(B)[:, None, None]
    return torch.log_softmax(theta_b, -1)[bi, st, ac]


def batch_derivatives(objective: Objective, samples: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """Gradient ``[B, 2, 3]`` and Hessian ``[B, 2, 3, 2, 3]`` of each batch's mean objective.

    One view of theta per batch (``expand``): the gradient of the sum over batches with respect
    to the views is the stack of the batches' gradients, so 1 + 6 backward passes suffice.
    """
    st, ac, rw, base = samples
    theta = THETA.clone().requires_grad_(True)
    theta_b = theta.expand(B, *theta.shape)
    per_batch = objective(_batched_log_probs(theta_b, st, ac), rw, base).mean(1)
    (g,) = torch.autograd.grad(per_batch.sum(), theta_b, create_graph=True)
    rows = [
        torch.autograd.grad(g[:, i, j].sum(), theta_b, retain_graph=True)[0]
        for i in range(2)
        for j in range(3)
    ]
    return g.detach(), torch.stack(rows, 1).reshape(B, 2, 3, 2, 3)


def mean_se(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


def z_scores(estimate: Tensor, se: Tensor, exact: Tensor) -> Tensor:
    """|estimate - exact| / SE, entries with SE = 0 (structural zeros) compared exactly."""
    err = (estimate - exact).abs()
    return torch.where(se > 0, err / se.clamp_min(1e-300), err * 1e12)


def dice(lp: Tensor, rw: Tensor, base: Tensor) -> Tensor:
    return dice_objective(lp, rw, discount=GAMMA, reduction="none")


def dice_with_baseline(lp: Tensor, rw: Tensor, base: Tensor) -> Tensor:
    return dice_objective(lp, rw, baseline=base, discount=GAMMA, reduction="none")


def naive(lp: Tensor, rw: Tensor, base: Tensor) -> Tensor:
    return reinforce_surrogate(lp, rw, discount=GAMMA, reduction="none")


@pytest.fixture(scope="module")
def exact() -> tuple[Tensor, Tensor]:
    theta = THETA.clone()
    return jacobian(expected_return, theta), hessian(expected_return, theta)


@pytest.fixture(scope="module")
def plain_dice(samples: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    return batch_derivatives(dice, samples)


def test_closed_form_is_right(samples: tuple[Tensor, ...]) -> None:
    """The sampler and the closed form describe the same MDP: mean return within 5 SE."""
    rw = samples[2]
    disc = GAMMA ** torch.arange(HORIZON, dtype=DT)
    m, se = mean_se((rw * disc).sum(-1).mean(1))
    assert abs(float(m - expected_return(THETA))) < Z * float(se)


def test_dice_gradient_and_hessian_are_unbiased(
    plain_dice: tuple[Tensor, Tensor], exact: tuple[Tensor, Tensor]
) -> None:
    gs, hs = plain_dice
    (gm, gse), (hm, hse) = mean_se(gs), mean_se(hs)
    assert z_scores(gm, gse, exact[0]).max() < Z
    assert z_scores(hm, hse, exact[1]).max() < Z
    # the test has power: the Hessian is resolved to ~1% of its largest entry
    assert hse.max() < 0.03 * exact[1].abs().max()


def test_dice_baseline_keeps_every_order_unbiased_and_reduces_variance(
    samples: tuple[Tensor, ...], plain_dice: tuple[Tensor, Tensor], exact: tuple[Tensor, Tensor]
) -> None:
    gs, hs = batch_derivatives(dice_with_baseline, samples)
    (gm, gse), (hm, hse) = mean_se(gs), mean_se(hs)
    assert z_scores(gm, gse, exact[0]).max() < Z
    assert z_scores(hm, hse, exact[1]).max() < Z
    # Mao et al.'s term cancels variance at second order too (measured: 6x and 4x less)
    gse0, hse0 = mean_se(plain_dice[0])[1], mean_se(plain_dice[1])[1]
    assert gse.norm() < 0.3 * gse0.norm()
    assert hse.norm() < 0.4 * hse0.norm()


def test_first_order_baseline_reduces_only_first_order_variance(
    samples: tuple[Tensor, ...], plain_dice: tuple[Tensor, Tensor], exact: tuple[Tensor, Tensor]
) -> None:
    """Foerster et al.'s original term sum_t (1 - box(log pi_t)) b_t, for comparison: also
    unbiased, but the Hessian's standard error barely moves."""
    disc = GAMMA ** torch.arange(HORIZON, dtype=DT)

    def first_order_baseline(lp: Tensor, rw: Tensor, base: Tensor) -> Tensor:
        return dice(lp, rw, base) + ((1 - magic_box(lp)) * base * disc).sum(-1)

    gs, hs = batch_derivatives(first_order_baseline, samples)
    (gm, gse), (hm, hse) = mean_se(gs), mean_se(hs)
    assert z_scores(gm, gse, exact[0]).max() < Z
    assert z_scores(hm, hse, exact[1]).max() < Z
    hse0 = mean_se(plain_dice[1])[1]
    assert hse.norm() > 0.7 * hse0.norm()


def test_naive_surrogate_gradient_unbiased_but_hessian_biased(
    samples: tuple[Tensor, ...], exact: tuple[Tensor, Tensor]
) -> None:
    gs, hs = batch_derivatives(naive, samples)
    (gm, gse), (hm, hse) = mean_se(gs), mean_se(hs)
    assert z_scores(gm, gse, exact[0]).max() < Z  # first order: fine
    bias = (hm - exact[1]).abs()
    assert float(bias.max()) > 20 * float(hse.max())  # second order: biased beyond error bars
    assert float(bias.max()) > 0.5 * float(exact[1].abs().max())  # and not by a little


def test_dice_third_directional_derivative_is_unbiased(samples: tuple[Tensor, ...]) -> None:
    """d^3/de^3 J(theta + e v) at e = 0, exact by metagrad.nth_derivative of the closed form."""
    st, ac, rw, base = samples
    v = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]], dtype=DT)
    exact3 = nth_derivative(lambda e: expected_return(THETA + e * v), torch.zeros((), dtype=DT), 3)  # fmt: skip
    eps = torch.zeros(B, dtype=DT, requires_grad=True)
    theta_b = THETA + eps[:, None, None] * v
    d3 = dice_with_baseline(_batched_log_probs(theta_b, st, ac), rw, base).mean(1)
    for _ in range(3):  # each batch's objective depends on its own eps only
        (d3,) = torch.autograd.grad(d3.sum(), eps, create_graph=True)
    m, se = mean_se(d3.detach())
    assert abs(float(m - exact3)) < Z * float(se)
    assert float(se) < 0.1 * abs(float(exact3))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bandit_every_order(order: int) -> None:
    """Two-armed bandit, pi(1) = sigmoid(theta): J = r0 + (r1 - r0) sigmoid(theta)."""
    theta0, r = 0.3, torch.tensor([-0.5, 1.0], dtype=torch.float64) + 2.0
    n, b = 1_000_000, 100

    def closed_form(t: Tensor) -> Tensor:
        return r[0] + (r[1] - r[0]) * torch.sigmoid(t)

    exact_n = nth_derivative(closed_form, torch.tensor(theta0, dtype=torch.float64), order)
    s = math.exp(-theta0) / (1 + math.exp(-theta0)) ** 2  # sigmoid'(theta0), by hand
    if order == 1:
        assert abs(float(exact_n) - 1.5 * s) < 1e-12
    g = torch.Generator().manual_seed(order)
    a = (torch.rand(b, n // b, generator=g, dtype=torch.float64) < torch.sigmoid(torch.tensor(theta0))).long()  # fmt: skip
    eps = torch.zeros(b, dtype=torch.float64, requires_grad=True)
    logits = torch.stack([torch.zeros(b, dtype=torch.float64), theta0 + eps], -1)  # [b, 2]
    lp = torch.log_softmax(logits, -1).gather(1, a)[..., None]  # [b, n, 1]
    y = dice_objective(lp, r[a][..., None], reduction="none").mean(1)
    for _ in range(order):
        (y,) = torch.autograd.grad(y.sum(), eps, create_graph=True)
    m, se = mean_se(y.detach())
    assert abs(float(m) - float(exact_n)) < Z * float(se)
