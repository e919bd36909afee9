"""Built-in model factories (the MAML paper's architectures) and user factory loading."""

from __future__ import annotations

from metagrad.models._factory import load_factory
from metagrad.models._zoo import conv4, sinusoid_mlp

__all__ = ["conv4", "load_factory", "sinusoid_mlp"]
