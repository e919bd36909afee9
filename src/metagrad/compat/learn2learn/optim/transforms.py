"""``l2l.optim.transforms``: factories of per-parameter gradient transforms."""

from __future__ import annotations

from metagrad.compat._l2l_optim import (
    KroneckerTransform,
    MetaCurvatureTransform,
    ModuleTransform,
    ReshapedTransform,
    TransformDictionary,
)

__all__ = [
    "KroneckerTransform",
    "MetaCurvatureTransform",
    "ModuleTransform",
    "ReshapedTransform",
    "TransformDictionary",
]
