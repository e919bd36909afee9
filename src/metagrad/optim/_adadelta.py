"""Adadelta."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import (
    NONNEG,
    UNIT_CLOSED,
    Bound,
    OptimizerBase,
    add_decay,
    entry,
    signed,
)


class AdadeltaState(NamedTuple):
    """Running averages of squared gradients and squared updates per parameter."""

    square_avg: dict[str, Tensor]
    acc_delta: dict[str, Tensor]


@dataclass(frozen=True)
class Adadelta(OptimizerBase):
    r"""Differentiable ``torch.optim.Adadelta``.

    With :math:`g_t = \pm\nabla f(p_{t-1}) + \lambda p_{t-1}` (minus when ``maximize``):

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2,\qquad
        \Delta_t = \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t,\qquad
        u_t = \rho u_{t-1} + (1-\rho) \Delta_t^2,\qquad
        p_t = p_{t-1} - \gamma \Delta_t

    Args:
        lr: Coefficient :math:`\gamma` that scales the delta.
        rho: Averaging coefficient :math:`\rho` in ``[0, 1]``.
        eps: :math:`\epsilon`, added inside both roots.
        weight_decay: L2 penalty :math:`\lambda`.
        maximize: Ascend instead of descend.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr``, ``eps`` or ``weight_decay``, or ``rho`` outside
            ``[0, 1]``.

    Example:
        >>> import torch
        >>> opt = Adadelta(rho=0.0, eps=1e-2)
        >>> params = {"w": torch.tensor([1.0])}
        >>> params, state = opt.update({"w": torch.tensor([1.0])}, opt.init(params), params, 0)
        >>> params["w"].round(decimals=4)
        tensor([0.9005])

    References:
        Zeiler, *ADADELTA: An Adaptive Learning Rate Method*, 2012.
    """

    lr: Hyper = 1.0
    rho: Hyper = 0.9
    eps: Hyper = 1e-6
    weight_decay: Hyper = 0.0
    maximize: bool = False
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "rho", "eps", "weight_decay")
    _flags = ("maximize",)
    _bounds: ClassVar[Mapping[str, Bound]] = {
        "lr": NONNEG,
        "rho": UNIT_CLOSED,
        "eps": NONNEG,
        "weight_decay": NONNEG,
    }

    def init(self, params: Params) -> AdadeltaState:
        """Zero running averages."""
        return AdadeltaState(
            square_avg={k: torch.zeros_like(p) for k, p in params.items()},
            acc_delta={k: torch.zeros_like(p) for k, p in params.items()},
        )

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, AdadeltaState]:
        """One Adadelta step; see the class docstring for the rule."""
        self._check_inputs(grads, params, step)
        out: Params = {}
        new = AdadeltaState({}, {})
        for k, p in params.items():
            h = self._config(k, p, lrs)
            g = add_decay(signed(grads[k], h["maximize"]), p, h["weight_decay"])
            rho, eps = h["rho"], h["eps"]
            v = rho * entry(self._fn, state, "square_avg", k) + (1 - rho) * (g * g)
            u = entry(self._fn, state, "acc_delta", k)
            delta = torch.sqrt(u + eps) / torch.sqrt(v + eps) * g
            new.square_avg[k] = v
            new.acc_delta[k] = rho * u + (1 - rho) * (delta * delta)
            out[k] = p - h["lr"] * delta
        return out, new
