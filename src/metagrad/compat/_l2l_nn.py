r"""learn2learn's small layers (``l2l.nn``): ``Lambda``, ``Flatten``, ``Scale``, ``KroneckerLinear``.

``KroneckerLinear`` maps :math:`X \in \mathbb{R}^{n \times m}` to :math:`L X R + B`, i.e.
:math:`\mathrm{vec}(Y) = (R^\top \otimes L)\,\mathrm{vec}(X) + \mathrm{vec}(B)`, with
:math:`O(n^2 + m^2)` parameters instead of :math:`O(n^2 m^2)`; it is the factor behind
``l2l.optim.transforms.KroneckerTransform`` (KFO, Arnold et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class Lambda(nn.Module):
    """A module that calls ``lmb`` in its forward.

    Example:
        >>> import torch
        >>> Lambda(lambda x: x.mean(dim=[2, 3]))(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, lmb: Callable[..., Any]) -> None:
        super().__init__()
        self.lmb = lmb

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.lmb(*args, **kwargs)


class Flatten(nn.Module):
    """Flatten to ``[batch, -1]``.

    Example:
        >>> import torch
        >>> Flatten()(torch.ones(5, 3, 2, 2)).shape
        torch.Size([5, 12])
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.size(0), -1)


class Scale(nn.Module):
    """Elementwise multiplication by a learned tensor initialized to ``alpha``.

    Args:
        shape: shape of the factor (an int, a tuple, or None for a scalar ``(1,)``).
        alpha: initial value.

    Example:
        >>> import torch
        >>> Scale(3, alpha=0.5)(torch.ones(3)).tolist()
        [0.5, 0.5, 0.5]
    """

    def __init__(self, shape: int | tuple[int, ...] | None = None, alpha: float = 1.0) -> None:
        super().__init__()
        dims = (1,) if shape is None else (shape,) if isinstance(shape, int) else tuple(shape)
        self.alpha = nn.Parameter(torch.full(dims, float(alpha)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha


class KroneckerLinear(nn.Module):
    r"""Linear map whose matrix is a Kronecker product :math:`R^\top \otimes L`.

    Inputs are ``[..., n, m]`` matrices, or vectors of ``n * m`` entries (read as the
    column-major ``n x m`` matrix). :math:`L` and :math:`R` start as identities, the bias at 0.

    Args:
        n: size of the left factor :math:`L \in \mathbb{R}^{n \times n}`.
        m: size of the right factor :math:`R \in \mathbb{R}^{m \times m}`.
        bias: learn a bias :math:`B \in \mathbb{R}^{n \times m}`.
        psd: use :math:`L^\top L` and :math:`R^\top R` (positive semi-definite map).
        device: device of the parameters.

    Raises:
        ValueError: input of the wrong size.

    Example:
        >>> import torch
        >>> x = torch.randn(6)
        >>> torch.allclose(KroneckerLinear(3, 2)(x), x)
        True
    """

    def __init__(
        self, n: int, m: int, bias: bool = True, psd: bool = False, device: Any = None
    ) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.eye(n, device=device))
        self.right = nn.Parameter(torch.eye(m, device=device))
        self.bias = nn.Parameter(torch.zeros(n, m, device=device)) if bias else None
        self.psd = psd
        self.device = device

    def forward(self, x: Tensor) -> Tensor:
        left: Tensor = self.left
        right: Tensor = self.right
        if self.psd:
            left, right = left.t() @ left, right.t() @ right
        n, m = left.shape[0], right.shape[0]
        if x.dim() == 1:
            if x.numel() != n * m:
                raise ValueError(
                    f"l2l.nn.KroneckerLinear: input vector has {x.numel()} entries, expected "
                    f"n * m = {n * m}."
                )
            y = left @ x.reshape(m, n).t() @ right
            if self.bias is not None:
                y = y + self.bias
            return y.t().reshape(-1)
        if tuple(x.shape[-2:]) != (n, m):
            raise ValueError(
                f"l2l.nn.KroneckerLinear: input ends in {tuple(x.shape[-2:])}, expected ({n}, {m})."
            )
        y = left @ x @ right
        return y if self.bias is None else y + self.bias
