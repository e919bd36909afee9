"""Build the metagrad optimizer equivalent to a ``torch.optim`` optimizer instance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metagrad.optim._adadelta import Adadelta
from metagrad.optim._adagrad import Adagrad
from metagrad.optim._adam import Adam
from metagrad.optim._adamax import Adamax
from metagrad.optim._adamw import AdamW
from metagrad.optim._asgd import ASGD
from metagrad.optim._base import Group, Optimizer
from metagrad.optim._common import OptimizerBase
from metagrad.optim._rmsprop import RMSprop
from metagrad.optim._rprop import Rprop
from metagrad.optim._sgd import SGD

_FN = "metagrad.optim.from_torch"

# torch class -> metagrad class. AdamW first: it subclasses Adam in current torch.
_TABLE: tuple[tuple[type[torch.optim.Optimizer], type[OptimizerBase]], ...] = (
    (torch.optim.AdamW, AdamW),
    (torch.optim.Adam, Adam),
    (torch.optim.SGD, SGD),
    (torch.optim.RMSprop, RMSprop),
    (torch.optim.Adagrad, Adagrad),
    (torch.optim.Adadelta, Adadelta),
    (torch.optim.Adamax, Adamax),
    (torch.optim.ASGD, ASGD),
    (torch.optim.Rprop, Rprop),
)


def _target(optimizer: torch.optim.Optimizer) -> type[OptimizerBase]:
    # Exact type first, so a subclass with a changed rule is not silently mistranslated
    # unless it derives from a supported class.
    for torch_cls, ours in _TABLE:
        if type(optimizer) is torch_cls:
            return ours
    for torch_cls, ours in _TABLE:
        if isinstance(optimizer, torch_cls):
            return ours
    names = ", ".join(f"torch.optim.{c.__name__}" for c, _ in _TABLE)
    raise TypeError(
        f"{_FN}: {type(optimizer).__module__}.{type(optimizer).__name__} is not supported; "
        f"supported classes: {names}."
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _group_values(cls: type[OptimizerBase], group: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in cls._hypers + cls._flags:
        if name == "eps_root":
            continue  # metagrad-only; torch's Adam is eps_root=0
        value = group[name]
        values[name] = tuple(value) if name in cls._pairs else value
    return values


def from_torch(optimizer: torch.optim.Optimizer, named_params: Mapping[str, Tensor]) -> Optimizer:
    """The metagrad optimizer whose iterates equal those of a ``torch.optim`` instance.

    Each torch param group becomes a :class:`~metagrad.optim.Group` selecting the names of its
    parameters (the first group's values become the top-level ones). ``torch.optim.Adam``
    with ``decoupled_weight_decay=True`` becomes :class:`~metagrad.optim.AdamW`. The torch
    optimizer's accumulated state (moments, step counts) is not carried over: start the
    metagrad one with ``init``.

    Args:
        optimizer: A torch optimizer of a supported class.
        named_params: Name -> tensor for exactly the parameters the optimizer holds (e.g.
            ``dict(model.named_parameters())``), the same tensor objects.

    Returns:
        The equivalent metagrad optimizer.

    Raises:
        TypeError: An unsupported optimizer class (the message lists the supported ones).
        ValueError: ``named_params`` does not cover exactly the optimizer's parameters, or
            param groups mix ``decoupled_weight_decay`` settings.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> from_torch(torch.optim.SGD([w], lr=0.1, momentum=0.9), {"w": w})
        SGD(lr=0.1, momentum=0.9, dampening=0, weight_decay=0, nesterov=False, maximize=False, groups=())
    """
    cls = _target(optimizer)
    by_id = {id(t): name for name, t in named_params.items()}
    group_names: list[list[str]] = []
    for i, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(
                    f"{_FN}: param_groups[{i}] holds a tensor of shape {tuple(p.shape)} that is "
                    f"not in named_params; pass every parameter the optimizer holds, e.g. "
                    f"dict(model.named_parameters())."
                )
            names.append(by_id.pop(id(p)))
        group_names.append(names)
    if by_id:
        raise ValueError(
            f"{_FN}: named_params has parameters the torch optimizer does not hold: "
            f"{sorted(by_id.values())}; pass only the ones it optimizes."
        )
    if cls is Adam:
        decoupled = {bool(g.get("decoupled_weight_decay", False)) for g in optimizer.param_groups}
        if len(decoupled) > 1:
            raise ValueError(
                f"{_FN}: torch.optim.Adam param groups mix decoupled_weight_decay=True and "
                f"False; metagrad has Adam and AdamW, one per optimizer: split it in two."
            )
        if decoupled == {True}:
            cls = AdamW
    values = [_group_values(cls, g) for g in optimizer.param_groups]
    top = values[0]
    groups = tuple(
        Group(tuple(names), **{k: v for k, v in vals.items() if not _same(v, top[k])})
        for names, vals in zip(group_names[1:], values[1:])
        if names
    )
    return cls(**top, groups=groups)  # type: ignore[call-arg]
