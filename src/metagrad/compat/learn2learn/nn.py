"""``l2l.nn``: small layers used by learn2learn's models and update transforms."""

from __future__ import annotations

from metagrad.compat._l2l_nn import Flatten, KroneckerLinear, Lambda, Scale

__all__ = ["Flatten", "KroneckerLinear", "Lambda", "Scale"]
