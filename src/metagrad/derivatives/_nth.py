"""Repeated differentiation of a scalar function of one scalar."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from metagrad.derivatives._autograd import prepare_primals
from metagrad.derivatives._checks import check_order, check_scalar_output, check_tree, describe
from metagrad.functional._attention import attention_for

_FN = "metagrad.nth_derivative"


def nth_derivative(
    f: Callable[[Tensor], Tensor], x: Tensor, n: int, *, create_graph: bool = False
) -> Tensor:
    r"""The ``n``-th derivative of a scalar function of a scalar, evaluated at ``x``.

    .. math::

        \frac{d^n f}{dx^n}(x), \qquad \frac{d^0 f}{dx^0}(x) = f(x)

    computed by ``n`` nested ``torch.autograd.grad(..., create_graph=True)`` calls. Once a
    derivative no longer depends on ``x`` (autograd has no path left, e.g. the 4th derivative
    of a cubic, or an ``f`` that ignores ``x``) every higher derivative is returned as an
    exact zero instead of raising.

    Args:
        f: Function of a scalar tensor returning a scalar (one-element) tensor.
        x: Floating-point tensor with exactly one element (0-dim or shape ``(1,)`` etc.).
        n: Order of the derivative, an ``int >= 0``; ``n=0`` returns ``f(x)``.
        create_graph: Keep the graph of the result so it can be differentiated again (with
            respect to ``x`` if ``x.requires_grad``, and to any tensor ``f`` closes over).
            Otherwise the result is detached.

    Returns:
        A 0-dim tensor with ``f``'s dtype. Nothing is written to any ``.grad``.

    Raises:
        TypeError: ``x`` is not a floating tensor, ``n`` is not an int, or ``f`` does not
            return a floating tensor.
        ValueError: ``x`` or ``f(x)`` has more than one element, or ``n < 0``.

    Example:
        >>> import torch
        >>> x = torch.tensor(-2.0, dtype=torch.float64)
        >>> [nth_derivative(lambda t: 2 * t**3, x, n).item() for n in range(6)]
        [-16.0, 24.0, -24.0, 12.0, 0.0, 0.0]
    """
    n = check_order(_FN, n)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{_FN}: x must be a one-element floating tensor, got {describe(x)}; wrap numbers "
            f"with torch.tensor(value, dtype=torch.float64)."
        )
    check_tree(_FN, x)
    if x.numel() != 1:
        raise ValueError(
            f"{_FN}: x must have exactly one element, got {describe(x)}; for functions of "
            f"several variables use hvp, hessian or jacobian."
        )
    xs = cast(Tensor, prepare_primals(x, create_graph))
    with torch.enable_grad(), attention_for(n >= 2 or create_graph):
        y = check_scalar_output(_FN, f(xs))
        for k in range(n):
            if not y.requires_grad:
                # No path left to x: this and every higher derivative is exactly zero.
                y = torch.zeros_like(y)
                break
            # Intermediate orders always need their graph; only the last one is optional.
            keep = create_graph or k < n - 1
            (g,) = torch.autograd.grad(y, xs, create_graph=keep, allow_unused=True)
            y = torch.zeros_like(y) if g is None else g.reshape(())
    return y if create_graph else y.detach()
