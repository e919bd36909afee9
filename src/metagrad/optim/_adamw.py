"""AdamW: Adam with decoupled weight decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metagrad.optim._adam import _AdamFamily
from metagrad.optim._base import Hyper


@dataclass(frozen=True)
class AdamW(_AdamFamily):
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

    weight_decay: Hyper = 1e-2
    _decoupled: ClassVar[bool] = True
