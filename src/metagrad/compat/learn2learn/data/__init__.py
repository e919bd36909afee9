"""``l2l.data``: datasets indexed by label, task sets and their task transforms."""

from __future__ import annotations

from metagrad.compat._l2l_data import (
    DataDescription,
    FilteredMetaDataset,
    InfiniteIterator,
    MetaDataset,
    TaskDataset,
    Taskset,
    UnionMetaDataset,
    partition_task,
)
from metagrad.compat.learn2learn.data import transforms

__all__ = [
    "DataDescription",
    "FilteredMetaDataset",
    "InfiniteIterator",
    "MetaDataset",
    "TaskDataset",
    "Taskset",
    "UnionMetaDataset",
    "partition_task",
    "transforms",
]
