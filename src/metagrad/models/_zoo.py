"""Reference architectures from the MAML paper, as plain ``nn.Module`` factories."""

from __future__ import annotations

import torch
from torch import nn

SINUSOID_INITS = ("torch", "maml")


def sinusoid_mlp(
    hidden: int = 40,
    depth: int = 2,
    *,
    in_features: int = 1,
    out_features: int = 1,
    init: str = "torch",
) -> nn.Sequential:
    """The MAML paper's sinusoid regressor: 1 -> 40 -> 40 -> 1 with ReLU (1761 parameters).

    Args:
        init: ``"torch"``: PyTorch's default ``nn.Linear`` initialisation (uniform, scaled by
            fan-in, non-zero biases); ``"maml"``: the MAML reference code's (cbfinn/maml,
            ``construct_fc_weights``): weights from a normal of std 0.01 truncated at two
            standard deviations (``tf.truncated_normal``), zero biases.
    """
    if init not in SINUSOID_INITS:
        raise ValueError(f"sinusoid_mlp: init={init!r}; choose one of {list(SINUSOID_INITS)}.")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    if init == "maml":
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                    layer.bias.zero_()
    return nn.Sequential(*layers)


def conv4(
    n_way: int = 5,
    in_channels: int = 1,
    hidden: int = 64,
    image_size: int = 28,
    *,
    batch_norm: bool = True,
) -> nn.Sequential:
    """The MAML paper's Omniglot / mini-ImageNet classifier.

    Four blocks of 3x3 conv (``hidden`` filters, padding 1) -> BatchNorm -> ReLU -> 2x2
    max-pool, then a linear head over the flattened features.
    """
    blocks: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        blocks += [nn.Conv2d(channels, hidden, 3, padding=1)]
        if batch_norm:
            blocks.append(nn.BatchNorm2d(hidden))
        blocks += [nn.ReLU(), nn.MaxPool2d(2)]
        channels, size = hidden, size // 2
    blocks += [nn.Flatten(), nn.Linear(hidden * max(size, 1) ** 2, n_way)]
    return nn.Sequential(*blocks)
