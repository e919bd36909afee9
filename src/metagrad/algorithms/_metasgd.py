"""Meta-SGD: MAML with a learned inner learning rate for every parameter element.

.. math:: \\theta'_i = \\theta - \\alpha \\odot \\nabla_\\theta L^s_i(\\theta),\\quad
   (\\theta, \\alpha) \\leftarrow \\text{meta-update}

Reference: Li, Zhou, Chen, Li, *Meta-SGD: Learning to Learn Quickly for Few-Shot Learning*, 2017.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metagrad._typing import LossFn
from metagrad.algorithms._maml import MAML


class MetaSGD(MAML):
    """``MAML(..., learn_inner_lr="per_param")``: ``inner_lr`` is the initial value of every rate.

    The learned rates are ``learner.inner_lrs`` (in ``learner.parameters()``).
    """

    fn_name = "metagrad.MetaSGD"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("learn_inner_lr", "per_param")
        super().__init__(model, loss_fn, inner_lr, inner_steps, order, **kwargs)
