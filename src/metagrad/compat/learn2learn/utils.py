"""``l2l.utils``: differentiable module copies and updates."""

from __future__ import annotations

from metagrad.compat._l2l_clone import clone_module, update_module

__all__ = ["clone_module", "update_module"]
