"""Hessian-vector products, reverse-over-reverse and forward-over-reverse."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, Literal, cast, overload

import torch
from torch import Tensor

from metagrad._tree import check_same_structure, tree_leaves, tree_map
from metagrad._typing import TensorTree
from metagrad.derivatives._autograd import (
    from_leaves,
    grad_tree,
    maybe_detach,
    prepare_primals,
    vjp_leaves,
)
from metagrad.derivatives._checks import check_choice, check_scalar_output, check_tree, split_aux
from metagrad.derivatives._forward_ad_fix import MeanMSEAsNone, is_forward_ad_gap
from metagrad.functional._attention import higher_order_attention

_FN = "metagrad.hvp"
HVPMode = Literal["rev", "fwd"]


@overload
def hvp(
    f: Callable[[Any], Any],
    x: Tensor,
    v: Tensor,
    *,
    mode: HVPMode = ...,
    has_aux: Literal[False] = ...,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> Tensor: ...


@overload
def hvp(
    f: Callable[[Any], Any],
    x: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    *,
    mode: HVPMode = ...,
    has_aux: Literal[False] = ...,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> dict[str, Tensor]: ...


@overload
def hvp(
    f: Callable[[Any], Any],
    x: Tensor,
    v: Tensor,
    *,
    mode: HVPMode = ...,
    has_aux: Literal[True],
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> tuple[Tensor, Any]: ...


@overload
def hvp(
    f: Callable[[Any], Any],
    x: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    *,
    mode: HVPMode = ...,
    has_aux: Literal[True],
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> tuple[dict[str, Tensor], Any]: ...


@overload
def hvp(
    f: Callable[[Any], Any],
    x: TensorTree,
    v: TensorTree,
    *,
    mode: HVPMode = ...,
    has_aux: Literal[False] = ...,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> TensorTree: ...


@overload
def hvp(
    f: Callable[[Any], Any],
    x: TensorTree,
    v: TensorTree,
    *,
    mode: HVPMode = ...,
    has_aux: Literal[True],
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> tuple[TensorTree, Any]: ...


def hvp(
    f: Callable[[Any], Any],
    x: Tensor | Mapping[str, Tensor],
    v: Tensor | Mapping[str, Tensor],
    *,
    mode: HVPMode = "rev",
    has_aux: bool = False,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> TensorTree | tuple[TensorTree, Any]:
    r"""Hessian-vector product of a scalar function: :math:`H(x)\,v` without forming :math:`H`.

    .. math::

        H(x)\,v = \nabla_x \big( \nabla_x f(x)^\top v \big)
                = \frac{d}{d\epsilon} \nabla_x f(x + \epsilon v) \Big|_{\epsilon = 0}

    The first form is ``mode="rev"`` (reverse-over-reverse: a double backward through
    ``torch.autograd.grad(create_graph=True)``), the second ``mode="fwd"``
    (forward-over-reverse: ``torch.func.jvp(torch.func.grad(f), (x,), (v,))``). Both give the
    same answer; ``"fwd"`` composes with ``torch.func.vmap`` (e.g. over tasks), ``"rev"`` is
    often faster on CPU and detects unused parameters.

    PyTorch 2.13's ``F.mse_loss`` (mean reduction) breaks forward-over-reverse with
    ``RuntimeError: ZeroTensors are immutable``; ``"fwd"`` therefore evaluates ``f`` under a
    torch-function mode that computes it as ``mse_loss(..., reduction="none").mean()`` (same
    value and derivatives). If some other op still lacks a forward-mode formula, that call
    silently falls back to ``"rev"`` (``f`` is then evaluated a second time).

    To differentiate with respect to one argument of a function of several, close over the
    others (``lambda p: loss(p, batch)``); a dict ``x`` differentiates several tensors at once.

    Args:
        f: Function of ``x`` returning a scalar tensor (or ``(scalar, aux)`` if ``has_aux``).
        x: Point at which the Hessian is taken: a floating tensor or a dict name -> tensor.
        v: Tangent with exactly the structure, shapes and dtypes of ``x``.
        mode: ``"rev"`` (default) or ``"fwd"``, see above.
        has_aux: ``f`` returns ``(output, aux)``; ``aux`` is returned alongside.
        create_graph: Keep the graph of the result so it can be differentiated again, with
            respect to ``x`` (leaves that require grad), ``v`` and tensors ``f`` closes over.
            Otherwise the result (and ``aux``) is detached.
        allow_unused: With ``mode="rev"``, treat leaves of ``x`` that do not reach ``f``'s
            output as having zero derivative instead of raising. ``mode="fwd"`` cannot tell
            them apart (``torch.func`` gives them zero gradients) and always returns zeros.

    Returns:
        :math:`H v` with the structure of ``x`` (or ``(Hv, aux)`` if ``has_aux``). Nothing is
        written to any ``.grad``.

    Raises:
        TypeError: ``x``/``v`` are not floating tensors or dicts of them, dtypes differ, or
            ``f`` returns a non-tensor (or not a pair with ``has_aux``).
        ValueError: ``v`` has other keys or shapes than ``x``, ``f`` returns more than one
            element, ``mode`` is unknown, or (``"rev"``) a leaf of ``x`` is unused.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> f = lambda t: 0.5 * t @ A @ t
        >>> t = torch.ones(2, dtype=torch.float64)
        >>> v = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> hvp(f, t, v)
        tensor([2., 1.], dtype=torch.float64)
        >>> hvp(f, t, v, mode="fwd")
        tensor([2., 1.], dtype=torch.float64)
    """
    check_tree(_FN, x, "x")
    check_tree(_FN, v, "v")
    x, v = cast(TensorTree, x), cast(TensorTree, v)
    check_same_structure(_FN, x, v, "x", "v")
    check_choice(_FN, "mode", mode, ("rev", "fwd"))
    # Both modes differentiate f's backward pass (the fused attention kernels have no double
    # backward and no forward-mode formula: functional/_attention.py).
    with higher_order_attention():
        if mode == "fwd":
            try:
                with MeanMSEAsNone():
                    return _hvp_fwd(f, x, v, has_aux=has_aux, create_graph=create_graph)
            except RuntimeError as err:  # NotImplementedError is a RuntimeError
                if not is_forward_ad_gap(err):
                    raise
        return _hvp_rev(
            f, x, v, has_aux=has_aux, create_graph=create_graph, allow_unused=allow_unused
        )


def _hvp_rev(
    f: Callable[[Any], Any],
    x: TensorTree,
    v: TensorTree,
    *,
    has_aux: bool,
    create_graph: bool,
    allow_unused: bool,
) -> TensorTree | tuple[TensorTree, Any]:
    """Reverse-over-reverse: ``grad_x (grad_x f . v)`` with two ``torch.autograd.grad`` calls."""
    xs = prepare_primals(x, create_graph)
    with torch.enable_grad():
        out, aux = split_aux(_FN, f(xs), has_aux)
        out = check_scalar_output(_FN, out)
        # The gradient always keeps its graph: the second backward runs through it.
        g = grad_tree(_FN, out, xs, create_graph=True, allow_unused=allow_unused)
        hv_leaves = vjp_leaves(
            tree_leaves(g), tree_leaves(v), tree_leaves(xs), create_graph=create_graph
        )
    hv = from_leaves(hv_leaves, x)
    if has_aux:
        return hv, maybe_detach(aux, create_graph)
    return hv


def _hvp_fwd(
    f: Callable[[Any], Any],
    x: TensorTree,
    v: TensorTree,
    *,
    has_aux: bool,
    create_graph: bool,
) -> TensorTree | tuple[TensorTree, Any]:
    """Forward-over-reverse: ``torch.func.jvp(torch.func.grad(f), (x,), (v,))``."""

    def scalar_f(p: TensorTree) -> Any:
        out, aux = split_aux(_FN, f(p), has_aux)
        out = check_scalar_output(_FN, out)  # torch.func.grad insists on a 0-dim output
        return (out, aux) if has_aux else out

    if not create_graph:
        # Detached inputs plus no_grad outside the transforms: no outer graph is recorded
        # (torch.func.grad enables grad for its own level regardless).
        x = tree_map(torch.Tensor.detach, x)
        v = tree_map(torch.Tensor.detach, v)
    with nullcontext() if create_graph else torch.no_grad():
        res: Any = torch.func.jvp(
            torch.func.grad(scalar_f, has_aux=has_aux), (x,), (v,), has_aux=has_aux
        )
    if has_aux:
        return res[1], maybe_detach(res[2], create_graph)
    return res[1]
