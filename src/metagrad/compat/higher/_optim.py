r"""``higher.optim``: differentiable versions of ``torch.optim`` optimizers, on metagrad.optim.

:class:`DifferentiableOptimizer` keeps higher's protocol, so optimizers written for higher
(a subclass overriding ``_update(grouped_grads)`` and registered with :func:`register_optim`)
keep working: ``param_groups`` are copies of the torch optimizer's groups whose ``"params"``
hold the current fast weights during ``_update``, and ``state[group][index]`` is a dict per
parameter. ``step(loss)`` computes

.. math::
    g = \nabla_w \ell(w_t)\ (\text{create\_graph when tracking}),\qquad
    w_{t+1} = U(w_t, g, s_t; h)

The built-in subclasses run the update rule of the matching :mod:`metagrad.optim` class,
whose iterates equal today's ``torch.optim`` (float64, 1e-12), once per parameter group with
that group's hyperparameters; tensors given through ``override`` are differentiable.
"""

from __future__ import annotations

import abc
import collections
import copy
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import Tensor

from metagrad.bilevel._diffopt import check_loss, required_grads, update_by_count
from metagrad.compat.higher import _utils
from metagrad.optim import ASGD, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, RMSprop, Rprop
from metagrad.optim._common import OptimizerBase

_GroupedGradsType = list[list[Tensor | None]]
_StateType = list[collections.defaultdict[int, Any]]
_OverrideType = dict[str, list[Any]]
_GradCallbackType = Callable[[list[Tensor | None]], Iterable[Tensor | None]]
_GradClosureType = Callable[[Tensor], Tensor]

_PKG = "metagrad.compat.higher"


def _get_mask_closure(mask: Tensor) -> _GradClosureType:
    """A gradient hook that zeroes the entries where ``mask`` is True, at every order."""

    def closure(grad: Tensor) -> Tensor:
        out = torch.where(mask, torch.zeros_like(grad), grad)
        if out.requires_grad:
            out.register_hook(closure)
        return out

    return closure


def _maybe_mask(tensor: Tensor, mask: Tensor) -> None:
    """Zero the gradient flowing into ``tensor`` where ``mask`` is True (if it has one)."""
    if tensor.requires_grad:
        tensor.register_hook(_get_mask_closure(mask))


