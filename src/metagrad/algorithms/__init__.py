"""Meta-learning algorithms: thin classes over the functional engine."""

from __future__ import annotations

from metagrad.algorithms._anil import ANIL
from metagrad.algorithms._imaml import IMAML, conjugate_gradient
from metagrad.algorithms._maml import MAML, msl_weights
from metagrad.algorithms._mamlpp import MAMLpp
from metagrad.algorithms._metasgd import MetaSGD
from metagrad.algorithms._reptile import Reptile

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "MAMLpp",
    "MetaSGD",
    "Reptile",
    "conjugate_gradient",
    "msl_weights",
]
