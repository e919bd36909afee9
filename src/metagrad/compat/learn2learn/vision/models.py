"""``l2l.vision.models``: learn2learn's few-shot vision networks (``features`` + ``classifier``)."""

from __future__ import annotations

from metagrad.compat._l2l_vision_models import (
    CNN4,
    CNN4Backbone,
    ConvBase,
    ConvBlock,
    LinearBlock,
    MiniImagenetCNN,
    OmniglotCNN,
    OmniglotFC,
    ResNet12,
    ResNet12Backbone,
    fc_init_,
    maml_init_,
)

__all__ = [
    "CNN4",
    "CNN4Backbone",
    "ConvBase",
    "ConvBlock",
    "LinearBlock",
    "MiniImagenetCNN",
    "OmniglotCNN",
    "OmniglotFC",
    "ResNet12",
    "ResNet12Backbone",
    "fc_init_",
    "maml_init_",
]
