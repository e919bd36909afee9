"""Adam (and the shared step of AdamW), with AMSGrad and optax's ``eps_root``."""

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
    UNIT_OPEN,
    Bound,
    OptimizerBase,
    add_decay,
    entry,
    is_off,
    signed,
)


class AdamState(NamedTuple):
    """Adam's moments per parameter; ``max_exp_avg_sq`` only for the ``amsgrad`` ones."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    max_exp_avg_sq: dict[str, Tensor]


ADAM_BOUNDS: Mapping[str, Bound] = {
    "lr": NONNEG,
    "betas.0": UNIT_OPEN,
    "betas.1": UNIT_OPEN,
    "eps": NONNEG,
    "weight_decay": NONNEG,
    "eps_root": NONNEG,
}


def adam_init(opt: OptimizerBase, params: Params) -> AdamState:
    """Zero moments (and zero running maxima for the ``amsgrad`` parameters)."""
    return AdamState(
        exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
        exp_avg_sq={k: torch.zeros_like(p) for k, p in params.items()},
        max_exp_avg_sq={
            k: torch.zeros_like(p) for k, p in params.items() if opt._config(k, p, None)["amsgrad"]
        },
    )


def adam_update(
    opt: OptimizerBase,
    grads: Params,
    state: AdamState,
    params: Params,
    step: int,
    lrs: Mapping[str, LR] | None,
    decoupled: bool,
) -> tuple[Params, AdamState]:
    """One Adam step; ``decoupled`` selects AdamW's weight decay ``p (1 - lr wd)``."""
    step = opt._check_inputs(grads, params, step)
    t = step + 1
    fn = opt._fn
    out: Params = {}
    new = AdamState({}, {}, {})
    for k, p in params.items():
        h = opt._config(k, p, lrs)
        g = signed(grads[k], h["maximize"])
        lr, wd, (b1, b2) = h["lr"], h["weight_decay"], h["betas"]
        base = p
        if decoupled:
            base = p if is_off(wd) else p * (1 - lr * wd)
        else:
            g = add_decay(g, p, wd)
        m_prev, v_prev = entry(fn, state, "exp_avg", k), entry(fn, state, "exp_avg_sq", k)
        if isinstance(b1, Tensor) or isinstance(b2, Tensor):
            m = b1 * m_prev + (1 - b1) * g
            v = b2 * v_prev + (1 - b2) * (g * g)
        else:  # torch.optim.Adam's fused ops: fewer graph nodes, the same arithmetic as torch
            m = torch.lerp(m_prev, g, 1 - b1)
            v = torch.addcmul(v_prev * b2, g, g, value=1 - b2)
        new.exp_avg[k], new.exp_avg_sq[k] = m, v
        if h["amsgrad"]:
            # The running maximum of the raw second moment, as torch keeps it.
            v = torch.maximum(entry(fn, state, "max_exp_avg_sq", k), v)
            new.max_exp_avg_sq[k] = v
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        if is_off(h["eps_root"]):
            # torch's order of operations: sqrt(v) / sqrt(1 - b2^t) + eps.
            denom = torch.sqrt(v) / bc2**0.5 + h["eps"]
        else:
            denom = torch.sqrt(v / bc2 + h["eps_root"]) + h["eps"]
        if isinstance(lr, Tensor) or isinstance(bc1, Tensor):
            out[k] = base - (lr / bc1) * (m / denom)
        else:
            out[k] = torch.addcdiv(base, m, denom, value=-(lr / bc1))
    return out, new


@dataclass(frozen=True)
class _AdamFamily(OptimizerBase):
    """Fields and steps shared by :class:`Adam` and :class:`~metagrad.optim.AdamW`."""

    lr: Hyper = 1e-3
    betas: tuple[Hyper, Hyper] = (0.9, 0.999)
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.0
    amsgrad: bool = False
    maximize: bool = False
    eps_root: Hyper = 0.0
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "betas", "eps", "weight_decay", "eps_root")
    _pairs = frozenset({"betas"})
    _flags = ("amsgrad", "maximize")
    _bounds: ClassVar[Mapping[str, Bound]] = ADAM_BOUNDS
    _decoupled: ClassVar[bool] = False  # AdamW: the decay shrinks the parameter

    def init(self, params: Params) -> AdamState:
        """Zero first and second moments."""
        return adam_init(self, params)

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, AdamState]:
        """One step; see the class docstring for the rule."""
        return adam_update(self, grads, state, params, step, lrs, decoupled=self._decoupled)


@dataclass(frozen=True)
class Adam(_AdamFamily):
    r"""Differentiable ``torch.optim.Adam`` (plus optax's ``eps_root``).

    With :math:`g_t = \pm\nabla f(p_{t-1}) + \lambda p_{t-1}` (minus when ``maximize``):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\qquad
        \hat v_t = \frac{v_t}{1-\beta_2^t}\ \ (\text{amsgrad: } \max_{s\le t} v_s
        \text{ in place of } v_t)

    .. math::
        p_t = p_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    ``eps_root = 0`` is torch's Adam. The derivative of :math:`\sqrt{v}` is infinite at
    :math:`v = 0` (a gradient that is exactly zero), which makes second-order meta-gradients
    NaN; ``eps=0, eps_root>0`` (e.g. ``1e-8``) keeps the update smooth there.

    Args:
        lr: Learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon`, added outside the square root.
        weight_decay: L2 penalty :math:`\lambda` (added to the gradient).
        amsgrad: Normalize by the running maximum of :math:`v`.
        maximize: Ascend instead of descend.
        eps_root: :math:`\epsilon_{root}`, added inside the square root.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr``, ``eps``, ``eps_root`` or ``weight_decay``, or a beta
            outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> opt = Adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0])}
        >>> params, state = opt.update({"w": torch.tensor([3.0])}, opt.init(params), params, 0)
        >>> params["w"]
        tensor([0.9000])

    References:
        Kingma, Ba, *Adam: A Method for Stochastic Optimization*, 2015; Reddi, Kale, Kumar,
        *On the Convergence of Adam and Beyond*, 2018 (AMSGrad).
    """
