"""Differentiable optimizers that mirror ``torch.optim`` as pure ``init``/``update`` pairs.

Each optimizer is a frozen dataclass whose ``update(grads, state, params, step, lrs=None)``
returns new parameters and state with out-of-place ops only, so a whole training trajectory
can be differentiated (``create_graph=True``, ``torch.func.grad``/``vmap``/``jvp``), including
with respect to hyperparameters given as tensors. Iterates equal ``torch.optim``'s.

Example:
    >>> import torch
    >>> from metagrad.optim import SGD, Group
    >>> opt = SGD(lr=0.1, groups=(Group("head", lr=0.5),))
    >>> params = {"body.w": torch.ones(1), "head.w": torch.ones(1)}
    >>> grads = {k: torch.ones(1) for k in params}
    >>> new, _ = opt.update(grads, opt.init(params), params, step=0)
    >>> new["body.w"], new["head.w"]
    (tensor([0.9000]), tensor([0.5000]))
"""

from __future__ import annotations

from metagrad.optim._adadelta import Adadelta, AdadeltaState
from metagrad.optim._adagrad import Adagrad, AdagradState
from metagrad.optim._adam import Adam, AdamState
from metagrad.optim._adamax import Adamax, AdamaxState
from metagrad.optim._adamw import AdamW
from metagrad.optim._asgd import ASGD, ASGDState
from metagrad.optim._base import LR, Group, Hyper, Optimizer, Params, Selector
from metagrad.optim._convert import from_torch
from metagrad.optim._rmsprop import RMSprop, RMSpropState
from metagrad.optim._rprop import Rprop, RpropState
from metagrad.optim._sgd import SGD, EmptyState, SGDState

__all__ = [
    "ASGD",
    "LR",
    "SGD",
    "ASGDState",
    "Adadelta",
    "AdadeltaState",
    "Adagrad",
    "AdagradState",
    "Adam",
    "AdamState",
    "AdamW",
    "Adamax",
    "AdamaxState",
    "EmptyState",
    "Group",
    "Hyper",
    "Optimizer",
    "Params",
    "RMSprop",
    "RMSpropState",
    "Rprop",
    "RpropState",
    "SGDState",
    "Selector",
    "from_torch",
]
