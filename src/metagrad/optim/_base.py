"""The protocol every differentiable optimizer follows, and parameter groups.

An optimizer is a frozen dataclass of hyperparameters with an optax-style ``init``/``update``
pair over parameter dicts. ``update`` is a pure function written with out-of-place tensor ops,
so a whole training trajectory can be differentiated with ``torch.autograd``
(``create_graph=True``), ``torch.func.grad``, ``torch.func.vmap`` or ``torch.func.jvp``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from metagrad._typing import Params

__all__ = ["LR", "Group", "Hyper", "Optimizer", "Params", "Selector"]

LR = float | Tensor
"""A learning rate: a number, a 0-d tensor or a tensor broadcastable to the parameter."""

Hyper = float | Tensor
"""A hyperparameter value: a number, a 0-d tensor, or a tensor broadcastable to the parameter
(per-element). A tensor with ``requires_grad=True`` is differentiable."""

Selector = str | tuple[str, ...] | Callable[[str], bool]
"""Which parameters a :class:`Group` covers: a name, a module prefix, names/prefixes, or a
predicate on the qualified name."""


class Optimizer(Protocol):
    """A differentiable optimizer: pure ``init``/``update`` over parameter dicts."""

    def init(self, params: Params) -> Any:
        """Return the initial state: a NamedTuple whose fields are ``dict[str, Tensor]``."""
        ...

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, Any]:
        """Return ``(new_params, new_state)`` for update number ``step`` (0-based).

        ``lrs`` replaces the configured learning rate per parameter when given. Never writes to
        its inputs.
        """
        ...

    def hyperparams(self) -> dict[str, Tensor]:
        """Every hyperparameter given as a tensor, under a flat name (``"betas.0"``)."""
        ...

    def with_hyperparams(self, values: Mapping[str, Tensor]) -> Optimizer:
        """A copy with the tensors ``values`` (keys as in :meth:`hyperparams`) substituted."""
        ...


def _normalize_select(select: object) -> Selector:
    if isinstance(select, str):
        return select
    if isinstance(select, (list, tuple, set, frozenset)) and all(
        isinstance(s, str) for s in select
    ):
        # Sets have no order; sorting keeps repr and equality stable.
        items = sorted(select) if isinstance(select, (set, frozenset)) else list(select)
        return tuple(items)
    if callable(select):
        return select  # type: ignore[return-value]
    raise TypeError(
        f"metagrad.optim.Group: select={select!r} is not supported; pass a parameter name "
        f"('head.weight'), a module prefix ('layer1' matches 'layer1.weight'), a list of "
        f"names/prefixes, or a predicate such as lambda name: name.endswith('bias')."
    )


def _prefix_match(pattern: str, name: str) -> bool:
    return name == pattern or name.startswith(pattern + ".")


@dataclass(frozen=True, init=False, repr=False)
class Group:
    """Hyperparameter overrides for a subset of the parameters (a torch.optim param group).

    Args:
        select: A parameter name, a module prefix (``"layer1"`` matches ``"layer1.weight"``
            and ``"layer1.sub.bias"`` but not ``"layer10.weight"``), a list of names or
            prefixes, or a predicate ``Callable[[str], bool]`` on the qualified name.
        **hyper: Values replacing the optimizer's own for the selected parameters, e.g.
            ``lr=0.1, betas=(0.8, 0.99), amsgrad=True``. The optimizer checks the names.

    The first group that matches a parameter wins; unmatched parameters use the optimizer's
    top-level values.

    Example:
        >>> g = Group("layer1", lr=0.1)
        >>> g.matches("layer1.weight"), g.matches("layer10.weight")
        (True, False)
    """

    select: Selector
    overrides: tuple[tuple[str, Any], ...]

    def __init__(self, select: object, /, **hyper: Any) -> None:
        object.__setattr__(self, "select", _normalize_select(select))
        # Lists become tuples so a Group (and so an optimizer) stays hashable.
        items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in hyper.items())
        object.__setattr__(self, "overrides", items)

    @property
    def hyper(self) -> dict[str, Any]:
        """The overrides as a dict."""
        return dict(self.overrides)

    def matches(self, name: str) -> bool:
        """Whether the parameter ``name`` belongs to this group."""
        sel = self.select
        if isinstance(sel, str):
            return _prefix_match(sel, name)
        if isinstance(sel, tuple):
            return any(_prefix_match(s, name) for s in sel)
        return bool(sel(name))

    def __repr__(self) -> str:
        args = [repr(self.select)] + [f"{k}={v!r}" for k, v in self.overrides]
        return f"Group({', '.join(args)})"
