"""``l2l.vision``: models, the Omniglot dataset and benchmark, and class rotations.

Everything reads local data; nothing is downloaded.
"""

from __future__ import annotations

from metagrad.compat.learn2learn.vision import benchmarks, datasets, models, transforms

__all__ = ["benchmarks", "datasets", "models", "transforms"]
