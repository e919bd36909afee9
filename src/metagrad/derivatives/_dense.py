"""Dense Jacobians and Hessians, one reverse pass per output element (small problems)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast, overload

import torch
from torch import Tensor

from metagrad._tree import tree_leaves
from metagrad._typing import TensorTree
from metagrad.derivatives._autograd import grad_tree, prepare_primals, raise_if_unused
from metagrad.derivatives._checks import check_scalar_output, check_tree
from metagrad.functional._attention import attention_for

DenseDerivative = Tensor | dict[str, Tensor] | dict[str, dict[str, Tensor]]
"""A tensor, a dict over input (or output) keys, or a nested dict ``D[out_key][in_key]``."""


@overload
def jacobian(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> Tensor: ...


@overload
def jacobian(
    f: Callable[[dict[str, Tensor]], Tensor],
    x: Mapping[str, Tensor],
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> dict[str, Tensor]: ...


@overload
def jacobian(
    f: Callable[[Tensor], dict[str, Tensor]],
    x: Tensor,
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> dict[str, Tensor]: ...


@overload
def jacobian(
    f: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    x: Mapping[str, Tensor],
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> dict[str, dict[str, Tensor]]: ...


@overload
def jacobian(
    f: Callable[[Any], Any],
    x: TensorTree,
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> DenseDerivative: ...


def jacobian(
    f: Callable[[Any], Any],
    x: Tensor | Mapping[str, Tensor],
    *,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> DenseDerivative:
    r"""Dense Jacobian :math:`J_{ij} = \partial f_i(x) / \partial x_j`, laid out as by ``jacrev``.

    For an output of shape ``O`` and an input of shape ``S`` the block has shape ``O + S``. A
    dict input gives a dict over its keys, a dict output a dict over its keys, and both a
    nested dict ``J[out_key][in_key]``. Costs one reverse pass per output element, so it is
    meant for small problems and tests; use :func:`hvp` at scale.

    Args:
        f: Function of ``x`` returning a floating tensor of any shape, or a dict of them.
        x: Floating tensor or dict name -> tensor.
        create_graph: Keep the graph of the result (differentiable with respect to ``x`` when
            its leaves require grad). Otherwise the result is detached.
        allow_unused: Treat leaves of ``x`` that do not reach the output as having a zero
            Jacobian instead of raising.

    Returns:
        The Jacobian as described above. Nothing is written to any ``.grad``.

    Raises:
        TypeError: ``x`` or ``f(x)`` is not a floating tensor or dict of them.
        ValueError: a leaf of ``x`` does not reach the output and ``allow_unused=False``.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> jacobian(lambda t: torch.stack([t[0] * t[1], t[0] ** 2]), x)
        tensor([[2., 1.],
                [2., 0.]], dtype=torch.float64)
    """
    fn = "metagrad.jacobian"
    check_tree(fn, x, "x")
    xs = prepare_primals(cast(TensorTree, x), create_graph)
    # create_graph: the caller may differentiate the Jacobian, i.e. f's backward pass.
    with torch.enable_grad(), attention_for(create_graph):
        out = f(xs)
        check_tree(fn, out, "f(x)")
        return jacobian_of(fn, out, xs, create_graph=create_graph, allow_unused=allow_unused)


@overload
def hessian(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> Tensor: ...


@overload
def hessian(
    f: Callable[[dict[str, Tensor]], Tensor],
    x: Mapping[str, Tensor],
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> dict[str, dict[str, Tensor]]: ...


@overload
def hessian(
    f: Callable[[Any], Tensor],
    x: TensorTree,
    *,
    create_graph: bool = ...,
    allow_unused: bool = ...,
) -> DenseDerivative: ...


def hessian(
    f: Callable[[Any], Tensor],
    x: Tensor | Mapping[str, Tensor],
    *,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> DenseDerivative:
    r"""Dense Hessian :math:`H_{ab} = \partial^2 f(x) / \partial x_a \partial x_b` of a scalar ``f``.

    A tensor ``x`` of shape ``S`` gives a tensor of shape ``S + S``; a dict ``x`` gives the
    nested dict ``H[a][b]`` of shape ``shape_a + shape_b``, as ``torch.func.hessian`` does.
    Computed as the Jacobian of the gradient (one reverse pass per parameter), so it is meant
    for small parameter counts; use :func:`hvp` otherwise.

    Args:
        f: Function of ``x`` returning a scalar (one-element) tensor.
        x: Floating tensor or dict name -> tensor.
        create_graph: Keep the graph of the result; otherwise it is detached.
        allow_unused: Treat leaves of ``x`` that do not reach ``f``'s output as having zero
            derivatives instead of raising. (Leaves on which only the gradient does not depend,
            as for a linear ``f``, are fine either way: their Hessian blocks are zero.)

    Returns:
        The Hessian as described above. Nothing is written to any ``.grad``.

    Raises:
        TypeError: ``x`` is not a floating tensor or dict of them, or ``f`` returns a
            non-tensor.
        ValueError: ``f`` returns more than one element, or a leaf of ``x`` is unused.

    Example:
        >>> import torch
        >>> p = {"x": torch.tensor([3.0, 1.0], dtype=torch.float64),
        ...      "y": torch.tensor([1.0, 2.0], dtype=torch.float64)}
        >>> H = hessian(lambda q: (q["x"] @ q["y"]) ** 2, p)
        >>> H["x"]["y"][0]  # d/dy of dw/dx_1 for w = (x.y)^2
        tensor([16.,  2.], dtype=torch.float64)
    """
    fn = "metagrad.hessian"
    check_tree(fn, x, "x")
    xs = prepare_primals(cast(TensorTree, x), create_graph)
    with torch.enable_grad(), attention_for(True):  # differentiates f's backward pass
        out = check_scalar_output(fn, f(xs))
        g = grad_tree(fn, out, xs, create_graph=True, allow_unused=allow_unused)
        # A gradient that does not depend on x (linear f) is a genuine zero Hessian.
        return jacobian_of(fn, g, xs, create_graph=create_graph, allow_unused=True)


def jacobian_of(
    fn_name: str,
    out: TensorTree,
    xs: TensorTree,
    *,
    create_graph: bool,
    allow_unused: bool,
) -> DenseDerivative:
    """Jacobian of an already computed ``out`` with respect to the leaves ``xs``."""
    out_leaves, in_leaves = tree_leaves(out), tree_leaves(xs)
    flat = torch.cat([o.reshape(-1) for o in out_leaves])
    m = flat.numel()
    # cols[j][i] is row i of the block for input leaf j (flattened).
    cols: list[list[Tensor]] = [[] for _ in in_leaves]
    if flat.requires_grad:
        # Rows in chunks, each one batched reverse pass (see BENCHMARKS.md for the gain).
        chunk = max(1, min(m, 2048))
        eye = torch.eye(m, dtype=flat.dtype, device=flat.device)
        for start in range(0, m, chunk):
            basis = eye[start : start + chunk]
            rows = _jacobian_rows(flat, in_leaves, basis, create_graph)
            if start == 0 and not allow_unused:
                raise_if_unused(fn_name, xs, [None if r is None else r[0] for r in rows])
            for j, t in enumerate(in_leaves):
                r = rows[j]
                cols[j].extend([torch.zeros_like(t)] * basis.shape[0] if r is None else r)
    elif m and not allow_unused:
        raise_if_unused(fn_name, xs, [None] * len(in_leaves))
    blocks = [
        torch.stack([r.reshape(-1) for r in rows]) if rows else t.new_zeros((m, t.numel()))
        for t, rows in zip(in_leaves, cols, strict=True)
    ]
    return _split_blocks(blocks, out, xs)


def _jacobian_rows(
    flat: Tensor, in_leaves: list[Tensor], basis: Tensor, create_graph: bool
) -> list[list[Tensor] | None]:
    """Rows ``basis @ J`` per input leaf (None: the leaf does not reach ``flat``).

    One batched reverse pass (``is_grads_batched`` vmaps the backward); ops without a batching
    rule fall back to one pass per row.
    """
    try:
        grads = torch.autograd.grad(
            flat,
            in_leaves,
            grad_outputs=basis,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        return [None if g is None else list(g.unbind(0)) for g in grads]
    except RuntimeError:
        per_row = [
            torch.autograd.grad(
                flat,
                in_leaves,
                grad_outputs=b,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            for b in basis
        ]
        return [
            None if per_row[0][j] is None else [r[j] for r in per_row]  # type: ignore[misc]
            for j in range(len(in_leaves))
        ]


def _split_blocks(blocks: list[Tensor], out: TensorTree, xs: TensorTree) -> DenseDerivative:
    """Cut the ``[m, n_j]`` blocks into one ``out_leaf.shape + x_leaf.shape`` piece per pair."""
    out_leaves, in_leaves = tree_leaves(out), tree_leaves(xs)

    def block(k0: int, o: Tensor, j: int) -> Tensor:
        return blocks[j][k0 : k0 + o.numel()].reshape(o.shape + in_leaves[j].shape)

    offsets = [0]
    for o in out_leaves:
        offsets.append(offsets[-1] + o.numel())
    per_out: list[Tensor | dict[str, Tensor]] = []
    for k0, o in zip(offsets[:-1], out_leaves, strict=True):
        if isinstance(xs, Tensor):
            per_out.append(block(k0, o, 0))
        else:
            per_out.append({name: block(k0, o, j) for j, name in enumerate(xs)})
    if isinstance(out, Tensor):
        return per_out[0]
    return dict(zip(out, per_out, strict=True))  # type: ignore[return-value]
