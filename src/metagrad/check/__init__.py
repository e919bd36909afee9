"""Numerical verification of meta-gradients (``metagrad check``)."""

from __future__ import annotations

from metagrad.check._check import CheckReport, check_meta_gradient, reference_meta_gradient

__all__ = ["CheckReport", "check_meta_gradient", "reference_meta_gradient"]
