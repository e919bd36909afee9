"""RMSprop, optionally centered and with momentum."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import NONNEG, Bound, OptimizerBase, add_decay, entry, is_off, signed


class RMSpropState(NamedTuple):
    """Running averages per parameter; ``grad_avg`` for centered, ``momentum_buffer`` for
    momentum parameters only."""

    square_avg: dict[str, Tensor]
    grad_avg: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]


@dataclass(frozen=True)
class RMSprop(OptimizerBase):
    r"""Differentiable ``torch.optim.RMSprop``.

    With :math:`g_t = \pm\nabla f(p_{t-1}) + \lambda p_{t-1}` (minus when ``maximize``):

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\qquad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t,\qquad
        s_t = \sqrt{v_t - [\text{centered}]\,\bar g_t^2} + \epsilon

    .. math::
        b_t = \mu b_{t-1} + g_t / s_t,\qquad p_t = p_{t-1} - \gamma b_t

    (:math:`p_t = p_{t-1} - \gamma g_t / s_t` when :math:`\mu = 0`).

    Args:
        lr: Learning rate :math:`\gamma`.
        alpha: Smoothing constant :math:`\alpha`.
        eps: :math:`\epsilon`, added to the root.
        weight_decay: L2 penalty :math:`\lambda`.
        momentum: Momentum factor :math:`\mu`.
        centered: Normalize by the estimated variance instead of the second moment.
        maximize: Ascend instead of descend.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr``, ``alpha``, ``eps``, ``weight_decay`` or ``momentum``.

    Example:
        >>> import torch
        >>> opt = RMSprop(lr=0.01, alpha=0.75, eps=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> params, state = opt.update({"w": torch.tensor([2.0])}, opt.init(params), params, 0)
        >>> params["w"]
        tensor([0.9800])

    References:
        Tieleman, Hinton, *Lecture 6.5, RMSprop*, COURSERA: Neural Networks for Machine
        Learning, 2012; Graves, *Generating Sequences With Recurrent Neural Networks*, 2013.
    """

    lr: Hyper = 1e-2
    alpha: Hyper = 0.99
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.0
    momentum: Hyper = 0.0
    centered: bool = False
    maximize: bool = False
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "alpha", "eps", "weight_decay", "momentum")
    _flags = ("centered", "maximize")
    _bounds: ClassVar[Mapping[str, Bound]] = {k: NONNEG for k in _hypers}

    def init(self, params: Params) -> RMSpropState:
        """Zero averages and buffers."""
        cfg = {k: self._config(k, p, None) for k, p in params.items()}
        return RMSpropState(
            square_avg={k: torch.zeros_like(p) for k, p in params.items()},
            grad_avg={k: torch.zeros_like(p) for k, p in params.items() if cfg[k]["centered"]},
            momentum_buffer={
                k: torch.zeros_like(p) for k, p in params.items() if not is_off(cfg[k]["momentum"])
            },
        )

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, RMSpropState]:
        """One RMSprop step; see the class docstring for the rule."""
        self._check_inputs(grads, params, step)
        fn = self._fn
        out: Params = {}
        new = RMSpropState({}, {}, {})
        for k, p in params.items():
            h = self._config(k, p, lrs)
            g = add_decay(signed(grads[k], h["maximize"]), p, h["weight_decay"])
            alpha = h["alpha"]
            v = alpha * entry(fn, state, "square_avg", k) + (1 - alpha) * (g * g)
            new.square_avg[k] = v
            if h["centered"]:
                gbar = alpha * entry(fn, state, "grad_avg", k) + (1 - alpha) * g
                new.grad_avg[k] = gbar
                v = v - gbar * gbar
            d = g / (torch.sqrt(v) + h["eps"])
            if not is_off(h["momentum"]):
                d = h["momentum"] * entry(fn, state, "momentum_buffer", k) + d
                new.momentum_buffer[k] = d
            out[k] = p - h["lr"] * d
        return out, new
