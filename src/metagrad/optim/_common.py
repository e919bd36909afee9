"""Machinery shared by the optimizers: validation, parameter groups, hyperparameter swapping.

Each optimizer is a frozen dataclass that inherits :class:`OptimizerBase` and declares which of
its fields are numeric hyperparameters (``_hypers``, tensors allowed), which are pairs
(``betas``), which are boolean flags, and the range of each number.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group

if TYPE_CHECKING:
    from typing_extensions import Self

Bound = tuple[float, float, bool, bool]
"""``(low, high, low_closed, high_closed)``: the range a number must lie in."""

NONNEG: Bound = (0.0, math.inf, True, False)
UNIT_OPEN: Bound = (0.0, 1.0, True, False)  # [0, 1): betas
UNIT_CLOSED: Bound = (0.0, 1.0, True, True)  # [0, 1]: rho, alpha


def is_off(value: Any) -> bool:
    """True when ``value`` is the Python number 0, so its term can be skipped.

    A tensor is never "off": skipping on its value would be data-dependent control flow
    (breaks vmap/compile) and would drop the derivative with respect to it.
    """
    return not isinstance(value, Tensor) and value == 0


def signed(grad: Tensor, maximize: bool) -> Tensor:
    """The gradient to descend along: negated when maximizing."""
    return -grad if maximize else grad


def add_decay(grad: Tensor, param: Tensor, weight_decay: Any) -> Tensor:
    """Coupled (L2) weight decay, :math:`g + \\lambda p`."""
    return grad if is_off(weight_decay) else grad + weight_decay * param


def _fmt_bound(b: Bound) -> str:
    lo, hi, lo_closed, hi_closed = b
    if hi == math.inf:
        return f"{'>=' if lo_closed else '>'} {lo:g}"
    return f"in {'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"


def _in_bound(x: float, b: Bound) -> bool:
    lo, hi, lo_closed, hi_closed = b
    above = x >= lo if lo_closed else x > lo
    below = x <= hi if hi_closed else x < hi
    return bool(above and below)  # False for NaN


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class OptimizerBase:
    """Validation, group resolution and ``hyperparams``/``with_hyperparams`` for a dataclass."""

    _hypers: ClassVar[tuple[str, ...]] = ()
    _pairs: ClassVar[frozenset[str]] = frozenset()
    _flags: ClassVar[tuple[str, ...]] = ()
    _bounds: ClassVar[Mapping[str, Bound]] = {}
    __dataclass_fields__: ClassVar[dict[str, Any]]

    groups: tuple[Group, ...]
    _resolved: tuple[dict[str, Any], ...]
    _assignment: dict[str, int]
    _shaped: tuple[bool, ...]

    def init(self, params: Params) -> Any:
        """The initial state (each optimizer defines it)."""
        raise NotImplementedError

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, Any]:
        """One step (each optimizer defines it)."""
        raise NotImplementedError

    @property
    def _fn(self) -> str:
        return f"metagrad.optim.{type(self).__name__}"

    # ----------------------------------------------------------------- construction checks
    def __post_init__(self) -> None:
        groups = self.groups
        if isinstance(groups, Group):
            groups = (groups,)
        if not isinstance(groups, (tuple, list)) or not all(isinstance(g, Group) for g in groups):
            raise TypeError(
                f"{self._fn}: groups={groups!r} must be a tuple of metagrad.optim.Group, e.g. "
                f"groups=(Group('layer1', lr=0.1),)."
            )
        object.__setattr__(self, "groups", tuple(groups))
        top: dict[str, Any] = {}
        for name in self._hypers:
            top[name] = self._check_value(name, getattr(self, name), "")
            object.__setattr__(self, name, top[name])  # pairs given as lists become tuples
        for name in self._flags:
            top[name] = self._check_flag(name, getattr(self, name), "")
        self._check_config(top, "")
        resolved = [top]
        valid = self._hypers + self._flags
        for i, group in enumerate(self.groups):
            where = f" in groups[{i}] (select={group.select!r})"
            merged = dict(top)
            for key, value in group.overrides:
                if key not in valid:
                    raise ValueError(
                        f"{self._fn}: groups[{i}] (select={group.select!r}) sets {key!r}, "
                        f"which {type(self).__name__} does not have; valid hyperparameters: "
                        f"{', '.join(valid)}."
                    )
                if key in self._flags:
                    merged[key] = self._check_flag(key, value, where)
                else:
                    merged[key] = self._check_value(key, value, where)
            self._check_config(merged, where)
            resolved.append(merged)
        object.__setattr__(self, "_resolved", tuple(resolved))
        object.__setattr__(self, "_assignment", {})
        # Per group: does any hyperparameter hold a shaped tensor (whose shape needs checking)?
        shaped = tuple(
            any(
                isinstance(v, Tensor) and v.dim() > 0
                for key in self._hypers
                for v in (cfg[key] if key in self._pairs else (cfg[key],))
            )
            for cfg in resolved
        )
        object.__setattr__(self, "_shaped", shaped)

    def _check_config(self, cfg: dict[str, Any], where: str) -> None:
        """Constraints between hyperparameters (overridden where an optimizer has some)."""

    def _check_flag(self, name: str, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{self._fn}: {name}={value!r}{where} must be True or False.")
        return value

    def _check_value(self, name: str, value: Any, where: str) -> Any:
        if name in self._pairs:
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(
                    f"{self._fn}: {name}={value!r}{where} must be a pair of numbers or "
                    f"tensors, e.g. {name}={getattr(type(self), name, '(a, b)')!r}."
                )
            return tuple(self._check_scalar(f"{name}[{j}]", f"{name}.{j}", v, where)
                         for j, v in enumerate(value))  # fmt: skip
        return self._check_scalar(name, name, value, where)

    def _check_scalar(self, label: str, key: str, value: Any, where: str) -> Any:
        if isinstance(value, Tensor):
            # Tensor values are not range-checked: they may be traced or learned.
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{self._fn}: {label}={value!r}{where} must be a number or a tensor "
                f"(0-d, or broadcastable to the parameter), not {type(value).__name__}."
            )
        bound = self._bounds.get(key)
        if bound is not None and not _in_bound(value, bound):
            raise ValueError(
                f"{self._fn}: {label}={value!r}{where} is out of range; it must be "
                f"{_fmt_bound(bound)}. Pass a value {_fmt_bound(bound)} instead."
            )
        return value

    # ------------------------------------------------------------------- hyperparameters
    def hyperparams(self) -> dict[str, Tensor]:
        """Every hyperparameter currently given as a tensor, under a stable flat name.

        Names are the field names (``"lr"``), ``"betas.0"`` for pair elements, and
        ``"groups.<i>.<name>"`` for a group's overrides.
        """
        out: dict[str, Tensor] = {}
        sources = [("", {n: getattr(self, n) for n in self._hypers})]
        sources += [(f"groups.{i}.", g.hyper) for i, g in enumerate(self.groups)]
        for prefix, values in sources:
            for name, value in values.items():
                if name not in self._hypers:
                    continue
                if name in self._pairs:
                    for j, v in enumerate(value):
                        if isinstance(v, Tensor):
                            out[f"{prefix}{name}.{j}"] = v
                elif isinstance(value, Tensor):
                    out[f"{prefix}{name}"] = value
        return out

    def _valid_keys(self) -> list[str]:
        def expand(prefix: str, names: list[str]) -> list[str]:
            return [
                f"{prefix}{n}.{j}" if n in self._pairs else f"{prefix}{n}"
                for n in names
                for j in ((0, 1) if n in self._pairs else (0,))
            ]

        keys = expand("", list(self._hypers))
        for i, g in enumerate(self.groups):
            keys += expand(f"groups.{i}.", [k for k in g.hyper if k in self._hypers])
        return keys

    def with_hyperparams(self, values: Mapping[str, Tensor]) -> Self:
        """A copy with ``values`` substituted (keys as in :meth:`hyperparams`).

        Raises:
            ValueError: A key names no hyperparameter of this optimizer.
        """
        valid = self._valid_keys()
        top: dict[str, Any] = {n: getattr(self, n) for n in self._hypers}
        group_hyper = [g.hyper for g in self.groups]
        for key, value in values.items():
            if key not in valid:
                raise ValueError(
                    f"{self._fn}.with_hyperparams: unknown key {key!r}; valid keys: "
                    f"{', '.join(valid)} (see .hyperparams())."
                )
            parts = key.split(".")
            target = top
            if parts[0] == "groups":
                target, parts = group_hyper[int(parts[1])], parts[2:]
            if len(parts) == 2:
                pair = list(target[parts[0]])
                pair[int(parts[1])] = value
                target[parts[0]] = tuple(pair)
            else:
                target[parts[0]] = value
        groups = tuple(Group(g.select, **h) for g, h in zip(self.groups, group_hyper))
        return dataclasses.replace(self, groups=groups, **top)  # type: ignore[type-var]

    # -------------------------------------------------------------------- update helpers
    def _group_index(self, name: str) -> int:
        # Memoized: a predicate select runs once per name, not once per update.
        index = self._assignment.get(name)
        if index is None:
            index = next((i + 1 for i, g in enumerate(self.groups) if g.matches(name)), 0)
            self._assignment[name] = index
        return index

    def _config(self, name: str, param: Tensor, lrs: Mapping[str, LR] | None) -> dict[str, Any]:
        """Resolved hyperparameters for one parameter, with tensor shapes checked."""
        index = self._group_index(name)
        cfg = self._resolved[index]
        if lrs is None and not self._shaped[index]:
            return cfg  # nothing shaped to check: the common case, once per parameter and step
        where = f" (set by groups[{index - 1}])" if index else ""
        if lrs is not None:
            if name not in lrs:
                raise ValueError(
                    f"{self._fn}.update: lrs has no learning rate for parameter {name!r}; "
                    f"give one per parameter (keys: {', '.join(sorted(lrs))}) or lrs=None."
                )
            cfg = {**cfg, "lr": lrs[name]}
        # No configured tensor is shaped: only the learning rate from lrs can need a check.
        keys = self._hypers if self._shaped[index] else ("lr",) if "lr" in self._hypers else ()
        for key in keys:
            values = cfg[key] if key in self._pairs else (cfg[key],)
            for j, v in enumerate(values):
                if isinstance(v, Tensor) and v.dim() > 0:
                    label = f"{key}[{j}]" if key in self._pairs else key
                    src = " (from lrs)" if key == "lr" and lrs is not None else where
                    self._check_shape(label + src, key, v, name, param)
        return cfg

    def _check_shape(self, label: str, key: str, value: Tensor, name: str, param: Tensor) -> None:
        shape = _shape(param)
        try:
            ok = tuple(torch.broadcast_shapes(value.shape, param.shape)) == shape
        except RuntimeError:
            ok = False
        if not ok:
            example = f" or {(1, *shape[1:])}" if len(shape) > 1 else ""
            raise ValueError(
                f"{self._fn}: hyperparameter {label} has shape {_shape(value)}, which does not "
                f"broadcast to parameter {name!r} of shape {shape}; give a number, a 0-d "
                f"tensor or a tensor broadcastable to {shape} (e.g. of shape {shape}{example}), "
                f"or give that parameter its own value with Group({name!r}, {key}=...) listed "
                f"first in groups (the first matching group wins)."
            )

    def _check_inputs(self, grads: Params, params: Params, step: Any) -> int:
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(
                f"{self._fn}.update: step={step!r} must be a Python int (0-based update index)."
            ) from None
        if step < 0:
            raise ValueError(f"{self._fn}.update: step={step} must be >= 0 (0-based index).")
        missing = [k for k in params if grads.get(k) is None]
        if missing:
            # None is what autograd.grad(..., allow_unused=True) gives an unused parameter.
            raise ValueError(
                f"{self._fn}.update: grads has no entry (or None) for parameter(s) {missing}; "
                f"pass one gradient per parameter (torch.zeros_like(p) for an unused one)."
            )
        return int(step)


def entry(fn: str, state: Any, field: str, name: str) -> Tensor:
    """``state.<field>[name]``, with an error that says how to build a matching state."""
    try:
        value: Tensor = getattr(state, field)[name]
    except (AttributeError, KeyError, TypeError):
        raise ValueError(
            f"{fn}.update: the state ({type(state).__name__}) has no {field}[{name!r}]; build it "
            f"with the same optimizer's init(params) over the same parameter names."
        ) from None
    return value
