"""The functional core: pure functions over parameter dicts (``torch.func.functional_call``)."""

from __future__ import annotations

from metagrad.functional._inner import InnerSpec, run_task
from metagrad.functional._meta import MetaResult, meta_gradient
from metagrad.functional._model import FunctionalModel
from metagrad.functional._optim import SGD, Adam, InnerOptimizer, Momentum

__all__ = [
    "SGD",
    "Adam",
    "FunctionalModel",
    "InnerOptimizer",
    "InnerSpec",
    "MetaResult",
    "Momentum",
    "meta_gradient",
    "run_task",
]
