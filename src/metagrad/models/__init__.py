"""Built-in model factories (the MAML paper's architectures)."""

from __future__ import annotations

from metagrad.models._zoo import conv4, sinusoid_mlp

__all__ = ["conv4", "sinusoid_mlp"]
