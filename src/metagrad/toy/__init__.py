"""Toy problems with closed-form meta-gradients, used to explain and to check the engine."""

from __future__ import annotations

from metagrad.toy._linear import ToyResult, linear_toy

__all__ = ["ToyResult", "linear_toy"]
