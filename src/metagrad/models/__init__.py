"""Built-in model factories (the MAML paper's architectures) and user factory loading."""

from __future__ import annotations

from metagrad.models._factory import load_factory
from metagrad.models._lora import LoRALinear, add_lora, lora_only
from metagrad.models._vit import ViT, vit
from metagrad.models._zoo import conv4, sinusoid_mlp

__all__ = [
    "LoRALinear",
    "ViT",
    "add_lora",
    "conv4",
    "load_factory",
    "lora_only",
    "sinusoid_mlp",
    "vit",
]
