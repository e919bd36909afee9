"""Gradient-norm penalty: a differentiable function of the gradient itself."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from metagrad._tree import tree_flatten_vector
from metagrad._typing import TensorTree
from metagrad.derivatives._autograd import grad_tree, prepare_primals
from metagrad.derivatives._checks import check_scalar_output, check_tree, describe
from metagrad.functional._attention import attention_for

_FN = "metagrad.grad_norm_penalty"


def grad_norm_penalty(
    f: Callable[[Any], Tensor],
    x: Tensor | Mapping[str, Tensor],
    *,
    p: float = 2,
    squared: bool = True,
    create_graph: bool = True,
    allow_unused: bool = False,
) -> Tensor:
    r"""The norm of the gradient of ``f`` as a differentiable scalar (a second-order penalty).

    .. math::

        P(x) = \lVert \nabla_x f(x) \rVert_p^2 \quad (\texttt{squared=True}),
        \qquad
        \nabla_x P(x) = 2\, H(x)\, \nabla_x f(x) \quad (p = 2)

    where the norm runs over all leaves of ``x`` flattened into one vector. With
    ``create_graph=True`` (the default) the gradient is taken with
    ``torch.autograd.grad(create_graph=True)``, so ``P.backward()`` or
    ``torch.autograd.grad(P, ...)`` returns the second-order term above: with respect to the
    leaves of ``x`` that require grad, and to any tensor ``f`` closes over (e.g. a network's
    weights when ``x`` is its input, as in an input-gradient penalty). For ``p = 2`` and
    ``squared=True`` the sum of squares is formed directly, so the penalty stays smooth where
    the gradient vanishes.

    Args:
        f: Function of ``x`` returning a scalar (one-element) tensor.
        x: Floating tensor or dict name -> tensor.
        p: Order of the vector norm, a real ``p >= 1`` or ``math.inf`` (default 2).
        squared: Return :math:`\lVert g \rVert_p^2` (default) rather than :math:`\lVert g \rVert_p`.
        create_graph: Return a differentiable penalty (default). ``False`` returns a detached
            value, e.g. for logging, at the cost of a single backward pass.
        allow_unused: Treat leaves of ``x`` that do not reach ``f``'s output as having zero
            gradient instead of raising.

    Returns:
        A 0-dim tensor. Nothing is written to any ``.grad`` by this call.

    Raises:
        TypeError: ``x`` is not a floating tensor or dict of them, ``p`` is not a number, or
            ``f`` returns a non-tensor.
        ValueError: ``p < 1``, ``f`` returns more than one element, or a leaf of ``x`` is
            unused.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        >>> pen = grad_norm_penalty(lambda t: (t**3).sum(), w)  # ||3 w^2||^2
        >>> pen
        tensor(153., dtype=torch.float64, grad_fn=<SumBackward0>)
        >>> torch.autograd.grad(pen, w)[0]  # 2 H g = 2 * (6 w) * (3 w^2)
        tensor([  36., -288.], dtype=torch.float64)
        >>> w.grad is None
        True
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(
            f"{_FN}: p must be a real number >= 1 or math.inf, got {describe(p)}; pass e.g. p=2."
        )
    if math.isnan(p) or p < 1:
        raise ValueError(
            f"{_FN}: p must be >= 1 (a norm), got p={p}; use p=2 (default), p=1 or math.inf."
        )
    check_tree(_FN, x, "x")
    xs = prepare_primals(cast(TensorTree, x), create_graph)
    with torch.enable_grad(), attention_for(create_graph):  # the penalty's gradient is 2 H g
        out = check_scalar_output(_FN, f(xs))
        g = grad_tree(_FN, out, xs, create_graph=create_graph, allow_unused=allow_unused)
    flat = tree_flatten_vector(g)
    if p == 2 and squared:
        penalty = (flat * flat).sum()
    else:
        norm = torch.linalg.vector_norm(flat, ord=p)
        penalty = norm * norm if squared else norm
    return penalty if create_graph else penalty.detach()
