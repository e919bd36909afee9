"""``l2l.algorithms``: gradient-based meta-learners with learn2learn's ``clone``/``adapt`` API."""

from __future__ import annotations

from metagrad.compat._l2l_gbml import GBML
from metagrad.compat._l2l_maml import MAML, MetaSGD

__all__ = ["GBML", "MAML", "MetaSGD"]
