"""MAML++: MAML with the stabilising pieces of *How to train your MAML*.

Turns on, together: per-layer per-step learned inner rates (LSLR), the annealed multi-step
loss (MSL), derivative-order annealing (first order for the first ``first_order_steps``
meta-steps) and per-step normalization weights and biases (BNWB, when the model has norm
layers). Each piece is also a plain option of :class:`metagrad.MAML`.

Reference: Antoniou, Edwards, Storkey, *How to train your MAML*, ICLR 2019.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metagrad._typing import LossFn
from metagrad.algorithms._maml import MAML
from metagrad.functional._model import norm_module_names


class MAMLpp(MAML):
    """``MAML`` with LSLR, multi-step loss, order annealing and per-step BN on by default."""

    fn_name = "metagrad.MAMLpp"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        order: int = 2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("learn_inner_lr", "per_step")
        kwargs.setdefault("multi_step_loss", True)
        kwargs.setdefault("first_order_steps", 50)
        has_norm_weights = any(
            p.requires_grad
            for m in norm_module_names(model)
            for p in model.get_submodule(m).parameters()
        )
        kwargs.setdefault("per_step_bn", has_norm_weights)
        super().__init__(model, loss_fn, inner_lr, inner_steps, order, **kwargs)
