"""``l2l.vision.datasets``: Omniglot read from local zips or folders (de-duplicated)."""

from __future__ import annotations

from metagrad.compat._l2l_vision_data import FullOmniglot

__all__ = ["FullOmniglot"]
