"""The model side: a pure-function view of a user's module (``torch.func.functional_call``).

:class:`FunctionalModel` runs a private copy of the module with given parameters, with the
model rewrites (channels-last, BatchNorm double backward) and the vmap-safety rules. How the
inner loop is differentiated lives in :mod:`metagrad.bilevel`.

``SGD``, ``Momentum`` and ``Adam`` here are the old inner optimizers, kept for existing code
(deprecated: use :mod:`metagrad.optim`).
"""

from __future__ import annotations

from metagrad.functional._model import FunctionalModel, Recorder
from metagrad.functional._optim import SGD, Adam, InnerOptimizer, Momentum

__all__ = [
    "SGD",
    "Adam",
    "FunctionalModel",
    "InnerOptimizer",
    "Momentum",
    "Recorder",
]
