"""Reuse the meta-gradient test helpers that live next to the algorithm tests."""

from __future__ import annotations

import sys
from pathlib import Path

_HELPERS = str(Path(__file__).resolve().parent.parent / "algorithms")
if _HELPERS not in sys.path:
    sys.path.insert(0, _HELPERS)
