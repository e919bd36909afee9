"""The workloads' classifier: a ReLU MLP as a pure function of a parameter dict.

``forward(w, x)`` reads ``w["l0.weight"], w["l0.bias"], w["l1.weight"], ...``; :class:`MLP` is
the same network as an ``nn.Module`` with the same parameter names (for peers that need a
module: higher, TorchOpt), so ``dict(MLP(...).named_parameters())`` is a valid ``w``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad._typing import Params


def n_layers(w: Params) -> int:
    """Number of linear layers in ``w``."""
    return sum(1 for k in w if k.endswith(".weight"))


def layer_of(name: str) -> int:
    """``"l1.weight" -> 1``."""
    return int(name.split(".", 1)[0][1:])


def forward(w: Params, x: Tensor) -> Tensor:
    """Logits of the MLP ``w`` on inputs ``x`` ``[N, D]``: ReLU between linear layers."""
    L = n_layers(w)
    for i in range(L):
        x = F.linear(x, w[f"l{i}.weight"], w[f"l{i}.bias"])
        if i < L - 1:
            x = torch.relu(x)
    return x


def init_mlp(sizes: Sequence[int], *, seed: int, dtype: torch.dtype = torch.float32) -> Params:
    """Parameters of an MLP ``sizes[0] -> ... -> sizes[-1]``, ``nn.Linear``'s default init.

    Plain tensors (no ``requires_grad``): a fixed starting point, so a hypergradient is not
    also taken with respect to the initialization.
    """
    return {k: v.detach() for k, v in MLP(sizes, seed=seed, dtype=dtype).named_parameters()}


class MLP(nn.Module):
    """:func:`forward` as a module (parameter names ``l0.weight``, ``l0.bias``, ...)."""

    def __init__(
        self, sizes: Sequence[int], *, seed: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(
                f"metagrad.workloads.MLP: sizes={list(sizes)} needs at least an input and an "
                f"output size, e.g. (64, 32, 10)."
            )
        g = torch.Generator().manual_seed(seed)
        self.n = len(sizes) - 1
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layer = nn.Linear(a, b, dtype=dtype)
            bound = 1.0 / a**0.5  # nn.Linear's default range, drawn from our generator
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
            setattr(self, f"l{i}", layer)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.n):
            x = getattr(self, f"l{i}")(x)
            if i < self.n - 1:
                x = torch.relu(x)
        return x


def detached(w: Params) -> Params:
    """A copy of ``w`` without gradient history."""
    return {k: v.detach().clone() for k, v in w.items()}


def accuracy(w: Params, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` by the MLP ``w``."""
    with torch.no_grad():
        return float((forward(w, x).argmax(-1) == y).to(torch.float64).mean())
