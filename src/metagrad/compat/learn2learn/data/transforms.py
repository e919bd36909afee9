"""``l2l.data.transforms``: task transforms that cut tasks out of a ``MetaDataset``."""

from __future__ import annotations

from metagrad.compat._l2l_transforms import (
    ConsecutiveLabels,
    FilterLabels,
    FusedNWaysKShots,
    KShots,
    LoadData,
    NWays,
    RemapLabels,
    TaskTransform,
)

__all__ = [
    "ConsecutiveLabels",
    "FilterLabels",
    "FusedNWaysKShots",
    "KShots",
    "LoadData",
    "NWays",
    "RemapLabels",
    "TaskTransform",
]
