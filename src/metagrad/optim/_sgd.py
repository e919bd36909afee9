"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import NONNEG, Bound, OptimizerBase, add_decay, entry, is_off, signed


class EmptyState(NamedTuple):
    """The state of an optimizer that keeps none (SGD without momentum)."""


class SGDState(NamedTuple):
    """SGD's state when momentum is on: one buffer per parameter that uses momentum."""

    momentum_buffer: dict[str, Tensor]


@dataclass(frozen=True)
class SGD(OptimizerBase):
    r"""Differentiable ``torch.optim.SGD``.

    With :math:`g_t = \pm\nabla f(p_{t-1}) + \lambda p_{t-1}` (minus when ``maximize``):

    .. math::
        b_t = \begin{cases} g_t & t = 1 \\ \mu b_{t-1} + (1-\tau) g_t & t > 1 \end{cases}
        \qquad
        d_t = \begin{cases} g_t + \mu b_t & \text{nesterov} \\ b_t & \text{otherwise}
        \end{cases}
        \qquad p_t = p_{t-1} - \gamma d_t

    and :math:`d_t = g_t` when :math:`\mu = 0`.

    Args:
        lr: Learning rate :math:`\gamma`.
        momentum: Momentum factor :math:`\mu`.
        dampening: Dampening :math:`\tau` of the momentum.
        weight_decay: L2 penalty :math:`\lambda`.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        maximize: Ascend instead of descend.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr``, ``momentum`` or ``weight_decay``, or ``nesterov``
            without momentum or with dampening.

    Example:
        >>> import torch
        >>> opt = SGD(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([2.0])}, state, params, step=0)
        >>> params["w"]
        tensor([0.8000])
    """

    lr: Hyper = 1e-3
    momentum: Hyper = 0.0
    dampening: Hyper = 0.0
    weight_decay: Hyper = 0.0
    nesterov: bool = False
    maximize: bool = False
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "momentum", "dampening", "weight_decay")
    _flags = ("nesterov", "maximize")
    _bounds: ClassVar[Mapping[str, Bound]] = {
        "lr": NONNEG,
        "momentum": NONNEG,
        "weight_decay": NONNEG,
    }

    def _check_config(self, cfg: dict[str, Any], where: str) -> None:
        if not cfg["nesterov"]:
            return
        damped = not is_off(cfg["dampening"]) and not isinstance(cfg["dampening"], Tensor)
        if is_off(cfg["momentum"]) or damped:
            raise ValueError(
                f"{self._fn}: nesterov=True{where} needs momentum > 0 and dampening == 0 (got "
                f"momentum={cfg['momentum']!r}, dampening={cfg['dampening']!r}); set a momentum "
                f"such as 0.9 and dampening=0, or nesterov=False."
            )

    def init(self, params: Params) -> SGDState | EmptyState:
        """Zero momentum buffers for the parameters that use momentum (none: ``EmptyState``)."""
        bufs = {
            k: torch.zeros_like(p)
            for k, p in params.items()
            if not is_off(self._config(k, p, None)["momentum"])
        }
        return SGDState(momentum_buffer=bufs) if bufs else EmptyState()

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, SGDState | EmptyState]:
        """One SGD step; see the class docstring for the rule."""
        step = self._check_inputs(grads, params, step)
        out: Params = {}
        bufs: dict[str, Tensor] = {}
        for k, p in params.items():
            h = self._config(k, p, lrs)
            d = add_decay(signed(grads[k], h["maximize"]), p, h["weight_decay"])
            mu = h["momentum"]
            if not is_off(mu):
                if step == 0:
                    # torch.optim.SGD seeds the buffer with the first gradient, undamped.
                    buf = d
                else:
                    prev = mu * entry(self._fn, state, "momentum_buffer", k)
                    damp = h["dampening"]
                    # A Python dampening folds into add's alpha: one graph node fewer per step.
                    if isinstance(damp, Tensor):
                        buf = prev + (1 - damp) * d
                    else:
                        buf = torch.add(prev, d, alpha=1 - damp)
                bufs[k] = buf
                d = d + mu * buf if h["nesterov"] else buf
            lr = h["lr"]
            # A Python lr folds into add's alpha, as torch.optim.SGD's p.add_(d, alpha=-lr): one
            # graph node per parameter and step instead of two.
            out[k] = p - lr * d if isinstance(lr, Tensor) else torch.add(p, d, alpha=-lr)
        return out, (SGDState(momentum_buffer=bufs) if bufs else EmptyState())
