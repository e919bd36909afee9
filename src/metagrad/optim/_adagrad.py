"""Adagrad with learning-rate decay."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import NONNEG, Bound, OptimizerBase, add_decay, entry, is_off, signed


class AdagradState(NamedTuple):
    """The running sum of squared gradients per parameter."""

    sum: dict[str, Tensor]


@dataclass(frozen=True)
class Adagrad(OptimizerBase):
    r"""Differentiable ``torch.optim.Adagrad``.

    With :math:`g_t = \pm\nabla f(p_{t-1}) + \lambda p_{t-1}` (minus when ``maximize``) and
    :math:`s_0` = ``initial_accumulator_value``:

    .. math::
        \tilde\gamma_t = \frac{\gamma}{1 + (t-1)\eta},\qquad
        s_t = s_{t-1} + g_t^2,\qquad
        p_t = p_{t-1} - \tilde\gamma_t \frac{g_t}{\sqrt{s_t} + \epsilon}

    Args:
        lr: Learning rate :math:`\gamma`.
        lr_decay: Learning-rate decay :math:`\eta`.
        weight_decay: L2 penalty :math:`\lambda`.
        initial_accumulator_value: :math:`s_0`; a tensor enters through :meth:`init`.
        eps: :math:`\epsilon`.
        maximize: Ascend instead of descend.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: Any negative hyperparameter.

    Example:
        >>> import torch
        >>> opt = Adagrad(lr=0.5, eps=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> params, state = opt.update({"w": torch.tensor([4.0])}, opt.init(params), params, 0)
        >>> params["w"]
        tensor([0.5000])

    References:
        Duchi, Hazan, Singer, *Adaptive Subgradient Methods for Online Learning and Stochastic
        Optimization*, JMLR 2011.
    """

    lr: Hyper = 1e-2
    lr_decay: Hyper = 0.0
    weight_decay: Hyper = 0.0
    initial_accumulator_value: Hyper = 0.0
    eps: Hyper = 1e-10
    maximize: bool = False
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    _flags = ("maximize",)
    _bounds: ClassVar[Mapping[str, Bound]] = {k: NONNEG for k in _hypers}

    def init(self, params: Params) -> AdagradState:
        """Accumulators filled with ``initial_accumulator_value``."""
        return AdagradState(
            sum={
                k: torch.zeros_like(p) + self._config(k, p, None)["initial_accumulator_value"]
                for k, p in params.items()
            }
        )

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, AdagradState]:
        """One Adagrad step; see the class docstring for the rule."""
        step = self._check_inputs(grads, params, step)
        out: Params = {}
        new = AdagradState({})
        for k, p in params.items():
            h = self._config(k, p, lrs)
            g = add_decay(signed(grads[k], h["maximize"]), p, h["weight_decay"])
            clr = h["lr"] if is_off(h["lr_decay"]) else h["lr"] / (1 + step * h["lr_decay"])
            s = entry(self._fn, state, "sum", k) + g * g
            new.sum[k] = s
            out[k] = p - clr * (g / (torch.sqrt(s) + h["eps"]))
        return out, new
