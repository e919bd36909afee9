"""``l2l.utils``: differentiable module copies and updates, accuracy, DiCE's magic box."""

from __future__ import annotations

from metagrad.compat._l2l_clone import clone_module, detach_module, update_module
from metagrad.compat._l2l_utils import accuracy, magic_box

__all__ = ["accuracy", "clone_module", "detach_module", "magic_box", "update_module"]
