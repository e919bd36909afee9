r"""learn2learn's small helpers: ``accuracy`` and the DiCE ``magic_box``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def accuracy(predictions: Tensor, targets: Tensor) -> Tensor:
    """Fraction of rows of ``predictions`` whose argmax equals ``targets`` (a 0-d float tensor).

    Example:
        >>> import torch
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000)
    """
    if predictions.dim() != 2 or predictions.shape[0] != targets.reshape(-1).shape[0]:
        raise ValueError(
            f"l2l.utils.accuracy: predictions must be [N, classes] and targets [N], got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}."
        )
    hits = predictions.argmax(dim=1).view(targets.shape).long() == targets.long()
    return hits.sum().float() / targets.numel()


def magic_box(x: Any) -> Any:
    r"""DiCE's :math:`\boxdot(x) = \exp(x - \bot(x))`: value 1, gradient that of :math:`x`.

    Reference: Foerster et al., *DiCE: The Infinitely Differentiable Monte Carlo Estimator*,
    ICML 2018.

    Example:
        >>> import torch
        >>> x = torch.tensor(2.0, requires_grad=True)
        >>> y = magic_box(x)
        >>> float(y.detach()), float(torch.autograd.grad(y, x)[0])
        (1.0, 1.0)
    """
    if isinstance(x, Tensor):
        return torch.exp(x - x.detach())
    return x
