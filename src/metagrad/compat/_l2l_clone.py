"""Differentiable module copies: ``clone_module`` / ``update_module`` and fast-weight views.

A *differentiable clone* is an ``nn.Module`` of the same class whose parameters are non-leaf
tensors computed from the original's (``p.clone()``), so a loss on the clone back-propagates
into the original. We build it with ``copy.deepcopy`` and a pre-filled memo that maps each
parameter to its replacement: deepcopy then rebuilds the structure (submodules, tied weights,
RNN weight lists) around the replacements. Buffers are real copies, so nothing the clone does
(BatchNorm running statistics) reaches the original.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

_UPDATE_ATTR = "update"


def refresh_rnn(module: nn.Module) -> None:
    # RNN kernels read a cached list of weights, not ``_parameters``; rebuild it after a swap.
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def with_tensors(module: nn.Module, replace: Mapping[int, Tensor], memo: dict[int, Any]) -> Any:
    """Deep copy of ``module`` where every tensor whose ``id`` is in ``replace`` is swapped in.

    Args:
        module: the structure to copy (never modified).
        replace: ``id(original tensor) -> tensor to use in the copy`` (kept as is, not copied).
        memo: a ``copy.deepcopy`` memo, shared between calls to preserve sharing across modules.

    Returns:
        The copy (same class as ``module``).
    """
    for key, t in replace.items():
        memo.setdefault(key, t)
    out = copy.deepcopy(module, memo)
    for m in out.modules():
        refresh_rnn(m)
    return out


def clone_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of ``module`` whose parameters are differentiable clones of the original's.

    Same contract as ``learn2learn.clone_module``: the copy computes exactly what the original
    does, and a loss on it back-propagates into the original's parameters (the copy's parameters
    are the non-leaf tensors ``p.clone()``; frozen parameters stay frozen). Parameters shared
    between submodules stay shared.

    Difference from learn2learn: buffers are copied rather than shared, so a forward pass of the
    clone in train mode updates the *clone's* BatchNorm running statistics, never the original's.

    Args:
        module: the module to clone.
        memo: optional ``copy.deepcopy`` memo; pass the same dict when cloning several modules
            that share parameters or submodules so the clones share them too.

    Returns:
        The clone (an instance of ``type(module)``).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> clone = clone_module(net)
        >>> clone(torch.ones(2, 3)).sum().backward()
        >>> net.weight.grad
        tensor([[2., 2., 2.]])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"l2l.clone_module: module must be a torch.nn.Module, got {type(module).__name__}."
        )
    replace: dict[int, Tensor] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in replace:
                replace[id(p)] = p.clone()
        # deepcopy refuses non-leaf tensors: buffers in the graph (a clone's clone) are cloned.
        for b in m._buffers.values():
            if b is not None and b.grad_fn is not None and id(b) not in replace:
                replace[id(b)] = b.clone()
    out: nn.Module = with_tensors(module, replace, {} if memo is None else memo)
    return out


def _named_slots(module: nn.Module) -> Iterable[tuple[nn.Module, dict[str, Any], str]]:
    for m in module.modules():
        for key in list(m._parameters):
            yield m, m._parameters, key
        for key in list(m._buffers):
            yield m, m._buffers, key


def update_module(
    module: nn.Module,
    updates: Sequence[Tensor | None] | None = None,
    memo: dict[int, Tensor] | None = None,
) -> nn.Module:
    r"""Replace each parameter :math:`p` of ``module`` by :math:`p + u`, keeping the graph.

    Same contract as ``learn2learn.update_module``: the module is modified in place (its
    ``_parameters`` entries are re-pointed, tensors are not written) and returned. With
    ``updates=None`` each parameter or buffer's ``.update`` attribute is used (and reset to
    ``None``); entries that are ``None`` or have no update are left as they are.

    Args:
        module: the module to update, usually a :func:`clone_module` copy.
        updates: one tensor (or ``None``) per entry of ``module.parameters()``, in that order,
            e.g. ``[-lr * g for g in grads]``.
        memo: ``id(old tensor) -> new tensor``; shared tensors are updated once.

    Returns:
        ``module``.

    Raises:
        ValueError: ``updates`` has a different length than ``module.parameters()``
            (learn2learn prints a warning and silently drops the extra entries).

    Example:
        >>> import torch
        >>> net = clone_module(torch.nn.Linear(2, 1))
        >>> loss = net(torch.ones(4, 2)).pow(2).mean()
        >>> grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
        >>> _ = update_module(net, updates=[-0.1 * g for g in grads])
        >>> bool(net(torch.ones(4, 2)).pow(2).mean() < loss)
        True
    """
    if memo is None:
        memo = {}
    if updates is not None:
        params = list(module.parameters())
        updates = list(updates)
        if len(updates) != len(params):
            raise ValueError(
                f"l2l.update_module: got {len(updates)} updates for {len(params)} parameters; "
                f"pass one tensor (or None) per entry of module.parameters(), in that order."
            )
        for p, u in zip(params, updates):
            setattr(p, _UPDATE_ATTR, u)
    touched: set[int] = set()
    keep: list[Tensor] = []  # old tensors stay alive so their ids cannot be reused mid-walk
    for m, slots, key in _named_slots(module):
        t = slots[key]
        if t is None:
            continue
        if id(t) in memo:
            slots[key] = memo[id(t)]
        else:
            u = getattr(t, _UPDATE_ATTR, None)
            if u is not None:
                new = t + u
                setattr(t, _UPDATE_ATTR, None)
                keep.append(t)
                memo[id(t)] = new
                slots[key] = new
            else:
                continue
        touched.add(id(m))
    for m in module.modules():
        if id(m) in touched:
            refresh_rnn(m)
    return module


def _detached(t: Tensor, keep_requires_grad: bool) -> Tensor:
    wants = keep_requires_grad and t.requires_grad
    if t.is_leaf:
        return t.requires_grad_(wants) if t.requires_grad != wants else t
    return t.detach().requires_grad_(wants)


def detach_module(module: nn.Module, keep_requires_grad: bool = False) -> None:
    """Cut ``module``'s parameters and buffers from the graph they were computed in, in place.

    Same contract as ``learn2learn.detach_module``: meant for a clone, whose parameters are
    non-leaf tensors computed from the original's; afterwards a loss on the clone no longer
    back-propagates into the original. Leaf tensors (an original model's parameters) stop
    requiring gradients, as ``detach_()`` does to them in learn2learn. A ``MAML`` / ``MetaSGD``
    clone of this compat layer has its fast weights (and learned rates) detached.

    Args:
        module: the module (or compat clone) to detach.
        keep_requires_grad: detached tensors keep ``requires_grad=True`` where they had it
            (new leaves, e.g. to fine-tune the clone on its own).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> clone = clone_module(net)
        >>> detach_module(clone, keep_requires_grad=True)
        >>> clone(torch.ones(1, 2)).sum().backward()
        >>> net.weight.grad is None, clone.weight.grad is not None
        (True, True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"l2l.detach_module: module must be a torch.nn.Module, got {type(module).__name__}."
        )
    hook = getattr(module, "_detach_fast", None)
    if callable(hook) and hook(keep_requires_grad):
        return
    for m in module.modules():
        for slots in (m._parameters, m._buffers):
            for key, t in list(slots.items()):
                if t is not None and (t.requires_grad or t.grad_fn is not None):
                    slots[key] = _detached(t, keep_requires_grad)  # type: ignore[assignment]
        refresh_rnn(m)
