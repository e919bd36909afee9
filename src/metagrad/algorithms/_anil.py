"""ANIL (Almost No Inner Loop): adapt only the head; the body is meta-learned only.

Reference: Raghu, Raghu, Bengio, Vinyals, *Rapid Learning or Feature Reuse?*, ICLR 2020.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metagrad._typing import LossFn
from metagrad.algorithms._base import Selector
from metagrad.algorithms._maml import MAML


class ANIL(MAML):
    """``MAML(..., adapt=head)``: ``head`` selects the adapted parameters (prefix, names or predicate).

    The body still receives the exact meta-gradient through the query loss (and, at second
    order, through the head's inner gradients, which depend on the body's features).
    """

    fn_name = "metagrad.ANIL"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        head: Selector,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        order: int = 2,
        **kwargs: Any,
    ) -> None:
        if head is None:
            raise ValueError(
                "metagrad.ANIL: head=None would adapt every parameter (that is MAML); pass the "
                "head's module prefix, e.g. head='classifier'."
            )
        super().__init__(model, loss_fn, inner_lr, inner_steps, order, adapt=head, **kwargs)
