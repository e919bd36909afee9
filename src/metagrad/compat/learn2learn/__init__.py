"""learn2learn 0.2's MAML API on metagrad: change only the import.

.. code-block:: python

    import metagrad.compat.learn2learn as l2l  # was: import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=0.01, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    learner = maml.clone()
    learner.adapt(loss_fn(learner(x_support), y_support))
    loss_fn(learner(x_query), y_query).backward()  # meta-gradient in model's .grad
    opt.step()

Provided: ``algorithms.MAML``, ``algorithms.MetaSGD``, ``utils.clone_module``,
``utils.update_module`` (also as ``l2l.MAML``, ``l2l.MetaSGD``, ``l2l.clone_module``,
``l2l.update_module``). The differences from learn2learn are deliberate and documented in
:class:`~metagrad.compat.learn2learn.algorithms.MAML`: the model and its BatchNorm running
statistics are never modified by a clone, and misuse raises one ``ValueError`` that names the
parameters and the flag to set.
"""

from __future__ import annotations

from metagrad.compat.learn2learn import algorithms, utils
from metagrad.compat.learn2learn.algorithms import MAML, MetaSGD
from metagrad.compat.learn2learn.utils import clone_module, update_module

__all__ = ["MAML", "MetaSGD", "algorithms", "clone_module", "update_module", "utils"]
