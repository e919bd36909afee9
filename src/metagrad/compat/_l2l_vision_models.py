"""learn2learn's vision models (``l2l.vision.models``), same constructors and architectures.

Every model is ``features`` followed by ``classifier`` (``forward = classifier(features(x))``),
so ANIL-style code can adapt ``model.classifier`` alone. Initializations follow learn2learn:
truncated normal (std 0.01, cut at 2 std) for the fully connected Omniglot net, Xavier-uniform
convolutions with BatchNorm scales drawn from U[0, 1] for the 4-layer CNNs, Kaiming-normal
for ResNet-12. No operation works in place, so every model has an exact second derivative.

References:
    Santoro et al., *Meta-Learning with Memory-Augmented Neural Networks*, ICML 2016 (FC).
    Finn et al., *Model-Agnostic Meta-Learning*, ICML 2017 (Omniglot CNN).
    Ravi and Larochelle, *Optimization as a Model for Few-Shot Learning*, ICLR 2017 (CNN4).
    Mishra et al., *A Simple Neural Attentive Meta-Learner*, ICLR 2018; Lee et al.,
    *Meta-Learning with Differentiable Convex Optimization*, CVPR 2019 (ResNet-12);
    Ghiasi et al., *DropBlock*, NeurIPS 2018.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.compat._l2l_nn import Flatten, Lambda


def fc_init_(module: nn.Module) -> nn.Module:
    """Truncated normal weights (std 0.01, within 2 std) and zero bias; returns ``module``."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, Tensor):
        nn.init.trunc_normal_(weight, mean=0.0, std=0.01, a=-0.02, b=0.02)
    if isinstance(bias, Tensor):
        nn.init.zeros_(bias)
    return module


