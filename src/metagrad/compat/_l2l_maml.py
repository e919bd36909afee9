r"""learn2learn's ``MAML`` / ``MetaSGD`` objects over metagrad's functional model.

A wrapper is either the *root* (it holds the user's model as ``.module``; its parameters are
the meta-parameters) or a *clone* (from ``.clone()``), which holds a dict of fast weights: non-leaf
tensors that start as ``p.clone()`` of the root's parameters. A clone runs a *bound copy* of the
private template of :class:`metagrad.functional._model.FunctionalModel`: a structural copy (new
module objects, shared layer code) whose parameter slots point at the fast weights. The user's
module is never patched, and calling the bound copy skips ``functional_call``'s per-call swap of
every tensor (the compat layer's main cost on small models; see ``benchmarks/bench_l2l_compat.py``).
``adapt(loss)`` replaces the dict by the engine's SGD rule

.. math::
    \theta' = \theta - \alpha \odot \nabla_\theta \mathcal{L}(\theta),

with ``create_graph=not first_order``: a query loss on the clone back-propagates through the
whole inner loop (second order: with the Hessian terms) into the root's parameters. A second-order
clone (``first_order=False``) runs its forward under
:func:`metagrad.functional._attention.higher_order_attention` (attention on the math kernel:
``adapt()`` differentiates that forward's backward, and the fused kernels have no double backward).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import Tensor, nn

from metagrad._errors import translate_autograd_error
from metagrad.compat._l2l_clone import refresh_rnn
from metagrad.functional._attention import (
    has_fused_attention,
    higher_order_attention,
    no_fused_inference,
)
from metagrad.functional._model import FunctionalModel, to_channels_last
from metagrad.optim import LR

_T = TypeVar("_T", bound="_FastWeights")
# The per-instance containers of a Module (parameters, buffers, submodules, hook dicts): a
# structural copy gets its own, everything else in ``__dict__`` is shared. Read from a blank
# Module so that containers added by later PyTorch versions are copied too.
_BLANK = dict(nn.Module().__dict__)
_CONTAINERS = frozenset(k for k, v in _BLANK.items() if isinstance(v, (dict, set)))


def _check_lr(fn: str, name: str, lr: object) -> None:
    if isinstance(lr, Tensor):
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise TypeError(
            f"{fn}: {name}={lr!r} must be a finite number or a tensor (typical: 0.01 to 0.5)."
        )


class _Plan:
    """Where each fast weight and buffer goes in a copy of the template (built once per root)."""

    def __init__(self, fm: FunctionalModel) -> None:
        self.modules = list(fm.template.modules())
        pname = {id(t): k for k, t in fm.template.named_parameters()}
        bname = {id(t): k for k, t in fm.template.named_buffers()}
        wanted = set(fm.buffer_names)
        self.params: list[tuple[int, str, str]] = []
        self.buffers: list[tuple[int, str, str]] = []
        for i, m in enumerate(self.modules):
            for key, t in m._parameters.items():
                if t is not None and id(t) in pname:
                    self.params.append((i, key, pname[id(t)]))
            for key, b in m._buffers.items():
                if b is not None and bname.get(id(b)) in wanted:
                    self.buffers.append((i, key, bname[id(b)]))
        self.rnns = [i for i, m in enumerate(self.modules) if isinstance(m, nn.RNNBase)]
        # Train/eval flag of each template module is read from its counterpart in the user's
        # model (the template's order can differ: ReLU/MaxPool pairs are swapped in it).
        pairs = {id(t): s for s, t in getattr(fm, "_mode_pairs", [])}
        src = list(fm.source.modules())
        self.sources = [
            pairs.get(id(m), src[i] if i < len(src) else fm.source)
            for i, m in enumerate(self.modules)
        ]
        self.channels_last = getattr(fm, "channels_last", None)
        self.fused_attention = has_fused_attention(fm.source)


def _structure_copy(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """New module objects with the same layer code and attributes; every dict/set is copied.

    Parameters, buffers and hooks are then the copy's own slots (writing one never reaches the
    template); tensors are shared until re-pointed. Shared submodules stay shared.
    """
    done = memo.get(id(module))
    if done is not None:
        return done
    new = module.__class__.__new__(module.__class__)
    state = dict(module.__dict__)
    for k in _CONTAINERS:
        v = state.get(k)
        if v is not None:
            state[k] = v.copy() if v else type(v)()
    object.__setattr__(new, "__dict__", state)
    memo[id(module)] = new
    subs = new._modules
    for k, m in list(subs.items()):
        subs[k] = None if m is None else _structure_copy(m, memo)
    return new


class _FastWeights(nn.Module):
    """Shared machinery: root/clone state, forward, parameter views and the checked gradient."""

    _fn: ClassVar[str] = "l2l"
    _flags_at: ClassVar[str] = "the constructor or adapt()"
    first_order: bool
    allow_unused: bool
    allow_nograd: bool

    def _init_root(self, model: nn.Module, bn: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{self._fn}: model must be a torch.nn.Module, got {type(model).__name__}."
            )
        self._modules["module"] = model
        self._bn = bn
        self._fm: FunctionalModel | None = None
        self._plan: _Plan | None = None
        self._fast: dict[str, Tensor] | None = None
        self._modes: list[bool] = []
        self._bound: nn.Module | None = None
        self._bound_mods: list[nn.Module] = []
        self._functional()  # validates bn now rather than at the first clone()

    # -- root / clone plumbing ----------------------------------------------------------------
    def _model(self) -> nn.Module:
        return cast(nn.Module, self._modules["module"])

    def _functional(self) -> FunctionalModel:
        # Built lazily and rebuilt if ``.module`` was reassigned; clones reuse their root's.
        if self._fast is None and (self._fm is None or self._fm.source is not self._model()):
            self._fm = FunctionalModel.from_module(self._model(), self._bn, fn_name=self._fn)
            self._plan = _Plan(self._fm)
        return cast(FunctionalModel, self._fm)

    def _spawn(self: _T, fast: dict[str, Tensor]) -> _T:
        """A clone holding ``fast`` and sharing this wrapper's template."""
        fm = self._functional()
        plan = cast(_Plan, self._plan)
        new = type(self).__new__(type(self))
        # A clone is built once per task: fill its __dict__ directly rather than through
        # nn.Module.__init__ / __setattr__ (none of these values is a parameter or a module).
        state = {k: (v.copy() if k in _CONTAINERS else v) for k, v in _BLANK.items()}
        state.update(
            training=self.training,
            _bn=self._bn,
            _fm=fm,
            _plan=plan,
            _fast=fast,
            _bound=None,
            _bound_mods=[],
            _modes=[m.training for m in plan.sources] if self._fast is None else list(self._modes),
        )
        object.__setattr__(new, "__dict__", state)
        return new

    def _set(self, **values: Any) -> None:
        """Plain attributes of a clone (flags, rates), set without nn.Module.__setattr__."""
        self.__dict__.update(values)

    def _flags(
        self, first_order: bool | None, allow_unused: bool | None, allow_nograd: bool | None
    ) -> tuple[bool, bool, bool]:
        """``(first_order, allow_unused, allow_nograd)``: each given value, else this wrapper's."""
        return (
            self.first_order if first_order is None else bool(first_order),
            self.allow_unused if allow_unused is None else bool(allow_unused),
            self.allow_nograd if allow_nograd is None else bool(allow_nograd),
        )

    def _start_fast(self) -> dict[str, Tensor]:
        if self._fast is None:
            return {k: p.clone() for k, p in self._model().named_parameters()}
        return {k: p.clone() for k, p in self._fast.items()}

    def _bind(self) -> nn.Module:
        """This clone's copy of the template, its parameter slots pointing at the fast weights."""
        if self._bound is not None:
            return self._bound
        plan = cast(_Plan, self._plan)
        memo: dict[int, nn.Module] = {}
        bound = _structure_copy(plan.modules[0], memo)
        mods = [memo[id(m)] for m in plan.modules]
        for m, flag in zip(mods, self._modes):
            m.__dict__["training"] = flag
        self._set(_bound=bound, _bound_mods=mods)
        self._point_params()
        return bound

    def _point_params(self) -> None:
        plan, mods, fast = cast(_Plan, self._plan), self._bound_mods, cast(dict, self._fast)
        for i, key, name in plan.params:
            mods[i]._parameters[key] = fast[name]
        for i in plan.rnns:
            refresh_rnn(mods[i])

    @property
    def module(self) -> nn.Module:
        """The wrapped model; on a clone, a copy of it holding the current fast weights.

        The copy follows the clone (its parameters are re-pointed after each ``adapt``), so
        running it is equivalent to calling the clone. It is the clone's private structure:
        the wrapped model is never modified through it.
        """
        if self._fast is None:
            return self._model()
        bound = self._bind()
        self._point_buffers()
        return bound

    def _point_buffers(self) -> None:
        # Fresh clones of the model's buffers at each call: the clone reads the model's current
        # running statistics (eval mode) and nothing it does can write back to them.
        plan = cast(_Plan, self._plan)
        if plan.buffers:
            bufs, mods = self._functional().buffers(), self._bound_mods
            for i, key, name in plan.buffers:
                mods[i]._buffers[key] = bufs[name]

    def _detach_fast(self, keep_requires_grad: bool) -> bool:
        """``l2l.detach_module`` on a clone: detach its fast weights. False on the root."""
        if self._fast is None:
            return False
        keep = keep_requires_grad
        self._fast = {
            k: t.detach().requires_grad_(keep and t.requires_grad) for k, t in self._fast.items()
        }
        if self._bound is not None:
            self._point_params()
        return True

    def __getattr__(self, name: str) -> Any:
        # Like learn2learn: attributes the wrapper lacks are looked up on the wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "module":
                raise
            return getattr(self.module, name)

    def train(self: _T, mode: bool = True) -> _T:
        super().train(mode)
        if self._fast is not None:
            self._modes = [mode] * len(self._modes)
            for m in self._bound_mods:
                m.training = mode
        return self

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """Root: the model's parameters (and learned rates). Clone: the current fast weights."""
        if self._fast is None:
            yield from super().named_parameters(prefix, recurse, remove_duplicate)
            return
        head = f"{prefix}.module." if prefix else "module."
        for k, t in self._fast.items():
            yield head + k, cast(nn.Parameter, t)

    def extra_repr(self) -> str:
        return "" if self._fast is None else f"clone with {len(self._fast)} fast weights"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model: the original on the root, the fast weights on a clone."""
        if self._fast is None:
            return self._model()(*args, **kwargs)
        bound = self._bound if self._bound is not None else self._bind()
        self._point_buffers()
        plan = cast(_Plan, self._plan)
        where = plan.channels_last
        if where is not None and args and isinstance(args[0], Tensor):
            x = args[0]
            if where == "any" or x.device.type == "cpu":
                args = (to_channels_last(x), *args[1:])
        if not self.__dict__.get("first_order", True) and torch.is_grad_enabled():
            # A second-order clone: adapt() will differentiate this forward's backward
            # (create_graph=True), and the fused attention kernels have no double backward.
            # adapt() comes too late to decide: the forward has already run by then.
            with higher_order_attention():
                return bound(*args, **kwargs)
        if plan.fused_attention:  # nn.MultiheadAttention's eval fast path has no derivative
            with no_fused_inference():
                return bound(*args, **kwargs)
        return bound(*args, **kwargs)

    # -- the inner step -----------------------------------------------------------------------
    def _step(
        self,
        loss: Tensor,
        lrs: dict[str, LR],
        first_order: bool | None,
        allow_unused: bool | None,
        allow_nograd: bool | None,
    ) -> None:
        """One step with rates ``lrs``; a flag given as ``None`` is this wrapper's."""
        fn = f"{self._fn}.adapt"
        first_order, allow_unused, allow_nograd = self._flags(
            first_order, allow_unused, allow_nograd
        )
        if self._fast is None:
            raise ValueError(
                f"{fn}: called on the wrapper of your model, not on a clone. Adapt a clone: "
                f"learner = maml.clone(); learner.adapt(loss). (learn2learn would replace your "
                f"model's parameters by non-leaf tensors that the optimizer no longer updates.)"
            )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"{fn}: loss must be a scalar tensor, got {shape}; reduce it first (e.g. .mean())."
            )
        if not torch.is_grad_enabled():
            raise ValueError(
                f"{fn}: gradients are disabled (torch.no_grad() or inference_mode); adaptation "
                f"needs them, also at evaluation time. Run clone() and adapt() outside no_grad."
            )
        fast = self._fast
        frozen = [k for k, t in fast.items() if not t.requires_grad]
        if frozen and not allow_nograd:
            raise ValueError(
                f"{fn}: parameters {frozen} have requires_grad=False, so they cannot be adapted. "
                f"Pass allow_nograd=True (to {self._flags_at}) to keep them fixed, or set "
                f"requires_grad=True on them."
            )
        diff = [k for k, t in fast.items() if t.requires_grad]
        if not diff:
            return
        if not loss.requires_grad:
            raise ValueError(
                f"{fn}: the loss does not depend on the clone's parameters (no graph). Compute it "
                f"from the clone's output, learner(x), outside torch.no_grad()."
            )
        create = not first_order
        try:
            raw = torch.autograd.grad(
                loss,
                [fast[k] for k in diff],
                retain_graph=create,
                create_graph=create,
                allow_unused=True,
            )
        except RuntimeError as err:
            better = translate_autograd_error(fn, err, 1 if first_order else 2)
            if better is None:
                raise
            raise better from err
        missing = [k for k, g in zip(diff, raw) if g is None]
        if missing and not allow_unused and len(missing) == len(diff):
            raise ValueError(
                f"{fn}: the loss does not depend on this clone's parameters. Compute it from the "
                f"clone's output (learner(x)), not from the wrapped model's (maml(x) or model(x))."
            )
        if missing and not allow_unused:
            raise ValueError(
                f"{fn}: parameters {missing} do not reach the loss, so they have no gradient. "
                f"Pass allow_unused=True (to {self._flags_at}) to leave them unadapted."
            )
        grads = {k: g for k, g in zip(diff, raw) if g is not None}
        # metagrad.optim.SGD's rule, p - lr * g, written out: this runs per task per step.
        self._set(_fast={k: (t - lrs[k] * grads[k] if k in grads else t) for k, t in fast.items()})
        if self._bound is not None:
            self._point_params()


