"""``l2l.vision.transforms``: task transforms for images."""

from __future__ import annotations

from metagrad.compat._l2l_vision_data import RandomClassRotation

__all__ = ["RandomClassRotation"]
