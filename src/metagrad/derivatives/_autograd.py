"""Shared tape-based (``torch.autograd``) plumbing: fresh primals, gradients, unused inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad._tree import tree_leaves, tree_map
from metagrad._typing import TensorTree
from metagrad.derivatives._checks import leaf_names


def prepare_primals(x: TensorTree, create_graph: bool) -> TensorTree:
    """Return the leaves to differentiate with respect to.

    With ``create_graph=True`` a leaf that already requires grad is used as is, so the result
    stays connected to whatever produced it (meta-parameters, an unrolled inner loop). Every
    other leaf becomes a fresh detached alias: nothing flows back into the caller's graph and
    nothing can land in the caller's ``.grad``.
    """

    def prepare(t: Tensor) -> Tensor:
        if create_graph and t.requires_grad:
            return t
        return t.detach().requires_grad_(True)

    return tree_map(prepare, x)


def from_leaves(leaves: Sequence[Tensor], like: TensorTree) -> TensorTree:
    """Rebuild a tree shaped like ``like`` from its leaves (inverse of ``tree_leaves``)."""
    if isinstance(like, Tensor):
        return leaves[0]
    return dict(zip(like, leaves, strict=True))


def raise_if_unused(fn_name: str, x: TensorTree, grads: Sequence[Tensor | None]) -> None:
    """Raise a ValueError naming the leaves of ``x`` whose gradient is None."""
    missing = [name for name, g in zip(leaf_names(x), grads, strict=True) if g is None]
    if missing:
        what = "x does" if isinstance(x, Tensor) else f"parameter(s) {missing} do"
        raise ValueError(
            f"{fn_name}: {what} not reach f's output (autograd found no path), so the "
            f"derivative is undefined rather than zero. Check that f really uses "
            f"{'x' if isinstance(x, Tensor) else 'them'} (a frozen branch, a .detach(), a "
            f"parameter the forward skips), or pass allow_unused=True to treat the "
            f"derivatives of unused inputs as zero."
        )


def grad_tree(
    fn_name: str,
    out: Tensor,
    xs: TensorTree,
    *,
    create_graph: bool,
    allow_unused: bool,
) -> TensorTree:
    """Gradient of the scalar ``out`` with respect to the leaves ``xs``, shaped like ``xs``.

    Leaves without a path to ``out`` raise (see :func:`raise_if_unused`) unless
    ``allow_unused``, in which case their gradient is zero.
    """
    leaves = tree_leaves(xs)
    grads: Sequence[Tensor | None]
    if out.requires_grad:
        grads = torch.autograd.grad(
            out, leaves, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
    else:
        grads = [None] * len(leaves)
    if not allow_unused:
        raise_if_unused(fn_name, xs, grads)
    filled = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]
    return from_leaves(filled, xs)


def vjp_leaves(
    outputs: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    create_graph: bool,
) -> list[Tensor]:
    """``sum_i cotangent_i^T d output_i / d inputs``, with zeros where there is no path.

    Outputs that do not require grad (constant gradients, e.g. of a linear function) contribute
    nothing and are skipped, since autograd refuses them.
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        list(inputs),
        grad_outputs=[c for _, c in pairs],
        create_graph=create_graph,
        retain_graph=True,
        allow_unused=True,
    )
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]


def maybe_detach(tree: Any, create_graph: bool) -> Any:
    """Detach every tensor in an arbitrary pytree unless ``create_graph`` asks to keep graphs."""
    if create_graph:
        return tree
    return pytree.tree_map_only(Tensor, lambda t: t.detach(), tree)
