"""Meta-learning algorithms: thin classes over the functional engine."""

from __future__ import annotations

from metagrad.algorithms._anil import ANIL
from metagrad.algorithms._maml import MAML, msl_weights
from metagrad.algorithms._mamlpp import MAMLpp
from metagrad.algorithms._metasgd import MetaSGD
from metagrad.algorithms._reptile import Reptile

__all__ = ["ANIL", "MAML", "MAMLpp", "MetaSGD", "Reptile", "msl_weights"]
