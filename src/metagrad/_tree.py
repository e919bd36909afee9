"""Tiny helpers over the two structures the library accepts: a tensor, or a flat dict of tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from metagrad._typing import TensorTree


def tree_map(fn: Callable[..., Tensor], tree: TensorTree, *rest: TensorTree) -> TensorTree:
    """Apply ``fn`` leafwise to a tensor or to matching dicts of tensors."""
    if isinstance(tree, Tensor):
        return fn(tree, *rest)
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}  # type: ignore[index]


def tree_leaves(tree: TensorTree) -> list[Tensor]:
    """Leaves in a fixed order (dict insertion order)."""
    return [tree] if isinstance(tree, Tensor) else list(tree.values())


def tree_vdot(a: TensorTree, b: TensorTree) -> Tensor:
    """Sum over leaves of elementwise products: the Euclidean inner product of two trees."""
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))  # type: ignore[return-value]


def tree_flatten_vector(tree: TensorTree) -> Tensor:
    """Concatenate all leaves into one 1-D vector."""
    return torch.cat([t.reshape(-1) for t in tree_leaves(tree)])


def tree_unflatten_vector(vec: Tensor, like: TensorTree) -> TensorTree:
    """Inverse of :func:`tree_flatten_vector` for a tree shaped like ``like``."""
    out: dict[str, Tensor] = {}
    offset = 0
    items = [("", like)] if isinstance(like, Tensor) else list(like.items())
    for k, t in items:
        n = t.numel()
        out[k] = vec[offset : offset + n].view_as(t)
        offset += n
    return out[""] if isinstance(like, Tensor) else out


def check_same_structure(
    fn_name: str, a: TensorTree, b: TensorTree, a_name: str, b_name: str
) -> None:
    """Raise a clear error unless ``a`` and ``b`` are the same tensor/dict structure, shapes, dtypes."""
    if isinstance(a, Tensor) != isinstance(b, Tensor):
        raise TypeError(
            f"{fn_name}: {a_name} is a {type(a).__name__} but {b_name} is a {type(b).__name__}; "
            f"pass both as tensors or both as dicts with the same keys."
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise ValueError(
                f"{fn_name}: {b_name} has keys {sorted(b)} but {a_name} has keys {sorted(a)}; "
                f"give {b_name} exactly the keys of {a_name}."
            )
        pairs = [(k, a[k], b[k]) for k in a]
    else:
        pairs = [("", a, b)]  # type: ignore[list-item]
    for k, x, y in pairs:
        where = f"[{k!r}]" if k else ""
        if x.shape != y.shape:
            raise ValueError(
                f"{fn_name}: {b_name}{where} has shape {tuple(y.shape)} but {a_name}{where} has "
                f"shape {tuple(x.shape)}; tangents must match their primals' shapes."
            )
        if x.dtype != y.dtype:
            raise TypeError(
                f"{fn_name}: {b_name}{where} has dtype {y.dtype} but {a_name}{where} has dtype "
                f"{x.dtype}; cast it with .to({x.dtype})."
            )
