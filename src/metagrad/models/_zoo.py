"""Reference architectures from the MAML paper, as plain ``nn.Module`` factories."""

from __future__ import annotations

from torch import nn


def sinusoid_mlp(
    hidden: int = 40, depth: int = 2, *, in_features: int = 1, out_features: int = 1
) -> nn.Sequential:
    """The MAML paper's sinusoid regressor: 1 -> 40 -> 40 -> 1 with ReLU (1761 parameters)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
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