class DifferentiableOptimizer(abc.ABC):
    r"""Base class of the differentiable optimizers (higher's protocol).

    Args:
        other: The ``torch.optim`` optimizer to mirror; its param groups (hyperparameters)
            and its accumulated state (momentum buffers, moments, step counts) are copied.
        reference_params: The parameters of the module ``other`` trains, in the order of
            the fast weights (``model.parameters()``).
        fmodel: A functional module whose fast weights :meth:`step` reads and updates.
        device: Device to copy the state to.
        override: ``{setting: [value]}`` (one value for every group) or
            ``{setting: [v_0, v_1, ...]}`` (one per group), replacing hyperparameters;
            tensors that require grad make them differentiable.
        grad_callback: ``f(grads) -> grads`` applied at each step to the list of gradients
            (``reference_params`` order, None for a parameter without gradient).
        track_higher_grads: Keep the graph through the updates (False: detached steps).

    Raises:
        ValueError: ``other`` holds a tensor that is not in ``reference_params``; a malformed
            override.
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: Any = None,
        device: torch.device | str | None = None,
        override: Mapping[str, Any] | None = None,
        grad_callback: _GradCallbackType | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        self._fn = f"{_PKG}.{type(self).__name__}"
        if not isinstance(other, torch.optim.Optimizer):
            raise TypeError(
                f"{self._fn}: other must be a torch.optim optimizer, got {type(other).__name__}."
            )
        reference = list(reference_params)
        self.param_groups: list[dict[str, Any]] = [
            {k: [None] * len(v) if k == "params" else copy.deepcopy(v) for k, v in g.items()}
            for g in other.param_groups
        ]
        self.state: _StateType = [collections.defaultdict(dict) for _ in self.param_groups]
        self._group_to_param_list: list[list[int]] = []
        for gi, group in enumerate(other.param_groups):
            local = []
            for pi, p in enumerate(group["params"]):
                found = other.state.get(p)
                if found:
                    self.state[gi][pi] = {
                        k: _utils._recursive_copy_and_cast(v, device) for k, v in found.items()
                    }
                index = _utils._find_param_in_list(p, reference)
                if index is None:
                    raise ValueError(
                        f"{self._fn}: param_groups[{gi}] holds a tensor of shape "
                        f"{tuple(p.shape)} that is not in reference_params; pass the parameters "
                        f"of the module the optimizer trains (model.parameters())."
                    )
                local.append(index)
            self._group_to_param_list.append(local)
        self._fmodel = fmodel
        self._track_higher_grads = bool(track_higher_grads)
        self._grad_callback = grad_callback
        if override is not None:
            self._apply_override(override)

    def _apply_override(self, override: Mapping[str, Any]) -> None:
        n = len(self.param_groups)
        for key, value in override.items():
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(values) not in (1, n):
                raise ValueError(
                    f"{self._fn}: override[{key!r}] has {len(values)} values for {n} parameter "
                    f"groups; give [value] (used for every group) or one value per group."
                )
            for gi, group in enumerate(self.param_groups):
                if key not in group:
                    known = sorted(k for k in group if k != "params")
                    raise ValueError(
                        f"{self._fn}: override names {key!r}, which param_groups[{gi}] does not "
                        f"have; the optimizer's settings are {known}."
                    )
                group[key] = values[0] if len(values) == 1 else values[gi]

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Mapping[str, Any] | None = None,
        grad_callback: _GradCallbackType | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        r"""One differentiable update; replaces ``zero_grad(); loss.backward(); step()``.

        Args:
            loss: Scalar loss at the current fast weights.
            params: The weights to update (``reference_params`` order); needed when there is
                no functional module, and replace its fast weights when given with one.
            override: As in the constructor; applies from this step on and wins over
                earlier overrides.
            grad_callback: Replaces the constructor's callback for this step.

        Returns:
            The new weights; the functional module (if any) records them as its latest.

        Raises:
            ValueError: A non-scalar loss, a loss that does not depend on the weights, no
                weights to update.
        """
        fn = f"{self._fn}.step"
        if override is not None:
            self._apply_override(override)
        fmodel = self._fmodel
        if fmodel is None or fmodel.fast_params is None:
            if params is None:
                raise ValueError(
                    f"{fn}: params must be given: this optimizer has no functional module with "
                    f"fast weights (pass fmodel=... when creating it, or step(loss, params))."
                )
        elif params is None:
            params = fmodel.fast_params
        current = list(params)  # type: ignore[arg-type]
        loss = check_loss(fn, loss)
        all_grads = required_grads(loss, current, self._track_higher_grads)
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            all_grads = list(callback(all_grads))
        grouped: _GroupedGradsType = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            grads = []
            for i, index in enumerate(mapping):
                group["params"][i] = current[index]
                grads.append(all_grads[index])
            grouped.append(grads)
        self._update(grouped, **kwargs)
        new = current[:]
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            for p, index in zip(group["params"], mapping):
                if self._track_higher_grads:
                    new[index] = p
                else:
                    # Detached leaves that require grad as before: frozen ones stay frozen,
                    # as torch.optim never updates them.
                    new[index] = p.detach().requires_grad_(p.requires_grad)
        if fmodel is not None:
            fmodel.update_params(new)
        return new

    @abc.abstractmethod
    def _update(self, grouped_grads: _GroupedGradsType, **kwargs: Any) -> None:
        """Write the new weights into ``self.param_groups[g]["params"][i]`` (None grad: skip)."""


def _initialized(entry: Mapping[str, Any]) -> bool:
    return "step" in entry or any(isinstance(v, Tensor) for v in entry.values())


def _count(entry: Mapping[str, Any]) -> int:
    step = entry.get("step")
    if step is None:
        return 1  # torch's SGD keeps no count; a momentum buffer means it has stepped
    return int(step.item()) if isinstance(step, Tensor) else int(step)


def _cache_key(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", id(value))
    if isinstance(value, (tuple, list)):
        return tuple(_cache_key(v) for v in value)
    return value


class _MetagradBacked(DifferentiableOptimizer):
    """A differentiable optimizer whose rule is a metagrad.optim class, one per param group."""

    _metagrad: ClassVar[type[OptimizerBase]]
    _masked: ClassVar[tuple[str, ...]] = ()  # state whose zeros get no gradient (see below)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._rule_cache: dict[int, tuple[Any, OptimizerBase]] = {}
        super().__init__(*args, **kwargs)
        fmodel = self._fmodel
        names = getattr(getattr(fmodel, "_fast", None), "names", None)
        self._labels = names

    def _rule_class(self, group: Mapping[str, Any]) -> type[OptimizerBase]:
        return self._metagrad

    def _rule(self, gi: int, group: Mapping[str, Any]) -> OptimizerBase:
        """The metagrad optimizer for ``param_groups[gi]``'s current settings."""
        cls = self._rule_class(group)
        values: dict[str, Any] = {}
        for name in cls._hypers + cls._flags:
            if name in group and name != "eps_root":
                value = group[name]
                values[name] = tuple(value) if name in cls._pairs else value
        key = (cls, tuple((k, _cache_key(v)) for k, v in values.items()))
        cached = self._rule_cache.get(gi)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            rule = cls(**values)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self._fn}: param_groups[{gi}]: {err}") from None
        self._rule_cache[gi] = (key, rule)
        return rule

    def _label(self, gi: int, pi: int) -> str:
        index = self._group_to_param_list[gi][pi]
        labels = self._labels
        return labels[index] if labels is not None and index < len(labels) else f"params[{index}]"

    def _update(self, grouped_grads: _GroupedGradsType, **kwargs: Any) -> None:
        track = self._track_higher_grads
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            active = [pi for pi, g in enumerate(grads) if g is not None]
            if not active:
                continue
            rule = self._rule(gi, group)
            states = self.state[gi]
            key = {pi: self._label(gi, pi) for pi in active}
            params = {key[pi]: group["params"][pi] for pi in active}
            g = {key[pi]: t for pi in active if (t := grads[pi]) is not None}
            fresh = [pi for pi in active if not _initialized(states[pi])]
            if fresh:
                init = rule.init({key[pi]: params[key[pi]] for pi in fresh})
                for pi in fresh:
                    for f in init._fields:
                        value = getattr(init, f).get(key[pi])
                        if value is not None:
                            states[pi][f] = value
                    states[pi]["step"] = 0
            fields: dict[str, dict[str, Tensor]] = collections.defaultdict(dict)
            for pi in active:
                for f, v in states[pi].items():
                    if isinstance(v, Tensor) and f != "step":
                        fields[f][key[pi]] = v
            counts = {key[pi]: _count(states[pi]) for pi in active}
            new, new_state = update_by_count(rule, g, params, SimpleNamespace(**fields), counts)
            for pi in active:
                k = key[pi]
                group["params"][pi] = new[k]
                for f in new_state._fields:
                    value = getattr(new_state, f).get(k)
                    if value is None:
                        continue
                    if not track:
                        value = value.detach()
                    elif f in self._masked:
                        # higher's guard: where the squared-gradient average is exactly 0
                        # (a gradient that has always been 0), sqrt has an infinite derivative
                        # and the meta-gradient would be NaN; give it none there.
                        _maybe_mask(value, value.detach() == 0)
                    states[pi][f] = value
                states[pi]["step"] = counts[k]


