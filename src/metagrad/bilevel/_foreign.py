"""Closed-over tensors: leaves that require grad and reach an objective without being declared.

A loss function (or a custom optimizer) may close over a tensor that requires grad, e.g. a
learnable weight-decay coefficient. Its gradient exists, but an engine that differentiates only
the tensors it was given would silently leave it ``None``. The graph of the objective knows every
leaf it reaches (its ``AccumulateGrad`` nodes); those that were not declared are *foreign*.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor


def graph_leaves(roots: Sequence[Tensor]) -> list[Tensor]:
    """Leaf tensors that require grad and that the autograd graph of ``roots`` reaches."""
    seen: dict[int, object] = {}  # holds the nodes too, so no id is reused during the walk
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    out: list[Tensor] = []
    out_ids: set[int] = set()
    for r in roots:  # a root that is itself a leaf
        if r.grad_fn is None and r.requires_grad and id(r) not in out_ids:
            out.append(r)
            out_ids.add(id(r))
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        var = getattr(fn, "variable", None)
        if isinstance(var, Tensor):  # AccumulateGrad
            if id(var) not in out_ids:
                out.append(var)
                out_ids.add(id(var))
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return out


def foreign_leaves(roots: Sequence[Tensor], known: Iterable[object]) -> list[Tensor]:
    """Leaves reached by ``roots`` that are not among ``known`` (compared by identity)."""
    ids = {id(t) for t in known if isinstance(t, Tensor)}
    return [t for t in graph_leaves(roots) if id(t) not in ids]


def describe(tensors: Sequence[Tensor]) -> str:
    """Short description of tensors for messages: shapes and dtypes."""
    parts = [f"tensor{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors[:4]]
    more = f" and {len(tensors) - 4} more" if len(tensors) > 4 else ""
    return ", ".join(parts) + more
