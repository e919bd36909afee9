"""Closed-over tensors: leaves that require grad and reach an objective without being declared.

A loss function (or a custom optimizer) may close over a tensor that requires grad, e.g. a
learnable weight-decay coefficient. Its gradient exists, but an engine that differentiates only
the tensors it was given would silently leave it ``None``. The graph of the objective knows every
leaf it reaches (its ``AccumulateGrad`` nodes); those that were not declared are *foreign*.

A declared tensor that is not a leaf (``h = {"lr": log_lr.exp()}``) is a boundary of the walk:
what lies behind it (``log_lr``) receives its gradient through the declared tensor, by the
chain rule of :meth:`HyperGrad.attach`, not as a foreign leaf (that would count it twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

# The node type autograd puts at every leaf that requires grad.
_ACCUMULATE: Any = type(
    torch.empty(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
)


def graph_leaves(roots: Sequence[Tensor], stop: Iterable[Tensor] = ()) -> list[Tensor]:
    """Leaf tensors that require grad and that the autograd graph of ``roots`` reaches.

    The walk does not go past the nodes that produced the non-leaf tensors in ``stop``.
    """
    seen: set[int] = set()
    keep: list[object] = []  # holds the nodes, so that no id is reused during the walk
    for t in stop:
        if t.grad_fn is not None:
            seen.add(id(t.grad_fn))
            keep.append(t.grad_fn)
    out: list[Tensor] = []
    out_ids: set[int] = set()
    stack: list[Any] = []
    for r in roots:
        if r.grad_fn is not None:
            stack.append(r.grad_fn)
        elif r.requires_grad and id(r) not in out_ids:  # a root that is itself a leaf
            out.append(r)
            out_ids.add(id(r))
    while stack:
        fn: Any = stack.pop()
        key = id(fn)
        if key in seen:
            continue
        seen.add(key)
        keep.append(fn)
        if type(fn) is _ACCUMULATE:
            var = fn.variable
            if id(var) not in out_ids:
                out.append(var)
                out_ids.add(id(var))
            continue
        for nxt, _ in fn.next_functions:
            if nxt is not None and id(nxt) not in seen:
                stack.append(nxt)
    return out


def foreign_leaves(roots: Sequence[Tensor], known: Iterable[object]) -> list[Tensor]:
    """Leaves reached by ``roots`` that are not among ``known`` (compared by identity).

    Known tensors that are not leaves stop the walk (see the module docstring).
    """
    tensors = [t for t in known if isinstance(t, Tensor)]
    ids = {id(t) for t in tensors}
    stop = [t for t in tensors if t.grad_fn is not None]
    return [t for t in graph_leaves(roots, stop) if id(t) not in ids]


def add_pairs(
    acc: dict[int, tuple[Tensor, Tensor]], pairs: Iterable[tuple[Tensor, Tensor]], scale: float
) -> None:
    """Add ``scale * g`` of each ``(tensor, g)`` to ``acc``, keyed by the tensor's identity
    (the same closed-over tensor in every task or problem sums into one gradient)."""
    for t, g in pairs:
        prev = acc.get(id(t))
        acc[id(t)] = (t, g * scale if prev is None else prev[1] + g * scale)


def describe(tensors: Sequence[Tensor]) -> str:
    """Short description of tensors for messages: shapes and dtypes."""
    parts = [f"tensor{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors[:4]]
    more = f" and {len(tensors) - 4} more" if len(tensors) > 4 else ""
    return ", ".join(parts) + more