class DifferentiableSGD(_MetagradBacked):
    """Differentiable ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize)."""

    _metagrad = SGD


class DifferentiableAdam(_MetagradBacked):
    """Differentiable ``torch.optim.Adam`` (amsgrad, weight decay, maximize; a group with
    ``decoupled_weight_decay=True`` follows AdamW), with torch's placement of ``eps``."""

    _metagrad = Adam
    _masked = ("exp_avg_sq", "max_exp_avg_sq")

    def _rule_class(self, group: Mapping[str, Any]) -> type[OptimizerBase]:
        return AdamW if group.get("decoupled_weight_decay", False) else Adam


class DifferentiableAdamW(_MetagradBacked):
    """Differentiable ``torch.optim.AdamW`` (decoupled weight decay :math:`p(1-\\gamma\\lambda)`)."""

    _metagrad = AdamW
    _masked = ("exp_avg_sq", "max_exp_avg_sq")


class DifferentiableAdadelta(_MetagradBacked):
    """Differentiable ``torch.optim.Adadelta``."""

    _metagrad = Adadelta


class DifferentiableAdagrad(_MetagradBacked):
    """Differentiable ``torch.optim.Adagrad`` (lr decay, initial accumulator value)."""

    _metagrad = Adagrad
    _masked = ("sum",)