class MAML(_FastWeights):
    r"""Model-agnostic meta-learning, learn2learn's ``l2l.algorithms.MAML`` interface.

    ``clone()`` returns a ``MAML`` whose parameters are differentiable copies of the model's;
    ``clone.adapt(loss)`` takes one step
    :math:`\theta' = \theta - \mathrm{lr}\,\nabla_\theta \mathcal{L}(\theta)` (keeping the graph
    unless ``first_order``), and a query loss on the clone back-propagates into the model:
    ``maml.parameters()`` are the meta-parameters to hand to the outer optimizer.

    Differences from learn2learn 0.2 (deliberate):

    * The model is never modified: clones run a private template with
      ``torch.func.functional_call``. BatchNorm running statistics of the original model are
      not updated by a clone's forward passes (the inner loop cannot leak into the model); in
      train mode clones normalize with batch statistics (same outputs as learn2learn), in eval
      mode they read the original's current running statistics. ``bn="transductive"`` uses
      batch statistics in both modes.
    * Frozen or unused parameters raise one ``ValueError`` naming the parameters and the flag
      to set, where learn2learn prints a traceback and then fails with ``UnboundLocalError``.
    * ``adapt`` on the wrapper itself (rather than on a clone) raises ``ValueError``.
    * A clone's ``.module`` is a copy rebuilt after each ``adapt``; a clone's ``.parameters()``
      are its current fast weights.

    Args:
        model: the module to meta-learn.
        lr: fast-adaptation learning rate (a float, or a tensor to learn it).
        first_order: first-order MAML (FOMAML): inner gradients are treated as constants.
        allow_unused: leave parameters that do not reach the loss unadapted instead of raising.
            Defaults to ``allow_nograd``.
        allow_nograd: leave parameters with ``requires_grad=False`` unadapted instead of raising.
        bn: metagrad extension: ``"running"`` (default; the module's mode decides, running
            statistics are read but never written) or ``"transductive"`` (batch statistics).

    References:
        Finn, Abbeel, Levine, *Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks*, ICML 2017.

    Example:
        >>> import torch
        >>> import metagrad.compat.learn2learn as l2l
        >>> maml = l2l.algorithms.MAML(torch.nn.Linear(3, 1), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> learner = maml.clone()
        >>> learner.adapt(torch.nn.functional.mse_loss(learner(x), y))
        >>> torch.nn.functional.mse_loss(learner(x), y).backward()
        >>> maml.module.weight.grad.shape
        torch.Size([1, 3])
    """

    _fn: ClassVar[str] = "l2l.MAML"
    _flags_at: ClassVar[str] = "the constructor, clone() or adapt()"

    def __init__(
        self,
        model: nn.Module,
        lr: float | Tensor,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        *,
        bn: str = "running",
    ) -> None:
        super().__init__()
        _check_lr(self._fn, "lr", lr)
        self.lr = lr
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self._init_root(model, bn)

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MAML:
        """A ``MAML`` holding differentiable copies of the parameters (the graph is shared).

        Args:
            first_order: defaults to ``self.first_order``.
            allow_unused: defaults to ``self.allow_unused``.
            allow_nograd: defaults to ``self.allow_nograd``.

        Returns:
            The clone; its forward equals the model's until it is adapted.
        """
        new = self._spawn(self._start_fast())
        fo, au, an = self._flags(first_order, allow_unused, allow_nograd)
        new._set(lr=self.lr, first_order=fo, allow_unused=au, allow_nograd=an)
        return new

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """One gradient step on ``loss``; updates this clone's parameters (not the model's).

        Args:
            loss: scalar loss computed from this clone's output.
            first_order: defaults to ``self.first_order``; False keeps the graph of the
                gradient (``create_graph=True``) for the exact meta-gradient.
            allow_unused: defaults to ``self.allow_unused``.
            allow_nograd: defaults to ``self.allow_nograd``.

        Raises:
            ValueError: called on the root; non-scalar loss; a parameter is frozen and
                ``allow_nograd`` is False, or unused and ``allow_unused`` is False.
        """
        lrs: dict[str, LR] = dict.fromkeys(self._fast or {}, self.lr)
        self._step(loss, lrs, first_order, allow_unused, allow_nograd)


