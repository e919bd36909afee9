"""AdamW: Adam with decoupled weight decay."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from metagrad._typing import Params
from metagrad.optim._adam import ADAM_BOUNDS, AdamState, adam_init, adam_update
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import Bound, OptimizerBase


@dataclass(frozen=True)
class AdamW(OptimizerBase):
    r"""Differentiable ``torch.optim.AdamW``: Adam whose weight decay shrinks the parameter.

    With :math:`g_t = \pm\nabla f(p_{t-1})` and :math:`m_t, \hat v_t` as in
    :class:`~metagrad.optim.Adam`:

    .. math::
        p_t = p_{t-1}(1 - \gamma\lambda) - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    The decay factor :math:`1 - \gamma\lambda` uses the learning rate, as current
    ``torch.optim.AdamW`` does (the ``higher`` library's copy of an older torch differs).

    Args:
        lr: Learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon`, added outside the square root.
        weight_decay: Decoupled decay :math:`\lambda`.
        amsgrad: Normalize by the running maximum of :math:`v`.
        maximize: Ascend instead of descend.
        eps_root: :math:`\epsilon_{root}`, added inside the square root.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr``, ``eps``, ``eps_root`` or ``weight_decay``, or a beta
            outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> opt = AdamW(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([1.0])}
        >>> params, state = opt.update({"w": torch.tensor([3.0])}, opt.init(params), params, 0)
        >>> params["w"]
        tensor([0.8500])

    References:
        Loshchilov, Hutter, *Decoupled Weight Decay Regularization*, 2019.
    """

    lr: Hyper = 1e-3
    betas: tuple[Hyper, Hyper] = (0.9, 0.999)
    eps: Hyper = 1e-8
    weight_decay: Hyper = 1e-2
    amsgrad: bool = False
    maximize: bool = False
    eps_root: Hyper = 0.0
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "betas", "eps", "weight_decay", "eps_root")
    _pairs = frozenset({"betas"})
    _flags = ("amsgrad", "maximize")
    _bounds: ClassVar[Mapping[str, Bound]] = ADAM_BOUNDS

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
        """One AdamW step; see the class docstring for the rule."""
        return adam_update(self, grads, state, params, step, lrs, decoupled=True)
