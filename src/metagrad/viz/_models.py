"""Models and tasks to draw: the linear toy, built-in MLP / conv-4, user factories."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.algorithms import MAML
from metagrad.models import conv4, load_factory, sinusoid_mlp
from metagrad.viz._graph import MetaGraph, meta_graph

__all__ = ["ToyLinear", "conv4", "load_factory", "mlp", "squared_error", "toy_graph"]


class ToyLinear(nn.Module):
    """``y = w*x + b`` with parameters named ``w`` and ``b`` (the toy's notation).

    Args:
        w0: Initial weight.
        b0: Initial bias.
        dtype: Parameter dtype.
    """

    def __init__(self, w0: float = -0.5258, b0: float = 0.0, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[w0]], dtype=dtype))
        self.b = nn.Parameter(torch.tensor([b0], dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Returns ``x @ w.T + b``."""
        return x @ self.w.t() + self.b


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """``mean((prediction - target)^2)``, written out so the graph shows Sub/Pow/Mean."""
    return ((prediction - target) ** 2).mean()


def toy_graph(
    w0: float = -0.5258,
    b0: float = 0.0,
    *,
    support: tuple[float, float] = (1.0, 0.0),
    query: tuple[float, float] = (2.0, 0.0),
    inner_lr: float = 1.0,
    order: int = 2,
    steps: int = 1,
) -> MetaGraph:
    """Meta-loss graph of one MAML step on the linear toy ``y = w*x + b`` (same defaults as
    ``metagrad explain``).

    Args:
        w0: Initial weight.
        b0: Initial bias.
        support: One support example ``(x, y)``.
        query: One query example ``(x, y)``.
        inner_lr: Inner step size.
        order: 1 (first-order MAML) or 2 (exact second order).
        steps: Inner steps (fast weights ``w1, w2, ...``).

    Returns:
        The :class:`MetaGraph`, parameters labelled ``w``/``b`` and fast weights ``w1``/``b1``.

    Example:
        >>> from metagrad.viz import toy_graph
        >>> toy_graph(order=1).second_order_ops()
        []
    """
    learner = MAML(ToyLinear(w0, b0), squared_error, inner_lr, steps, order)
    dt = torch.float64
    xs, ys = torch.tensor([[support[0]]], dtype=dt), torch.tensor([[support[1]]], dtype=dt)
    xq, yq = torch.tensor([[query[0]]], dtype=dt), torch.tensor([[query[1]]], dtype=dt)
    title = (
        "second-order MAML on y = w*x + b (create_graph=True)"
        if order == 2
        else "first-order MAML on y = w*x + b (create_graph=False)"
    )
    return meta_graph(learner, xs, ys, xq, yq, order=order, steps=steps, title=title)


def mlp(hidden: int = 40, in_features: int = 1, out_features: int = 1) -> nn.Module:
    """The sinusoid-regression MLP of the MAML paper: ``in -> hidden -> hidden -> out``, ReLU."""
    return sinusoid_mlp(hidden, in_features=in_features, out_features=out_features)


def regression_task(
    model: nn.Module, input_shape: tuple[int, ...], shots: int, classes: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """Random support/query data matching ``model``; cross-entropy when ``classes`` is given."""
    p = next(model.parameters())
    x = torch.randn(2 * shots, *input_shape, dtype=p.dtype)
    with torch.no_grad():
        out = model(x[:1])
    if classes is not None:
        y = torch.arange(2 * shots) % classes
        return x[:shots], y[:shots], x[shots:], y[shots:], F.cross_entropy
    y = torch.randn(2 * shots, *out.shape[1:], dtype=p.dtype)
    return x[:shots], y[:shots], x[shots:], y[shots:], F.mse_loss
