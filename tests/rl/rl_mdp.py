"""A small discrete MDP whose expected return is an explicit function of the policy.

Two states, three actions, horizon 4, discount 0.9, a tabular softmax policy ``theta[s, a]``.
``expected_return`` evaluates :math:`J(\\theta) = \\mathbb{E} \\sum_t \\gamma^t r(s_t, a_t)`
exactly by propagating the state distribution (differentiable, float64); ``sample`` draws
trajectories with the same dynamics, vectorized; ``log_probs`` recomputes
:math:`\\log \\pi_\\theta(a_t \\mid s_t)` of sampled actions from ``theta``.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
