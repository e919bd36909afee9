"""Pytree plumbing shared by the strategies: flattening ``MetaParams``, indexing problems."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metagrad._compat import is_functorch_wrapped, pytree
from metagrad.bilevel._problem import MetaParams, PerStep


class Flat:
    """``MetaParams`` as a flat list of leaves, with the positions that are differentiated.

    ``wrt`` holds the indices of the tensor leaves that require grad (when gradients are
    wanted); ``names`` a readable path per leaf (``"h['lam']"``) for messages.
    """

    def __init__(self, mp: MetaParams, need_grad: bool) -> None:
        self.leaves, self.spec = pytree.tree_flatten(tuple(mp))
        w0 = mp.w0
        plain = isinstance(w0, dict) and all(isinstance(v, Tensor) for v in w0.values())
        self.n_w0 = len(w0) if plain else len(pytree.tree_flatten(w0)[0])
        self.wrt = (
            [i for i, x in enumerate(self.leaves) if isinstance(x, Tensor) and x.requires_grad]
            if need_grad
            else []
        )

    def names(self) -> list[str]:
        paths, _ = pytree.tree_flatten_with_path(tuple(self.leaves_as_tree()))
        fields = ("w0", "h", "opt")
        out = []
        for path, _ in paths:
            head = path[0]
            idx = getattr(head, "idx", 0)
            out.append(fields[idx] + pytree.keystr(path[1:]))
        return out

    def leaves_as_tree(self) -> MetaParams:
        return MetaParams(*pytree.tree_unflatten(self.leaves, self.spec))

    def rebuild(self, values: list[Any], at: list[int] | None = None) -> MetaParams:
        """``MetaParams`` with ``values`` at positions ``at`` (default ``wrt``), others kept."""
        leaves = list(self.leaves)
        for i, v in zip(self.wrt if at is None else at, values):
            leaves[i] = v
        return MetaParams(*pytree.tree_unflatten(leaves, self.spec))

    def detached(self) -> MetaParams:
        return MetaParams(*pytree.tree_unflatten([detach(x) for x in self.leaves], self.spec))

    def grads(self, values: dict[int, Tensor | None]) -> MetaParams:
        """Gradients shaped like the ``MetaParams``: ``values[i]`` at leaf ``i``, None elsewhere."""
        leaves: list[Any] = [values.get(i) for i in range(len(self.leaves))]
        return MetaParams(*pytree.tree_unflatten(leaves, self.spec))


def detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def fresh_leaf(x: Any) -> Any:
    """A leaf copy of ``x`` (sharing storage) that requires grad where ``x`` does."""
    if not isinstance(x, Tensor):
        return x
    return x.detach().requires_grad_(x.requires_grad and x.is_floating_point())


def tree_detach(tree: Any) -> Any:
    return pytree.tree_map(detach, tree)


def count_problems(fn_name: str, inner_data: Any, outer_data: Any) -> int:
    """The leading (problem) dimension shared by every tensor of the data."""
    leaves = [
        x
        for x in pytree.tree_leaves(unwrap_per_step((inner_data, outer_data)))
        if isinstance(x, Tensor)
    ]
    if not leaves:
        raise ValueError(
            f"{fn_name}: batched=True needs tensors with a leading problem dimension in "
            f"inner_data/outer_data; got no tensors."
        )
    sizes = {int(x.shape[0]) if x.dim() else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            f"{fn_name}: with batched=True every data tensor needs the same leading problem "
            f"dimension; got leading sizes {sorted(sizes)}. Stack the problems' data with "
            f"torch.stack, or pass batched=False for a single problem."
        )
    return sizes.pop()


def unwrap_per_step(tree: Any) -> Any:
    """``tree`` with every :class:`PerStep` replaced by its list of batches (pytree-visible)."""
    if isinstance(tree, PerStep):
        return list(tree.batches)
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(unwrap_per_step(x) for x in tree)
    return tree


def index(tree: Any, i: int | slice) -> Any:
    """Problem ``i`` (or a slice of problems) of batched data (every tensor leaf indexed on its
    first dimension; the batches of a :class:`PerStep` too)."""
    if isinstance(tree, PerStep):
        return PerStep([index(b, i) for b in tree.batches])
    return pytree.tree_map(lambda x: x[i] if isinstance(x, Tensor) else x, tree)


class GradSum(dict[int, Tensor | None]):
    """Running sums of gradients by leaf index, filled by :func:`accumulate`.

    The first gradient of a key is kept as given (it may alias a caller's tensor); the second
    makes a new tensor ``prev + g``, which this container owns, and later gradients are added to
    that one in place. So a sum over P problems allocates once per key instead of P - 1 times,
    and holds two copies of the key's gradient at a time instead of three. ``a.add_(b)`` rounds
    like ``a + b`` and the order of the sum is unchanged, so the values are the same bit for bit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.owned: set[int] = set()


def _plain(t: Tensor) -> bool:
    """An ordinary tensor outside autograd and torch.func: safe to update in place."""
    return not t.requires_grad and not is_functorch_wrapped(t)


def accumulate(total: dict[int, Tensor | None], key: int, g: Tensor | None) -> None:
    """``total[key] += g`` (``None`` adds nothing); in place where ``total`` owns the sum."""
    if g is None:
        return
    prev = total.get(key)
    if prev is None:
        total[key] = g
        return
    owned = total.owned if isinstance(total, GradSum) else None
    if (
        owned is not None
        and key in owned
        and prev.shape == g.shape
        and prev.dtype == g.dtype
        and _plain(g)
    ):
        prev.add_(g)
        return
    s = prev + g
    total[key] = s
    if owned is not None and _plain(s):
        owned.add(key)


def all_finite(values: list[Tensor | None]) -> bool:
    parts = [v.isfinite().all() for v in values if v is not None]
    return bool(torch.stack(parts).all()) if parts else True


def map_tensors(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    return pytree.tree_map(lambda x: fn(x) if isinstance(x, Tensor) else x, tree)


def is_plain(tree_: Any) -> bool:
    """A flat dict of tensors, or an empty container (EmptyState, ``{}``, ``()``)."""
    if type(tree_) is dict:
        return all(isinstance(t, Tensor) for t in tree_.values())
    return isinstance(tree_, tuple | dict) and len(tree_) == 0


def plain_leaves(tree_: Any) -> list[Any]:
    """``pytree.tree_leaves`` without the walk for :func:`is_plain` trees (called every step)."""
    if is_plain(tree_):
        return list(tree_.values()) if tree_ else []
    leaves: list[Any] = pytree.tree_leaves(tree_)
    return leaves
