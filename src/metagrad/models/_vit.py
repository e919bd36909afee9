"""A small vision transformer for few-shot image tasks (Omniglot 28x28, mini-ImageNet 84x84).

Patch embedding (a ``patch x patch`` convolution with that stride), learned position
embeddings, ``depth`` pre-norm encoder blocks (multi-head self-attention through
``F.scaled_dot_product_attention``, then a GELU MLP, each with a residual connection), a final
LayerNorm, mean pooling over the patches and a linear head. The attention projections are four
separate ``nn.Linear`` layers (``q``, ``k``, ``v``, ``o``) so that adapters such as LoRA can
target them by name (:func:`metagrad.models.add_lora`).

Under exact second-order MAML the attention of the support-loss forward runs on PyTorch's math
kernel and everything else on the fast kernels (``metagrad.functional._attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q``/``k``/``v``/``o`` projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttention: dim={dim} must be divisible by heads={heads}.")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        H = self.heads

        def split(t: Tensor) -> Tensor:  # [B, S, D] -> [B, H, S, D/H]
            return t.reshape(B, S, H, D // H).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(a.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer encoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer classifier ``[N, C, H, W] -> [N, n_way]`` (see the module docstring)."""

    def __init__(
        self,
        n_way: int = 5,
        in_channels: int = 1,
        image_size: int = 28,
        *,
        patch: int = 7,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp_dim: int | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(
                f"ViT: image_size={image_size} must be a multiple of patch={patch} (e.g. 28 "
                f"with patch 7 or 4)."
            )
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim or 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_way)
        for m in self.modules():  # ViT-style init: truncated-normal-like small weights
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02 * math.sqrt(64 / m.in_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # [N, tokens, dim]
        t = self.norm(self.blocks(t))
        return self.head(t.mean(1))


def vit(
    n_way: int = 5,
    in_channels: int = 1,
    image_size: int = 28,
    *,
    patch: int = 7,
    dim: int = 64,
    depth: int = 3,
    heads: int = 4,
) -> ViT:
    """A :class:`ViT` for ``n_way`` classes (defaults: Omniglot 28x28, 16 patches of 7x7, 3 blocks
    of width 64 with 4 heads: 105k parameters at 5-way)."""
    return ViT(n_way, in_channels, image_size, patch=patch, dim=dim, depth=depth, heads=heads)
