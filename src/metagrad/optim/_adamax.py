"""Adamax: Adam with an infinity-norm second moment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import NONNEG, UNIT_OPEN, Bound, OptimizerBase, add_decay, entry, signed


class AdamaxState(NamedTuple):
    """First moment and exponentially weighted infinity norm per parameter."""

    exp_avg: dict[str, Tensor]
    exp_inf: dict[str, Tensor]


@dataclass(frozen=True)
class Adamax(OptimizerBase):
    r"""Differentiable ``torch.optim.Adamax``.

    With :math:`g_t = \pm\nabla f(p_{t-1}) + \lambda p_{t-1}` (minus when ``maximize``):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        u_t = \max(\beta_2 u_{t-1},\ |g_t| + \epsilon),\qquad
        p_t = p_{t-1} - \frac{\gamma}{1-\beta_1^t} \frac{m_t}{u_t}

    Args:
        lr: Learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon`.
        weight_decay: L2 penalty :math:`\lambda`.
        maximize: Ascend instead of descend.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr``, ``eps`` or ``weight_decay``, or a beta outside
            ``[0, 1)``.

    Example:
        >>> import torch
        >>> opt = Adamax(lr=0.1, eps=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> params, state = opt.update({"w": torch.tensor([-3.0])}, opt.init(params), params, 0)
        >>> params["w"]
        tensor([1.1000])

    References:
        Kingma, Ba, *Adam: A Method for Stochastic Optimization*, 2015, section 7.
    """

    lr: Hyper = 2e-3
    betas: tuple[Hyper, Hyper] = (0.9, 0.999)
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.0
    maximize: bool = False
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "betas", "eps", "weight_decay")
    _pairs = frozenset({"betas"})
    _flags = ("maximize",)
    _bounds: ClassVar[Mapping[str, Bound]] = {
        "lr": NONNEG,
        "betas.0": UNIT_OPEN,
        "betas.1": UNIT_OPEN,
        "eps": NONNEG,
        "weight_decay": NONNEG,
    }

    def init(self, params: Params) -> AdamaxState:
        """Zero moments."""
        return AdamaxState(
            exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
            exp_inf={k: torch.zeros_like(p) for k, p in params.items()},
        )

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, AdamaxState]:
        """One Adamax step; see the class docstring for the rule."""
        step = self._check_inputs(grads, params, step)
        out: Params = {}
        new = AdamaxState({}, {})
        for k, p in params.items():
            h = self._config(k, p, lrs)
            g = add_decay(signed(grads[k], h["maximize"]), p, h["weight_decay"])
            b1, b2 = h["betas"]
            m = b1 * entry(self._fn, state, "exp_avg", k) + (1 - b1) * g
            u = torch.maximum(b2 * entry(self._fn, state, "exp_inf", k), torch.abs(g) + h["eps"])
            new.exp_avg[k], new.exp_inf[k] = m, u
            out[k] = p - (h["lr"] / (1 - b1 ** (step + 1))) * (m / u)
        return out, new