class DifferentiableAdamax(_MetagradBacked):
    """Differentiable ``torch.optim.Adamax``."""

    _metagrad = Adamax


class DifferentiableASGD(_MetagradBacked):
    """Differentiable ``torch.optim.ASGD`` (the averaged iterate is ``state[g][i]["ax"]``)."""

    _metagrad = ASGD


class DifferentiableRMSprop(_MetagradBacked):
    """Differentiable ``torch.optim.RMSprop`` (momentum, centered)."""

    _metagrad = RMSprop
    _masked = ("square_avg",)


class DifferentiableRprop(_MetagradBacked):
    """Differentiable ``torch.optim.Rprop``: exact derivatives with respect to the learning
    rate, the etas and the active step-size bound; none through the sign of the gradient."""

    _metagrad = Rprop


_opt_mapping: dict[type, type[DifferentiableOptimizer]] = {
    torch.optim.Adadelta: DifferentiableAdadelta,
    torch.optim.Adagrad: DifferentiableAdagrad,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
    torch.optim.Adamax: DifferentiableAdamax,
    torch.optim.ASGD: DifferentiableASGD,
    torch.optim.RMSprop: DifferentiableRMSprop,
    torch.optim.Rprop: DifferentiableRprop,
    torch.optim.SGD: DifferentiableSGD,
}


