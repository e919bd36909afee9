"""learn2learn 0.2's API on metagrad: change only the import.

.. code-block:: python

    import metagrad.compat.learn2learn as l2l  # was: import learn2learn as l2l

    tasksets = l2l.vision.benchmarks.get_tasksets("omniglot", train_ways=5, train_samples=2,
                                                  test_ways=5, test_samples=2, root="~/data")
    model = l2l.vision.models.OmniglotFC(28 ** 2, 5)
    maml = l2l.algorithms.MAML(model, lr=0.5, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), lr=3e-3)
    learner = maml.clone()
    X, y = tasksets.train.sample()
    learner.adapt(loss_fn(learner(X[::2]), y[::2]))
    loss_fn(learner(X[1::2]), y[1::2]).backward()  # meta-gradient in model's .grad
    opt.step()

Provided (see README, "Coming from learn2learn", for the table):

* ``algorithms``: ``MAML``, ``MetaSGD``, ``GBML``;
* ``utils`` (also at top level): ``clone_module``, ``update_module``, ``detach_module``,
  ``accuracy``, ``magic_box``;
* ``nn``: ``Lambda``, ``Flatten``, ``Scale``, ``KroneckerLinear``;
* ``optim``: ``ParameterUpdate``, ``DifferentiableSGD`` and ``optim.transforms``
  (``ModuleTransform``, ``ReshapedTransform``, ``KroneckerTransform``,
  ``MetaCurvatureTransform``, ``TransformDictionary``);
* ``data``: ``MetaDataset``, ``UnionMetaDataset``, ``FilteredMetaDataset``,
  ``TaskDataset``/``Taskset``, ``DataDescription``, ``partition_task``, ``InfiniteIterator``
  and ``data.transforms`` (``NWays``, ``KShots``, ``LoadData``, ``RemapLabels``,
  ``ConsecutiveLabels``, ``FilterLabels``, ``FusedNWaysKShots``);
* ``vision``: ``models`` (``OmniglotFC``, ``OmniglotCNN``, ``MiniImagenetCNN``, ``CNN4``,
  ``ResNet12`` and their blocks), ``datasets.FullOmniglot``, ``benchmarks.get_tasksets``
  (``"omniglot"``, from local files), ``transforms.RandomClassRotation``.

The differences from learn2learn are deliberate and documented where they apply
(:class:`~metagrad.compat.learn2learn.algorithms.MAML`, ``FullOmniglot``, ``get_tasksets``):
the model and its BatchNorm running statistics are never modified by a clone, misuse raises
one ``ValueError`` that names the parameters and the flag to set, duplicated Omniglot
characters are counted once, and nothing is downloaded.
"""

from __future__ import annotations

from metagrad.compat.learn2learn import algorithms, data, nn, optim, utils, vision
from metagrad.compat.learn2learn.algorithms import GBML, MAML, MetaSGD
from metagrad.compat.learn2learn.utils import (
    accuracy,
    clone_module,
    detach_module,
    magic_box,
    update_module,
)

__all__ = [
    "GBML",
    "MAML",
    "MetaSGD",
    "accuracy",
    "algorithms",
    "clone_module",
    "data",
    "detach_module",
    "magic_box",
    "nn",
    "optim",
    "update_module",
    "utils",
    "vision",
]
