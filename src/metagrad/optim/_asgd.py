"""ASGD: SGD with a decaying step size and Polyak-Ruppert iterate averaging."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import NONNEG, Bound, OptimizerBase, add_decay, entry, signed


class ASGDState(NamedTuple):
    """The averaged iterate per parameter.

    torch also stores ``eta`` and ``mu``; they are functions of the step index and the
    hyperparameters, so they are recomputed (which keeps them differentiable).
    """

    ax: dict[str, Tensor]


@dataclass(frozen=True)
class ASGD(OptimizerBase):
    r"""Differentiable ``torch.optim.ASGD``.

    With :math:`g_t = \pm\nabla f(p_{t-1}) + \lambda_{wd} p_{t-1}` (minus when ``maximize``),
    1-based :math:`t`:

    .. math::
        \eta_t = \frac{\gamma}{(1 + \lambda\gamma (t-1))^{\alpha}},\qquad
        \mu_t = \frac{1}{\max(1,\ t - 1 - t_0)}\ \ (\mu_1 = 1)

    .. math::
        p_t = p_{t-1}(1 - \lambda\eta_t) - \eta_t g_t,\qquad
        a_t = a_{t-1} + \mu_t (p_t - a_{t-1})

    The returned parameters are :math:`p_t`; the average :math:`a_t` is ``state.ax``.

    Args:
        lr: Learning rate :math:`\gamma`.
        lambd: Decay term :math:`\lambda`.
        alpha: Power :math:`\alpha` of the step-size decay.
        t0: Step :math:`t_0` at which averaging starts.
        weight_decay: L2 penalty :math:`\lambda_{wd}`.
        maximize: Ascend instead of descend.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr`` or ``weight_decay``.

    Example:
        >>> import torch
        >>> opt = ASGD(lr=0.1, lambd=0.0)
        >>> params = {"w": torch.tensor([1.0])}
        >>> params, state = opt.update({"w": torch.tensor([2.0])}, opt.init(params), params, 0)
        >>> params["w"], state.ax["w"]
        (tensor([0.8000]), tensor([0.8000]))

    References:
        Polyak, Juditsky, *Acceleration of Stochastic Approximation by Averaging*, 1992.
    """

    lr: Hyper = 1e-2
    lambd: Hyper = 1e-4
    alpha: Hyper = 0.75
    t0: Hyper = 1e6
    weight_decay: Hyper = 0.0
    maximize: bool = False
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "lambd", "alpha", "t0", "weight_decay")
    _flags = ("maximize",)
    _bounds: ClassVar[Mapping[str, Bound]] = {"lr": NONNEG, "weight_decay": NONNEG}

    def init(self, params: Params) -> ASGDState:
        """Zero averages."""
        return ASGDState(ax={k: torch.zeros_like(p) for k, p in params.items()})

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, ASGDState]:
        """One ASGD step; see the class docstring for the rule."""
        step = self._check_inputs(grads, params, step)
        out: Params = {}
        new = ASGDState({})
        for k, p in params.items():
            h = self._config(k, p, lrs)
            g = add_decay(signed(grads[k], h["maximize"]), p, h["weight_decay"])
            lr, lambd, t0 = h["lr"], h["lambd"], h["t0"]
            eta = lr / (1 + lambd * lr * step) ** h["alpha"]
            p_new = p * (1 - lambd * eta) - eta * g
            ax = entry(self._fn, state, "ax", k)
            if step == 0:
                mu: Any = 1.0  # torch starts mu at 1 whatever t0 is
            elif isinstance(t0, Tensor):
                mu = 1 / torch.clamp(step - t0, min=1)
            else:
                mu = 1 / max(1, step - t0)
            # torch copies the iterate while mu == 1, rather than interpolating.
            new.ax[k] = p_new if not isinstance(mu, Tensor) and mu == 1 else ax + (p_new - ax) * mu
            out[k] = p_new
        return out, new
