"""A :mod:`metagrad.optim` optimizer driven in place, for the workloads' outer loops.

The workloads' outer updates (hyperparameters, synthetic images, the reweighted model's own
steps) need no differentiation, so they run the same pure ``init``/``update`` pairs as the
inner loops and write the result back into the leaf tensors. (``torch.optim`` would do as
well, but its first use imports ``torch._dynamo``: seconds on a small machine.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from metagrad.optim import Optimizer


class Stepper:
    """``step(grads)`` updates ``params`` in place with ``optimizer``; keeps its state."""

    def __init__(self, optimizer: Optimizer, params: dict[str, Tensor]) -> None:
        self.optimizer, self.params = optimizer, params
        self.state: Any = optimizer.init({k: v.detach() for k, v in params.items()})
        self.t = 0

    def step(self, grads: dict[str, Tensor]) -> None:
        with torch.no_grad():
            current = {k: v.detach() for k, v in self.params.items()}
            new, self.state = self.optimizer.update(grads, self.state, current, self.t)
            for k, v in self.params.items():
                v.copy_(new[k])
        self.t += 1

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate (state kept), e.g. to back off after a divergence."""
        lr = self.optimizer.lr  # type: ignore[attr-defined]
        self.optimizer = dataclasses.replace(self.optimizer, lr=lr * factor)  # type: ignore[type-var]