def maml_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weight and zero bias; returns ``module``."""
    nn.init.xavier_uniform_(module.weight, gain=1.0)  # type: ignore[arg-type]
    nn.init.zeros_(module.bias)  # type: ignore[arg-type]
    return module


class LinearBlock(nn.Module):
    """Linear -> BatchNorm1d (batch statistics only, eps 1e-3) -> ReLU."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.normalize = nn.BatchNorm1d(
            output_size, affine=True, momentum=0.999, eps=1e-3, track_running_stats=False
        )
        self.linear = fc_init_(nn.Linear(input_size, output_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.normalize(self.linear(x)))


class ConvBlock(nn.Module):
    """3x3 conv -> BatchNorm2d -> ReLU, then 2x2 max-pool (or a stride-2 conv without it).

    Args:
        in_channels, out_channels: channels.
        kernel_size: convolution kernel (padding 1).
        max_pool: pool after the ReLU (stride-1 conv); False: stride-2 conv, no pool.
        max_pool_factor: scales the pool / stride (``int(2 * factor)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        max_pool: bool = True,
        max_pool_factor: float = 1.0,
    ) -> None:
        super().__init__()
        stride = int(2 * max_pool_factor)
        self.max_pool: nn.Module
        if max_pool:
            self.max_pool = nn.MaxPool2d(kernel_size=stride, stride=stride, ceil_mode=False)
            stride = 1
        else:
            self.max_pool = nn.Identity()
        self.normalize = nn.BatchNorm2d(out_channels, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()
        self.conv = maml_init_(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=1, bias=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    """``layers`` :class:`ConvBlock` s (Omniglot: 64 filters, 1 channel, strided, no pool)."""

    def __init__(
        self,
        hidden: int = 64,
        channels: int = 1,
        max_pool: bool = False,
        layers: int = 4,
        max_pool_factor: float = 1.0,
    ) -> None:
        blocks = [
            ConvBlock(channels if i == 0 else hidden, hidden, (3, 3), max_pool, max_pool_factor)
            for i in range(layers)
        ]
        super().__init__(*blocks)


class OmniglotFC(nn.Module):
    """The fully connected Omniglot network of Santoro et al. (2016).

    Args:
        input_size: flattened input size (``28 ** 2``).
        output_size: classes.
        sizes: hidden sizes (default ``[256, 128, 64, 64]``).

    Example:
        >>> import torch
        >>> OmniglotFC(28 ** 2, 5)(torch.rand(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(self, input_size: int, output_size: int, sizes: list[int] | None = None) -> None:
        super().__init__()
        sizes = [256, 128, 64, 64] if sizes is None else list(sizes)
        blocks = [LinearBlock(a, b) for a, b in zip([input_size, *sizes[:-1]], sizes)]
        self.features = nn.Sequential(Flatten(), nn.Sequential(*blocks))
        self.classifier = fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _as_omniglot_image(x: Tensor) -> Tensor:
    return x.view(-1, 1, 28, 28)


def _spatial_mean(x: Tensor) -> Tensor:
    return x.mean(dim=[2, 3])


class OmniglotCNN(nn.Module):
    """The MAML paper's Omniglot CNN (Finn et al., 2017): 4 strided conv blocks, mean-pooled.

    Inputs are viewed as ``[N, 1, 28, 28]``.

    Args:
        output_size: classes.
        hidden_size: filters per layer.
        layers: conv blocks.

    Example:
        >>> import torch
        >>> OmniglotCNN(5)(torch.rand(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers)
        self.features = nn.Sequential(
            Lambda(_as_omniglot_image), self.base, Lambda(_spatial_mean), Flatten()
        )
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        nn.init.normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    """:class:`ConvBase` whose output is flattened to ``[N, features]``."""

    def __init__(
        self,
        hidden_size: int = 64,
        layers: int = 4,
        channels: int = 3,
        max_pool: bool = False,
        max_pool_factor: float = 1.0,
    ) -> None:
        super().__init__(hidden_size, channels, max_pool, layers, max_pool_factor)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return x.reshape(x.size(0), -1)


class CNN4(nn.Module):
    """The 4-layer CNN of Ravi and Larochelle (2017), for ``[3, 84, 84]`` mini-ImageNet images.

    Args:
        output_size: classes.
        hidden_size: filters per layer.
        layers: conv blocks (the pool factor is ``4 // layers``).
        channels: input channels.
        max_pool: pooled blocks (default) or strided convolutions.
        embedding_size: classifier input (default ``25 * hidden_size``: 5x5 maps at 84x84).

    Example:
        >>> import torch
        >>> CNN4(5, hidden_size=8)(torch.rand(2, 3, 84, 84)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        output_size: int,
        hidden_size: int = 64,
        layers: int = 4,
        channels: int = 3,
        max_pool: bool = True,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        embedding_size = 25 * hidden_size if embedding_size is None else embedding_size
        self.features = CNN4Backbone(hidden_size, layers, channels, max_pool, 4 // layers)
        self.classifier = maml_init_(nn.Linear(embedding_size, output_size, bias=True))
        self.hidden_size = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


MiniImagenetCNN = CNN4


class DropBlock(nn.Module):
    """Zero random ``block_size`` x ``block_size`` squares (centres drawn with rate ``gamma``).

    The kept activations are rescaled by ``numel / kept``. Identity in eval mode.
    """

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size

    def forward(self, x: Tensor, gamma: float) -> Tensor:
        if not self.training:
            return x
        b = self.block_size
        n, c, h, w = x.shape
        seeds = torch.bernoulli(
            torch.full((n, c, h - b + 1, w - b + 1), float(gamma), device=x.device, dtype=x.dtype)
        )
        # A seed at (i, j) drops rows i..i+b-1, columns j..j+b-1 of the h x w map.
        dropped = F.max_pool2d(F.pad(seeds, (b - 1, b - 1, b - 1, b - 1)), b, stride=1)
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class BasicBlock(nn.Module):
    """ResNet-12 block: three 3x3 conv + BatchNorm (LeakyReLU 0.1), residual, max-pool."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        drop_rate: float = 0.0,
        drop_block: bool = False,
        block_size: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.maxpool = nn.MaxPool2d(stride)
        self.downsample = downsample
        self.stride = stride
        self.drop_rate = drop_rate
        self.num_batches_tracked = 0
        self.drop_block = drop_block
        self.block_size = block_size
        self.DropBlock = DropBlock(block_size=block_size)

    def forward(self, x: Tensor) -> Tensor:
        self.num_batches_tracked += 1
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        out = self.maxpool(self.relu(out + residual))
        if self.drop_rate > 0:
            if self.drop_block:
                size = out.size(2)
                # Linear warm-up of the drop rate over 40,000 forward passes (learn2learn).
                keep_rate = max(
                    1.0 - self.drop_rate / 40000 * self.num_batches_tracked, 1.0 - self.drop_rate
                )
                b = self.block_size
                gamma = (1 - keep_rate) / b**2 * size**2 / max(size - b + 1, 1) ** 2
                out = self.DropBlock(out, gamma=gamma)
            else:
                out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class ResNet12Backbone(nn.Module):
    """The ResNet-12 feature extractor (4 blocks, 64-160-320-640 filters, or 64-128-256-512).

    Args:
        avg_pool: 5x5 average pool at the end (640 features at 84x84); False keeps the maps.
        wider: MetaOptNet's widths (default) or TADAM's (``False``).
        embedding_dropout: dropout on the flattened features.
        dropblock_dropout: drop rate of the residual blocks (DropBlock in the last two).
        dropblock_size: DropBlock square size.
        channels: input channels.
    """

    def __init__(
        self,
        avg_pool: bool = True,
        wider: bool = True,
        embedding_dropout: float = 0.0,
        dropblock_dropout: float = 0.1,
        dropblock_size: int = 5,
        channels: int = 3,
    ) -> None:
        super().__init__()
        filters = [64, 160, 320, 640] if wider else [64, 128, 256, 512]
        self.inplanes = channels
        self.layer1 = self._make_layer(filters[0], 2, dropblock_dropout)
        self.layer2 = self._make_layer(filters[1], 2, dropblock_dropout)
        self.layer3 = self._make_layer(filters[2], 2, dropblock_dropout, True, dropblock_size)
        self.layer4 = self._make_layer(filters[3], 2, dropblock_dropout, True, dropblock_size)
        self.avgpool: nn.Module = nn.AvgPool2d(5, stride=1) if avg_pool else nn.Identity()
        self.flatten = Flatten()
        self.embedding_dropout = embedding_dropout
        self.keep_avg_pool = avg_pool
        self.dropout = nn.Dropout(p=embedding_dropout, inplace=False)
        self.dropblock_dropout = dropblock_dropout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self,
        planes: int,
        stride: int,
        drop_rate: float,
        drop_block: bool = False,
        block_size: int = 1,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(planes),
            )
        block = BasicBlock(
            self.inplanes, planes, stride, downsample, drop_rate, drop_block, block_size
        )
        self.inplanes = planes
        return nn.Sequential(block)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(self.flatten(self.avgpool(x)))


class ResNet12(nn.Module):
    """ResNet-12 (Mishra et al. 2018; Lee et al. 2019) with a linear classifier.

    Args:
        output_size: classes.
        hidden_size: classifier input (640 for 84x84 inputs with ``avg_pool``; 16000 without).
        avg_pool, wider, embedding_dropout, dropblock_dropout, dropblock_size, channels: see
            :class:`ResNet12Backbone`.

    Example:
        >>> import torch
        >>> ResNet12(5).eval()(torch.rand(2, 3, 84, 84)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        output_size: int,
        hidden_size: int = 640,
        avg_pool: bool = True,
        wider: bool = True,
        embedding_dropout: float = 0.0,
        dropblock_dropout: float = 0.1,
        dropblock_size: int = 5,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.features = ResNet12Backbone(
            avg_pool, wider, embedding_dropout, dropblock_dropout, dropblock_size, channels
        )
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
