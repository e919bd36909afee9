"""A linear-regression toy: one MAML step on ``y = w*x + b``, derived two ways.

The meta-gradient is computed by autograd (``torch.autograd.grad``, with ``create_graph=True``
for second order) and, independently, from a closed form derived by hand. The two must agree;
this module is the smallest end-to-end check that the second-order term is really there.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ToyResult", "linear_toy"]

_FN = "metagrad.toy.linear_toy"
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


@dataclass(frozen=True)
class ToyResult:
    r"""Every intermediate quantity of one MAML step on the linear toy (plain Python floats).

    Attributes:
        w0: Initial weight.
        b0: Initial bias.
        support_grad_w: :math:`\partial L_s / \partial w_0`.
        support_grad_b: :math:`\partial L_s / \partial b_0`.
        w1: Fast weight :math:`w_0 - \alpha\, \partial L_s / \partial w_0`.
        b1: Fast bias :math:`b_0 - \alpha\, \partial L_s / \partial b_0`.
        query_grad_w: :math:`\partial L_q / \partial w_1` at the fast weights.
        query_grad_b: :math:`\partial L_q / \partial b_1` at the fast weights.
        meta_grad_w_autograd: Meta-gradient for ``w0`` from ``torch.autograd.grad``.
        meta_grad_b_autograd: Meta-gradient for ``b0`` from ``torch.autograd.grad``.
        meta_grad_w_manual: Meta-gradient for ``w0`` from the closed form.
        meta_grad_b_manual: Meta-gradient for ``b0`` from the closed form.
        w0_updated: :math:`w_0 - \beta\, g_w` (autograd meta-gradient).
        b0_updated: :math:`b_0 - \beta\, g_b` (autograd meta-gradient).
        order: 1 (first-order MAML) or 2 (exact second-order MAML).
        support: The support example ``(x_s, y_s)``.
        query: The query example ``(x_q, y_q)``.
        inner_lr: Inner learning rate :math:`\alpha`.
        meta_lr: Meta learning rate :math:`\beta`.
        dtype: ``"float32"`` or ``"float64"``.
    """

    w0: float
    b0: float
    support_grad_w: float
    support_grad_b: float
    w1: float
    b1: float
    query_grad_w: float
    query_grad_b: float
    meta_grad_w_autograd: float
    meta_grad_b_autograd: float
    meta_grad_w_manual: float
    meta_grad_b_manual: float
    w0_updated: float
    b0_updated: float
    order: int
    support: tuple[float, float]
    query: tuple[float, float]
    inner_lr: float
    meta_lr: float
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-serialisable dict (tuples become lists)."""
        out = asdict(self)
        out["support"] = list(self.support)
        out["query"] = list(self.query)
        return out


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_FN}: {name} must be a real number (int or float), got {value!r} of type "
            f"{type(value).__name__}; pass e.g. {name}=1.0."
        )
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{_FN}: {name} must be finite, got {out!r}; pass a finite number.")
    return out