class MetaSGD(_FastWeights):
    r"""Meta-SGD, learn2learn's ``l2l.algorithms.MetaSGD`` interface.

    Like :class:`MAML`, but every parameter :math:`\theta_j` has a learned rate tensor
    :math:`\alpha_j` (``self.lrs``, one per entry of ``model.parameters()``, initialized to
    ``lr``): :math:`\theta' = \theta - \alpha \odot \nabla_\theta \mathcal{L}(\theta)`. The
    rates are in ``metasgd.parameters()`` and receive meta-gradients through the clones.
    The differences from learn2learn listed in :class:`MAML` apply here too.

    Args:
        model: the module to meta-learn.
        lr: initial value of every learned rate.
        first_order: first-order updates (the rates still get gradients through the step).
        lrs: rates to use instead (one tensor per parameter, broadcastable to it).
        allow_unused: metagrad extension (learn2learn's MetaSGD raises): leave parameters that
            do not reach the loss unadapted.
        allow_nograd: metagrad extension: leave frozen parameters unadapted.
        bn: BatchNorm policy, as in :class:`MAML`.

    References:
        Li, Zhou, Chen, Li, *Meta-SGD: Learning to Learn Quickly for Few-Shot Learning*, 2017.

    Example:
        >>> import torch
        >>> import metagrad.compat.learn2learn as l2l
        >>> meta = l2l.algorithms.MetaSGD(torch.nn.Linear(3, 1), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> learner = meta.clone()
        >>> learner.adapt(torch.nn.functional.mse_loss(learner(x), y))
        >>> torch.nn.functional.mse_loss(learner(x), y).backward()
        >>> meta.lrs[0].grad.shape
        torch.Size([1, 3])
    """

    _fn: ClassVar[str] = "l2l.MetaSGD"
    lrs: Any

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        first_order: bool = False,
        lrs: Sequence[Tensor] | None = None,
        *,
        allow_unused: bool = False,
        allow_nograd: bool = False,
        bn: str = "running",
    ) -> None:
        super().__init__()
        self._init_root(model, bn)  # first, so parameters() lists the model, then the rates
        params = list(model.parameters())
        rates: nn.ParameterList | list[Tensor]
        if lrs is None:
            _check_lr(self._fn, "lr", lr)
            rates = nn.ParameterList(
                [nn.Parameter(torch.full_like(p.detach(), float(lr))) for p in params]
            )
        elif isinstance(lrs, nn.ParameterList):
            rates = lrs
        elif all(isinstance(t, nn.Parameter) for t in lrs):
            rates = nn.ParameterList(lrs)  # registered: in parameters() and state_dict()
        else:
            rates = list(lrs)  # e.g. non-leaf tensors from another clone: kept as given
        if len(rates) != len(params):
            raise ValueError(
                f"{self._fn}: got {len(rates)} learning-rate tensors for {len(params)} "
                f"parameters; pass one per entry of model.parameters(), in that order."
            )
        self.lrs = rates
        self.first_order = bool(first_order)
        self.allow_unused = bool(allow_unused)
        self.allow_nograd = bool(allow_nograd)

    def _detach_fast(self, keep_requires_grad: bool) -> bool:
        if not super()._detach_fast(keep_requires_grad):
            return False
        keep = keep_requires_grad
        self.lrs = [t.detach().requires_grad_(keep and t.requires_grad) for t in self.lrs]
        return True

    def clone(self) -> MetaSGD:
        """A ``MetaSGD`` holding differentiable copies of the parameters and of the rates."""
        new = self._spawn(self._start_fast())
        new._set(
            lrs=[lr.clone() for lr in self.lrs],
            first_order=self.first_order,
            allow_unused=self.allow_unused,
            allow_nograd=self.allow_nograd,
        )
        return new

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        *,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> None:
        """One step :math:`\\theta - \\alpha \\odot \\nabla\\mathcal{L}` on this clone.

        Args:
            loss: scalar loss computed from this clone's output.
            first_order: defaults to ``self.first_order``.
            allow_unused: defaults to ``self.allow_unused`` (metagrad extension).
            allow_nograd: defaults to ``self.allow_nograd`` (metagrad extension).

        Raises:
            ValueError: as :meth:`MAML.adapt`.
        """
        lrs: dict[str, LR] = dict(zip(self._fast or {}, self.lrs))
        self._step(loss, lrs, first_order, allow_unused, allow_nograd)
