"""Task samplers and datasets for meta-learning, all offline and deterministic given a seed.

* :class:`SinusoidTasks`: the MAML paper's sinusoid regression.
* :class:`FewShotTasks`: N-way K-shot classification over any :class:`ImageClasses`.
* :func:`load_image_folder`: a folder-per-class dataset (mini-ImageNet layout).
* :func:`load_omniglot`: Omniglot from the official zips, de-duplicated and split by character.
* :func:`keep_fraction`: a nested fraction of the training classes (data-scaling ablations).

Samplers own a ``torch.Generator`` (never the global RNG) exposed through ``state_dict()``.
"""

from __future__ import annotations

from metagrad.tasks._batch import TaskBatch, derive_seed
from metagrad.tasks._fewshot import FewShotTasks
from metagrad.tasks._images import DatasetError, ImageClasses, decode_image, load_image_folder
from metagrad.tasks._omniglot import (
    OmniglotSplits,
    keep_fraction,
    load_omniglot,
    read_omniglot_files,
)
from metagrad.tasks._sinusoid import SinusoidTasks

__all__ = [
    "DatasetError",
    "FewShotTasks",
    "ImageClasses",
    "OmniglotSplits",
    "SinusoidTasks",
    "TaskBatch",
    "decode_image",
    "derive_seed",
    "keep_fraction",
    "load_image_folder",
    "load_omniglot",
    "read_omniglot_files",
]