def _lookup(fn: str, opt_type: type) -> type[DifferentiableOptimizer]:
    # Exact types only: a subclass may change the rule, and guessing would be a silent error.
    found = _opt_mapping.get(opt_type)
    if found is None:
        names = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in _opt_mapping))
        raise ValueError(
            f"{fn}: optimizer type {opt_type.__module__}.{opt_type.__qualname__} is not "
            f"supported; supported: {names}. For your own optimizer, subclass "
            f"{_PKG}.optim.DifferentiableOptimizer (override _update) and call "
            f"{_PKG}.register_optim(YourOptimizer, YourDifferentiableOptimizer)."
        )
    return found


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """The differentiable version of an existing optimizer, starting from its state.

    Args:
        opt: A torch optimizer of a supported (or registered) type.
        reference_params: The parameters of the module ``opt`` trains (``model.parameters()``).
        fmodel: The functional module whose fast weights ``step`` updates.
        device: Device of the copied state.
        override: Hyperparameter overrides (see :class:`DifferentiableOptimizer`).
        track_higher_grads: Keep the graph through the updates.
        **kwargs: Passed to the optimizer class (e.g. ``grad_callback``).

    Raises:
        ValueError: An unsupported optimizer type.
    """
    cls = _lookup(f"{_PKG}.get_diff_optim", type(opt))
    return cls(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def _zeros(params: Iterable[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p, requires_grad=True) for p in params]


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[Any] | None = None,
    fmodel: Any = None,
    device: torch.device | str | None = None,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable optimizer of type ``opt_type`` built from scratch.

    Args:
        opt_type: A supported (or registered) ``torch.optim`` class.
        opt_kwargs: Its constructor's keywords (``lr=...``).
        params: The fast weights it will update (used for shapes only), or param groups
            (dicts with ``"params"``); default ``fmodel.parameters()``.
        fmodel, device, override, track_higher_grads, **kwargs: As in :func:`get_diff_optim`.

    Raises:
        ValueError: An unsupported type, or neither ``params`` nor ``fmodel``.
    """
    fn = f"{_PKG}.create_diff_optim"
    cls = _lookup(fn, opt_type)
    dummy: list[Any]
    if params is not None:
        items = list(params)
        if items and isinstance(items[0], dict):
            dummy = [
                {k: _zeros(v) if k == "params" else v for k, v in group.items()} for group in items
            ]
            reference = [p for group in dummy for p in group["params"]]
        else:
            dummy = reference = _zeros(items)
    elif fmodel is not None:
        dummy = reference = _zeros(fmodel.parameters())
    else:
        raise ValueError(f"{fn}: give params=[...] (the fast weights) or fmodel=...")
    opt = opt_type(dummy, **dict(opt_kwargs or {}))
    return cls(
        opt,
        reference,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Use ``diff_optim_type`` as the differentiable version of ``optim_type`` from now on.

    Raises:
        TypeError: ``diff_optim_type`` is not a :class:`DifferentiableOptimizer` subclass.
    """
    if not isinstance(diff_optim_type, type) or not issubclass(
        diff_optim_type, DifferentiableOptimizer
    ):
        raise TypeError(
            f"{_PKG}.register_optim: diff_optim_type={diff_optim_type!r} must be a subclass of "
            f"{_PKG}.optim.DifferentiableOptimizer that overrides _update."
        )
    if not isinstance(optim_type, type):
        raise TypeError(f"{_PKG}.register_optim: optim_type must be a class, got {optim_type!r}.")
    _opt_mapping[optim_type] = diff_optim_type


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: torch.device | str | None = None
) -> dict[str, list[Any]]:
    """An override dict with a trainable tensor for every numeric setting of every group.

    Settings that are numbers or structures of numbers (``lr``, ``betas``...) become tensors
    that require grad (booleans and other values are left out), one entry per param group.
    """
    override: dict[str, list[Any]] = collections.defaultdict(list)

    def trainable(x: Any) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().clone().requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    for group in opt.param_groups:
        for key, value in group.items():
            if key == "params":
                continue
            leaves = _utils.flatten(value)
            if leaves and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves
            ):
                override[key].append(_utils._recursive_map(value, trainable))
    return dict(override)


def _write_back(replacement: Any, target: Any, where: str) -> Any:
    if isinstance(target, Tensor):
        with torch.no_grad():
            target.copy_(replacement)
        return target
    if isinstance(replacement, Tensor) and not _utils._is_container(target):
        return type(target)(replacement.item())
    if isinstance(target, (list, tuple)) and isinstance(replacement, (list, tuple)):
        return type(target)(_write_back(r, t, where) for r, t in zip(replacement, target))
    if isinstance(target, (int, float)) and isinstance(replacement, (int, float)):
        return type(target)(replacement)
    raise ValueError(
        f"{_PKG}.apply_trainable_opt_params: cannot write {type(replacement).__name__} into "
        f"setting {where} of type {type(target).__name__}."
    )


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Mapping[str, Any]) -> None:
    """Write learned hyperparameters (an override dict) back into ``opt``'s param groups."""
    n = len(opt.param_groups)
    for key, value in override.items():
        values = list(value)
        if len(values) not in (1, n):
            raise ValueError(
                f"{_PKG}.apply_trainable_opt_params: override[{key!r}] has {len(values)} values "
                f"for {n} parameter groups; give one value or one per group."
            )
        for gi, group in enumerate(opt.param_groups):
            replacement = values[0] if len(values) == 1 else values[gi]
            group[key] = _write_back(replacement, group[key], f"{key!r} of param_groups[{gi}]")
