"""``l2l.optim``: differentiable parameter updates and the gradient transforms of ``GBML``."""

from __future__ import annotations

from metagrad.compat._l2l_optim import (
    DifferentiableSGD,
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ParameterUpdate,
    ReshapedTransform,
    TransformDictionary,
)
from metagrad.compat.learn2learn.optim import transforms

__all__ = [
    "DifferentiableSGD",
    "KroneckerTransform",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ParameterUpdate",
    "ReshapedTransform",
    "TransformDictionary",
    "transforms",
]
