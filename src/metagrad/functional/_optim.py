"""Differentiable inner-loop optimizers as pure ``init``/``update`` pairs (optax style).

Every update is written with out-of-place tensor ops so that, with ``create_graph=True`` (or
under ``torch.func.grad``), the meta-gradient flows through the whole optimizer trajectory.
Learning rates multiply the optimizer's direction and may be learned tensors (Meta-SGD, LSLR).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from metagrad._typing import Params

OptState = dict[str, Tensor]
LR = float | Tensor


class InnerOptimizer(Protocol):
    """A differentiable optimizer for the inner loop.

    ``update`` returns the new parameters ``p - lr[name] * direction[name]`` and the new state;
    it must be a pure function of its inputs (no in-place writes).
    """

    name: str

    def init(self, params: Params) -> OptState: ...

    def update(
        self, grads: Params, state: OptState, params: Params, lrs: dict[str, LR], step: int
    ) -> tuple[Params, OptState]: ...


@dataclass(frozen=True)
class SGD:
    r"""Plain gradient descent, :math:`t_{k+1} = t_k - a_k \nabla L_s(t_k)` (MAML's inner loop)."""

    name: str = "sgd"

    def __post_init__(self) -> None:
        _deprecated("SGD", "metagrad.optim.SGD()")

    def init(self, params: Params) -> OptState:
        return {}

    def update(
        self, grads: Params, state: OptState, params: Params, lrs: dict[str, LR], step: int
    ) -> tuple[Params, OptState]:
        return {k: p - lrs[k] * grads[k] for k, p in params.items()}, state


@dataclass(frozen=True)
class Momentum:
    r"""Heavy-ball momentum, :math:`m_{k+1} = \beta m_k + g_k,\ t_{k+1} = t_k - a_k m_{k+1}`."""

    beta: float = 0.9
    nesterov: bool = False
    name: str = "momentum"

    def __post_init__(self) -> None:
        _deprecated("Momentum", "metagrad.optim.SGD(momentum=beta, nesterov=...)")

    def init(self, params: Params) -> OptState:
        return {k: torch.zeros_like(p) for k, p in params.items()}

    def update(
        self, grads: Params, state: OptState, params: Params, lrs: dict[str, LR], step: int
    ) -> tuple[Params, OptState]:
        m = {k: self.beta * state[k] + grads[k] for k in params}
        d = {k: grads[k] + self.beta * m[k] for k in params} if self.nesterov else m
        return {k: p - lrs[k] * d[k] for k, p in params.items()}, m


@dataclass(frozen=True)
class Adam:
    r"""Adam with ``eps`` *inside* the square root.

    .. math::
        m_k = b_1 m_{k-1} + (1-b_1) g_k,\quad v_k = b_2 v_{k-1} + (1-b_2) g_k^2,\quad
        t_{k+1} = t_k - a_k \frac{\hat m_k}{\sqrt{\hat v_k + \epsilon}}

    Standard Adam's :math:`\sqrt{\hat v}+\epsilon` has an infinite derivative at
    :math:`v = 0` (any parameter whose gradient is exactly zero), which turns the second-order
    meta-gradient into NaN; :math:`\sqrt{\hat v+\epsilon}` is smooth everywhere.
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    name: str = "adam"

    def __post_init__(self) -> None:
        _deprecated("Adam", "metagrad.optim.Adam(betas=(b1, b2), eps=0.0, eps_root=eps)")

    def init(self, params: Params) -> OptState:
        state = {f"m.{k}": torch.zeros_like(p) for k, p in params.items()}
        state.update({f"v.{k}": torch.zeros_like(p) for k, p in params.items()})
        return state

    def update(
        self, grads: Params, state: OptState, params: Params, lrs: dict[str, LR], step: int
    ) -> tuple[Params, OptState]:
        t = step + 1
        new_state: OptState = {}
        out: Params = {}
        for k, p in params.items():
            m = self.b1 * state[f"m.{k}"] + (1 - self.b1) * grads[k]
            v = self.b2 * state[f"v.{k}"] + (1 - self.b2) * grads[k] * grads[k]
            m_hat = m / (1 - self.b1**t)
            v_hat = v / (1 - self.b2**t)
            out[k] = p - lrs[k] * m_hat / torch.sqrt(v_hat + self.eps)
            new_state[f"m.{k}"], new_state[f"v.{k}"] = m, v
        return out, new_state


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"metagrad.{old} is deprecated; use {new} (metagrad.optim mirrors torch.optim and "
        f"works in metagrad.bilevel too).",
        DeprecationWarning,
        stacklevel=4,
    )
