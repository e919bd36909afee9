r"""The object layer: an ordinary training loop made differentiable with a few changed lines.

.. code-block:: python

    with metagrad.bilevel.innerloop(model, metagrad.optim.SGD(lr=0.1)) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(F.cross_entropy(fmodel(x), y))  # w_t = U(w_{t-1}, grad, s_{t-1})
        F.cross_entropy(fmodel(xv), yv).backward()       # d g(w_K) / d w_0 into model's .grad

:class:`FastModel` runs a private copy of the user's module with given weights
(``torch.func.functional_call``) and keeps the history :math:`w_0, w_1, \dots` of its fast
weights; :class:`~metagrad.bilevel.DiffOptimizer` produces :math:`w_{t+1}` from
:math:`w_t` and a loss. The user's module is never patched or written: not its parameters, not
its buffers (BatchNorm running statistics), not its train/eval flags.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metagrad._typing import Buffers, Params
from metagrad.bilevel._diffopt import DiffOptimizer
from metagrad.functional._attention import higher_order_attention, no_fused_inference
from metagrad.functional._model import FunctionalModel
from metagrad.functional._rewrites import needs_math_attention
from metagrad.optim._base import Optimizer
from metagrad.optim._convert import from_torch

BN_MODES = ("running", "private", "transductive")
_NORM_WITH_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

ParamsLike = Mapping[str, Tensor] | Sequence[Tensor]
"""Weights given by name (a dict) or in ``module.named_parameters()`` order (a list)."""


class _Call(nn.Module):
    """Calls any callable of the template while ``functional_call`` has swapped its tensors in.

    Going through one wrapper lets the forward, a submodule or a custom method of the model
    run with the fast weights, with the public ``functional_call`` doing the swapping.
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root = root

    def forward(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


class _Bound:
    """A submodule or method of the user's model, run with the fast weights when called.

    Tracks the user's object and the template's counterpart side by side, so attribute and
    index lookups follow the user's module tree (the template may be reordered internally).
    """

    def __init__(self, owner: FastModel, user: Any, tpl: Any) -> None:
        self._owner, self._user, self._tpl = owner, user, tpl

    def __call__(self, *args: Any, params: ParamsLike | None = None, **kwargs: Any) -> Any:
        return self._owner._call_target(self._tpl, args, kwargs, params)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_user" not in self.__dict__:
            raise AttributeError(name)
        user = self._user
        return self._owner._wrap(getattr(user, name), lambda: getattr(self._tpl, name))

    def __getitem__(self, index: Any) -> Any:
        return self._owner._wrap(self._user[index], lambda: self._tpl[index])

    def __len__(self) -> int:
        return len(self._user)

    def __bool__(self) -> bool:
        return True  # a view is truthy whether or not its module has a length

    def __iter__(self) -> Iterator[Any]:
        for child in self._user:
            yield self._owner._wrap(child, lambda: None)

    def __repr__(self) -> str:
        return f"<fast view of {self._user!r}>"


def _to(t: Tensor, device: torch.device | str | None) -> Tensor:
    return t if device is None else t.to(device)


def _initial(p: Tensor, copy: bool, device: torch.device | str | None) -> Tensor:
    if copy:
        # A fresh leaf: the inner loop starts from w_0 but the graph does not reach the model.
        d = p.detach()
        return (d if device is None else d.to(device)).clone().requires_grad_(p.requires_grad)
    q = _to(p, device)
    # Differentiable copy: the meta-gradient reaches p, and p may change in place later
    # (an outer optimizer step) without invalidating the recorded history.
    return q.clone() if q is p else q


class FastModel:
    r"""A functional view of a module with a history of fast weights :math:`w_0, w_1, \dots`.

    ``fmodel(x)`` runs the model with the latest fast weights, ``fmodel(x, params=w)`` with
    ``w`` (for that call only). Submodules and methods are reachable as on the model
    (``fmodel.encoder(x)``, ``fmodel.embed(x)``, ``fmodel[0]`` for a Sequential) and run with
    the fast weights too. The user's module is read once, at construction, and never written.

    Args:
        module: The user's ``nn.Module``.
        copy_initial_weights: :math:`w_0` is a detached copy of the module's parameters
            (gradients stop there); False makes :math:`w_0` a differentiable copy, so the
            meta-gradient reaches the module's parameters (MAML).
        track_higher_grads: Keep every :math:`w_t` (history for ``parameters(time=t)``);
            False keeps the latest only.
        bn: BatchNorm and other layers with running statistics. ``"running"``: as the
            module's mode says (train: batch statistics; eval: the statistics the module had
            at construction), never updated. ``"private"``: as ``"running"``, but train-mode
            calls update this view's own copy of the statistics (``higher``'s behaviour).
            ``"transductive"``: batch statistics always (MAML's reference code).
        device: Device of the fast weights and buffers (default: the module's).
        name: The public name used in error messages.

    Attributes:
        trainable: Names of the parameters that required grad at construction.
        track_higher_grads: As above; may be changed between steps.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = FastModel(model)
        >>> w = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
        >>> fmodel(torch.ones(3, 2), params=w)
        tensor([[0.],
                [0.],
                [0.]])
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        copy_initial_weights: bool = False,
        track_higher_grads: bool = True,
        bn: str = "running",
        device: torch.device | str | None = None,
        name: str = "metagrad.bilevel.FastModel",
        initialize: bool = True,
    ) -> None:
        if bn not in BN_MODES:
            raise ValueError(
                f"{name}: bn={bn!r} is not one of {BN_MODES}; 'running' follows the module's "
                f"train/eval mode without ever updating statistics."
            )
        fm = FunctionalModel.from_module(
            module, bn="running" if bn == "private" else bn, memory_format="preserve", fn_name=name
        )
        template = fm.template
        if bn == "private":
            # The template updates the statistics it is given: this view's own copies.
            for user_m, tpl_m in fm._mode_pairs:
                if isinstance(tpl_m, _NORM_WITH_STATS):
                    tpl_m.track_running_stats = bool(user_m.track_running_stats)
        if device is not None:
            template.to(device)
        self._module = module
        self._name = name
        self._bn = bn
        named = list(module.named_parameters())
        self._names = [n for n, _ in named]
        self._name_set = frozenset(self._names)
        self.trainable = list(fm.trainable)
        kept = set(fm.buffer_names)
        self._buffers: Buffers = {
            n: _to(b.detach(), device).clone() for n, b in module.named_buffers() if n in kept
        }
        self._caller = _Call(template)
        # Every attribute slot of the template (a shared tensor has several) and the name whose
        # value fills it: functional_call then needs no per-call search for tied weights.
        tpl_params = {id(t): n for n, t in template.named_parameters()}
        self._slots = [
            ("root." + k, tpl_params[id(t)])
            for k, t in template.named_parameters(remove_duplicate=False)
        ]
        tpl_buffers = {id(t): n for n, t in template.named_buffers()}
        self._buffer_slots = [
            ("root." + k, tpl_buffers[id(t)])
            for k, t in template.named_buffers(remove_duplicate=False)
            if tpl_buffers[id(t)] in self._buffers
        ]
        self._refresh_buffer_keys()
        self._fused_attention = needs_math_attention(template)
        self._tpl_of = {id(u): t for u, t in fm._mode_pairs}
        self._param_name = {id(p): n for n, p in named}
        self._buffer_name = {id(b): n for n, b in module.named_buffers()}
        self._track = bool(track_higher_grads)
        self._history: list[Params] = []
        if initialize:
            self._history.append({n: _initial(p, copy_initial_weights, device) for n, p in named})

    # --------------------------------------------------------------------------- weights
    @property
    def module(self) -> nn.Module:
        """The user's module (read, never written)."""
        return self._module

    @property
    def names(self) -> list[str]:
        """Parameter names, in ``module.named_parameters()`` order."""
        return list(self._names)

    @property
    def track_higher_grads(self) -> bool:
        """Whether every version of the fast weights is kept (see the class docstring)."""
        return self._track

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(
                f"{self._name}: track_higher_grads must be True or False, got {value!r}."
            )
        self._track = value

    @property
    def fast_params(self) -> Params:
        """The latest fast weights by name."""
        return dict(self._history[self._index(None)])

    @property
    def history(self) -> list[Params]:
        """Every recorded version of the fast weights, oldest first (the latest only when
        higher-order gradients are not tracked)."""
        return [dict(h) for h in self._history]

    def params(self, time: int | None = None) -> Params:
        """The fast weights after ``time`` updates (None: the latest; negative counts back)."""
        return dict(self._history[self._index(time)])

    def parameters(self, time: int | None = None) -> list[Tensor]:
        """The fast weights after ``time`` updates, in ``named_parameters()`` order."""
        return list(self._history[self._index(time)].values())

    def named_parameters(self, time: int | None = None) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` pairs of the fast weights after ``time`` updates."""
        return list(self._history[self._index(time)].items())

    def buffers(self) -> Buffers:
        """This view's own buffers (copies of the module's, taken at construction)."""
        return dict(self._buffers)

    def _refresh_buffer_keys(self) -> None:
        self._buffer_keys = {slot: self._buffers[n] for slot, n in self._buffer_slots}

    def update_params(self, params: ParamsLike) -> None:
        """Record ``params`` as the latest fast weights (a dict, or a list in name order)."""
        full = self.as_params(params, f"{self._name}.update_params")
        if self._track:
            self._history.append(full)
        else:
            self._history = [full]  # the old graph is released

    def as_params(self, params: ParamsLike, where: str) -> Params:
        """``params`` as a complete dict; entries missing from a dict keep their latest value.

        Raises:
            ValueError: Unknown names, or a list of the wrong length.
            TypeError: Something other than tensors.
        """
        if isinstance(params, Mapping):
            unknown = [k for k in params if k not in self._name_set]
            if unknown:
                raise ValueError(
                    f"{where}: unknown parameter names {unknown}; the model's are {self._names}."
                )
            base = self._history[-1] if self._history else {}
            missing = [n for n in self._names if n not in params and n not in base]
            if missing:
                raise ValueError(f"{where}: no value for parameters {missing}; give all of them.")
            out = {n: params[n] if n in params else base[n] for n in self._names}
        else:
            try:
                values = list(params)
            except TypeError:
                raise TypeError(
                    f"{where}: params must be a dict name -> tensor or a list of tensors in "
                    f"model.parameters() order, got {type(params).__name__}."
                ) from None
            if len(values) != len(self._names):
                raise ValueError(
                    f"{where}: got {len(values)} tensors for the model's {len(self._names)} "
                    f"parameters ({self._names}); give one per parameter, in parameters() order."
                )
            out = dict(zip(self._names, values))
        bad = [n for n, v in out.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"{where}: the values for {bad} are not tensors.")
        return out

    def _index(self, time: int | None) -> int:
        if not self._history:
            raise ValueError(
                f"{self._name}: this functional model holds no fast weights yet; pass "
                f"params=... to the call or set them with update_params."
            )
        t = -1 if time is None else time
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"{self._name}: time must be an int or None, got {time!r}.")
        if not self._track and t not in (-1, 0):
            raise ValueError(
                f"{self._name}: time={time} is not available: higher-order gradients are not "
                f"tracked, so only the latest fast weights are kept (time=None, -1 or 0)."
            )
        n = len(self._history)
        if not -n <= t < n:
            raise ValueError(
                f"{self._name}: time={time} is out of range; {n} versions are recorded "
                f"(time 0 to {n - 1}, or negative from the latest)."
            )
        return t

    # --------------------------------------------------------------------------- running
    @property
    def training(self) -> bool:
        """The view's train/eval flag (initially the module's)."""
        return bool(self._caller.root.training)

    def train(self, mode: bool = True) -> FastModel:
        """Set this view's train/eval mode (the user's module keeps its own)."""
        self._caller.root.train(mode)
        return self

    def eval(self) -> FastModel:
        """This view in eval mode (the user's module keeps its own)."""
        return self.train(False)

    def __call__(self, *args: Any, params: ParamsLike | None = None, **kwargs: Any) -> Any:
        return self._call_target(self._caller.root, args, kwargs, params)

    def forward(self, *args: Any, params: ParamsLike | None = None, **kwargs: Any) -> Any:
        """The model's forward with the latest fast weights, or ``params`` for this call."""
        return self(*args, params=params, **kwargs)

    def _call_target(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], params: Any
    ) -> Any:
        full = None if params is None else self.as_params(params, f"{self._name}(params=...)")
        return self._run(target, args, kwargs, full)

    def _run(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], params: Params | None
    ) -> Any:
        p = self._history[self._index(None)] if params is None else params
        tensors = {slot: p[n] for slot, n in self._slots}
        tensors.update(self._buffer_keys)
        if self._track and torch.is_grad_enabled():
            # This forward's backward may be differentiated again (a step with create_graph):
            # attention on the math kernel, the fused ones have no double backward.
            with higher_order_attention():
                return functional_call(
                    self._caller, tensors, (target, *args), kwargs, tie_weights=False
                )
        if self._fused_attention:
            with no_fused_inference():
                return functional_call(
                    self._caller, tensors, (target, *args), kwargs, tie_weights=False
                )
        return functional_call(self._caller, tensors, (target, *args), kwargs, tie_weights=False)

    def _wrap(self, user_attr: Any, tpl_getter: Any) -> Any:
        """What the view of ``user_attr`` (an attribute of the user's model) is."""
        if isinstance(user_attr, nn.Module):
            tpl = self._tpl_of.get(id(user_attr))
            if tpl is None:
                raise AttributeError(
                    f"{self._name}: {type(user_attr).__name__} is not a submodule of the model."
                )
            return _Bound(self, user_attr, tpl)
        if isinstance(user_attr, Tensor):
            pname = self._param_name.get(id(user_attr))
            if pname is not None and self._history:
                return self._history[-1][pname]
            bname = self._buffer_name.get(id(user_attr))
            if bname is not None and bname in self._buffers:
                return self._buffers[bname]
            return tpl_getter()
        if inspect.ismethod(user_attr) and isinstance(user_attr.__self__, nn.Module):
            return _Bound(self, user_attr, tpl_getter())
        return tpl_getter()

    def __getattr__(self, name: str) -> Any:
        # Reached only for names FastModel does not define: look them up on the model.
        if name.startswith("__") or "_module" not in self.__dict__:
            raise AttributeError(name)
        return self._lookup(name)

    def _lookup(self, name: str) -> Any:
        """The view of the model's attribute ``name`` (submodule, method, weight, value)."""
        tpl = self._caller.root
        return self._wrap(getattr(self._module, name), lambda: getattr(tpl, name))

    def __getitem__(self, index: Any) -> Any:
        tpl = self._caller.root
        return self._wrap(self._module[index], lambda: tpl[index])  # type: ignore[index]

    def __repr__(self) -> str:
        versions = len(self._history)
        return f"FastModel({type(self._module).__name__}, versions={versions}, bn={self._bn!r})"


def _resolve_optimizer(
    fn: str, model: nn.Module, optimizer: Any, fmodel: FastModel
) -> tuple[Optimizer, list[str]]:
    if isinstance(optimizer, torch.optim.Optimizer):
        names = {id(p): n for n, p in model.named_parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = [tuple(p.shape) for p in held if id(p) not in names]
        if foreign:
            raise ValueError(
                f"{fn}: the torch optimizer holds tensors of shapes {foreign} that are not "
                f"parameters of the model; build it over model.parameters() (or a subset)."
            )
        held_ids = {id(p) for p in held}
        named = {n: p for n, p in model.named_parameters() if id(p) in held_ids}
        converted = from_torch(optimizer, named)
        return converted, [n for n in named if n in fmodel.trainable]
    if hasattr(optimizer, "init") and hasattr(optimizer, "update"):
        return optimizer, list(fmodel.trainable)
    raise TypeError(
        f"{fn}: optimizer must be a metagrad.optim optimizer (e.g. metagrad.optim.SGD(lr=0.1)) "
        f"or a torch.optim optimizer over the model's parameters, got {type(optimizer).__name__}."
    )


@contextmanager
def innerloop(
    model: nn.Module,
    optimizer: Optimizer | torch.optim.Optimizer,
    *,
    copy_initial_weights: bool = False,
    track_higher_grads: bool = True,
    override: Mapping[str, Tensor] | None = None,
    allow_unused: bool = False,
    check_finite: bool = True,
    bn: str = "running",
    device: torch.device | str | None = None,
) -> Iterator[tuple[FastModel, DiffOptimizer]]:
    r"""A differentiable training loop over a functional view of ``model``.

    Yields ``(fmodel, diffopt)``: :class:`FastModel` runs the model with fast weights
    :math:`w_t`, and :class:`~metagrad.bilevel.DiffOptimizer` ``.step(loss)`` computes

    .. math::
        w_{t+1} = U\bigl(w_t, \nabla_w \ell_t(w_t), s_t; h\bigr),

    on the autograd tape. A loss computed from :math:`w_K` then differentiates exactly (all
    orders) through every step: with ``copy_initial_weights=False`` its ``.backward()``
    accumulates :math:`\mathrm{d}g(w_K)/\mathrm{d}w_0` into the model's ``.grad``, and into
    the ``.grad`` of any tensor hyperparameter of the optimizer and any tensor the losses
    closed over (plain autograd).

    Args:
        model: The user's module; never modified (parameters, buffers, train/eval flags).
        optimizer: A :mod:`metagrad.optim` optimizer (hyperparameters may be tensors that
            require grad), or a ``torch.optim`` optimizer over the model's parameters,
            converted with :func:`metagrad.optim.from_torch` (its accumulated state is not
            carried over). Only the parameters it holds are updated.
        copy_initial_weights: Start from a detached copy of the weights (gradients stop at
            :math:`w_0`; take them with respect to ``fmodel.parameters(time=0)``).
        track_higher_grads: False: first-order, graph-free steps (test-time adaptation).
        override: Hyperparameters replaced from the start, keys as in
            ``optimizer.hyperparams()`` (``"lr"``, ``"betas.0"``, ``"groups.0.lr"``).
        allow_unused: Parameters that do not reach a step's loss stay unchanged instead of
            raising.
        check_finite: A NaN/Inf loss or gradient raises :class:`metagrad.NonFiniteError`
            naming the step.
        bn: BatchNorm policy, see :class:`FastModel` (``"running"``: as the model's mode
            says, never updated).
        device: Device of the fast weights.

    Raises:
        TypeError: ``model`` is not a module, or ``optimizer`` is neither kind.
        ValueError: A torch optimizer over tensors that are not the model's, an unknown
            override key, an unknown ``bn``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with metagrad.bilevel.innerloop(model, metagrad.optim.SGD(lr=0.1)) as (fm, opt):
        ...     for _ in range(3):
        ...         _ = opt.step(F.mse_loss(fm(x), y))
        ...     F.mse_loss(fm(x), y).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 3])
    """
    fn = "metagrad.bilevel.innerloop"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}.")
    for flag, value in (
        ("copy_initial_weights", copy_initial_weights),
        ("track_higher_grads", track_higher_grads),
        ("allow_unused", allow_unused),
        ("check_finite", check_finite),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {flag} must be True or False, got {value!r}.")
    fmodel = FastModel(
        model,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
        bn=bn,
        device=device,
        name=fn,
    )
    opt, adapted = _resolve_optimizer(fn, model, optimizer, fmodel)
    diffopt = DiffOptimizer(
        opt,
        fmodel,
        adapted,
        track_higher_grads=track_higher_grads,
        allow_unused=allow_unused,
        check_finite=check_finite,
    )
    if override:
        diffopt.override(override)
    yield fmodel, diffopt
