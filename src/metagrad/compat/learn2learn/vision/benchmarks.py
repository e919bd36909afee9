"""``l2l.vision.benchmarks``: ``get_tasksets('omniglot', ...)`` on local data.

Split conventions (learn2learn's and metagrad's) are described in
:mod:`metagrad.compat._l2l_vision_data`.
"""

from __future__ import annotations

from metagrad.compat._l2l_vision_data import BenchmarkTasksets, get_tasksets, list_tasksets

__all__ = ["BenchmarkTasksets", "get_tasksets", "list_tasksets"]