def _check_pair(name: str, value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(
            f"{_FN}: {name} must be one example as a pair (x, y), got {value!r}; "
            f"pass e.g. {name}=(1.0, 0.0)."
        )
    return _check_number(f"{name}[0] (x)", value[0]), _check_number(f"{name}[1] (y)", value[1])


def _closed_form(
    w0: Tensor, b0: Tensor, xs: float, ys: float, xq: float, yq: float, alpha: float, order: int
) -> tuple[Tensor, Tensor]:
    """Meta-gradient ``(g_w, g_b)`` from the hand derivation; plain arithmetic, no autograd."""
    r_s = w0 * xs + b0 - ys
    w1 = w0 - alpha * (2.0 * r_s * xs)
    b1 = b0 - alpha * (2.0 * r_s)
    r_q = w1 * xq + b1 - yq
    if order == 1:
        return 2.0 * r_q * xq, 2.0 * r_q
    # (I - alpha H_s) applied to the query gradient, factored through 2 r_q.
    coupling = xs * xq + 1.0
    return (
        2.0 * r_q * (xq - 2.0 * alpha * xs * coupling),
        2.0 * r_q * (1.0 - 2.0 * alpha * coupling),
    )


def linear_toy(
    w0: float,
    b0: float = 0.0,
    *,
    support: tuple[float, float] = (1.0, 0.0),
    query: tuple[float, float] = (2.0, 0.0),
    inner_lr: float = 1.0,
    meta_lr: float = 1.0,
    order: int = 2,
    dtype: torch.dtype = torch.float64,
) -> ToyResult:
    r"""One MAML step on ``y = w*x + b`` with squared error, by autograd and by hand.

    The model is ``nn.Linear(1, 1)`` written functionally (``w`` of shape ``[1, 1]``, ``b`` of
    shape ``[1]``); each of the support and query sets holds one example. With
    :math:`r_s = w_0 x_s + b_0 - y_s` the support residual, the inner step is

    .. math::

        L_s = r_s^2, \quad
        \frac{\partial L_s}{\partial w_0} = 2 r_s x_s, \quad
        \frac{\partial L_s}{\partial b_0} = 2 r_s, \quad
        w_1 = w_0 - 2 \alpha r_s x_s, \quad
        b_1 = b_0 - 2 \alpha r_s.

    With :math:`r_q = w_1 x_q + b_1 - y_q` the query residual, the query gradient at the fast
    weights is :math:`(2 r_q x_q,\; 2 r_q)`; first-order MAML uses it as the meta-gradient,
    dropping the Jacobian of the inner step. Second-order MAML keeps it: the support Hessian is
    :math:`H_s = 2 \begin{pmatrix} x_s^2 & x_s \\ x_s & 1 \end{pmatrix}`, the Jacobian
    :math:`\partial (w_1, b_1) / \partial (w_0, b_0) = I - \alpha H_s`, and

    .. math::

        g_w^{(2)} = 2 r_q \bigl(x_q - 2 \alpha x_s (x_s x_q + 1)\bigr), \qquad
        g_b^{(2)} = 2 r_q \bigl(1 - 2 \alpha (x_s x_q + 1)\bigr).

    With the default settings (:math:`x_s = 1, y_s = 0, x_q = 2, y_q = 0, \alpha = 1, b_0 = 0`):
    :math:`r_s = w_0`, :math:`w_1 = -w_0`, :math:`b_1 = -2 w_0`, :math:`r_q = -4 w_0`, so
    :math:`g_w^{(1)} = -16 w_0`, :math:`g_b^{(1)} = -8 w_0`, :math:`g_w^{(2)} = 32 w_0` and
    :math:`g_b^{(2)} = 40 w_0`. The meta-update is :math:`w_0' = w_0 - \beta g_w`,
    :math:`b_0' = b_0 - \beta g_b`.

    Args:
        w0: Initial weight.
        b0: Initial bias.
        support: The support example ``(x_s, y_s)``.
        query: The query example ``(x_q, y_q)``.
        inner_lr: Inner learning rate :math:`\alpha` (finite, ``>= 0``).
        meta_lr: Meta learning rate :math:`\beta` (finite, ``>= 0``).
        order: 1 for first-order MAML, 2 for the exact second-order meta-gradient.
        dtype: ``torch.float64`` (default) or ``torch.float32``; both paths compute in it.

    Returns:
        A :class:`ToyResult` holding every intermediate value as Python floats.

    Raises:
        ValueError: If ``order`` is not 1 or 2, a number is not finite, a learning rate is
            negative, ``support``/``query`` is not a pair, or ``dtype`` is unsupported.
        TypeError: If a number is not a real number (``bool`` included).

    Example:
        >>> r = linear_toy(-0.5, order=2)
        >>> r.meta_grad_w_autograd, r.meta_grad_w_manual  # 32 * w0
        (-16.0, -16.0)
        >>> linear_toy(-0.5, order=1).meta_grad_w_autograd  # -16 * w0
        8.0

    References:
        Finn, Abbeel, Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks. ICML 2017. https://arxiv.org/abs/1703.03400
    """
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(
            f"{_FN}: order must be 1 (first-order) or 2 (second-order), got {order!r}; "
            "pass order=1 or order=2."
        )
    if dtype not in _DTYPES:
        raise ValueError(
            f"{_FN}: dtype must be torch.float32 or torch.float64, got {dtype!r}; "
            "pass dtype=torch.float64."
        )
    w0_f = _check_number("w0", w0)
    b0_f = _check_number("b0", b0)
    xs, ys = _check_pair("support", support)
    xq, yq = _check_pair("query", query)
    alpha = _check_number("inner_lr", inner_lr)
    beta = _check_number("meta_lr", meta_lr)
    for name, lr in (("inner_lr", alpha), ("meta_lr", beta)):
        if lr < 0:
            raise ValueError(f"{_FN}: {name} must be >= 0, got {lr!r}; pass a non-negative rate.")

    def t(v: float, shape: tuple[int, ...]) -> Tensor:
        return torch.full(shape, v, dtype=dtype)

    # Autograd path: functional nn.Linear(1, 1); torch.autograd.grad only, so no .grad state.
    w = t(w0_f, (1, 1)).requires_grad_(True)
    b = t(b0_f, (1,)).requires_grad_(True)
    loss_s = F.mse_loss(F.linear(t(xs, (1, 1)), w, b), t(ys, (1, 1)))
    gs_w, gs_b = torch.autograd.grad(loss_s, (w, b), create_graph=order == 2)
    # Order 1: gs_* carry no graph, so d(w1, b1)/d(w0, b0) = I and the meta-gradient below
    # is exactly the query gradient at the fast weights.
    w1 = w - alpha * gs_w
    b1 = b - alpha * gs_b
    loss_q = F.mse_loss(F.linear(t(xq, (1, 1)), w1, b1), t(yq, (1, 1)))
    gq_w, gq_b, meta_w, meta_b = torch.autograd.grad(loss_q, (w1, b1, w, b))

    with torch.no_grad():
        man_w, man_b = _closed_form(
            t(w0_f, ()), t(b0_f, ()), xs, ys, xq, yq, alpha=alpha, order=order
        )
        w0_new = w - beta * meta_w
        b0_new = b - beta * meta_b

    return ToyResult(
        w0=w.item(),
        b0=b.item(),
        support_grad_w=gs_w.item(),
        support_grad_b=gs_b.item(),
        w1=w1.item(),
        b1=b1.item(),
        query_grad_w=gq_w.item(),
        query_grad_b=gq_b.item(),
        meta_grad_w_autograd=meta_w.item(),
        meta_grad_b_autograd=meta_b.item(),
        meta_grad_w_manual=man_w.item(),
        meta_grad_b_manual=man_b.item(),
        w0_updated=w0_new.item(),
        b0_updated=b0_new.item(),
        order=order,
        support=(xs, ys),
        query=(xq, yq),
        inner_lr=alpha,
        meta_lr=beta,
        dtype=_DTYPES[dtype],
    )
