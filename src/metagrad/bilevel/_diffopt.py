r"""A differentiable optimizer object: ``step(loss)`` returns new weights on the autograd tape.

:class:`DiffOptimizer` holds a :mod:`metagrad.optim` optimizer, its state and a step count per
parameter. One call

.. math::
    g_t = \nabla_w \ell_t(w_{t-1}),\qquad (w_t, s_t) = U(w_{t-1}, g_t, s_{t-1};\ h)

takes the gradient of the loss with ``create_graph`` when higher-order gradients are tracked, so
:math:`w_t` stays a differentiable function of :math:`w_0`, of the optimizer's tensor
hyperparameters :math:`h` and of every tensor the losses read. A parameter whose gradient does
not exist (it does not reach the loss) is either an error or, when allowed, skipped exactly as
``torch.optim`` skips a parameter whose ``.grad`` is None: its value, its state and its step
count stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metagrad._compat import pytree
from metagrad._errors import NonFiniteError
from metagrad._typing import Params
from metagrad.optim._base import Optimizer

if TYPE_CHECKING:
    from metagrad.bilevel._innerloop import FastModel

GradCallback = Callable[[Params], Params]
"""``grad_callback(grads) -> grads``: transforms the gradients of a step (e.g. clipping)."""


def check_loss(fn: str, loss: object) -> Tensor:
    """``loss`` if it is a differentiable floating-point scalar; a teaching error otherwise."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"{fn}: loss must be a scalar tensor (the value of your loss function), got "
            f"{type(loss).__name__}."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"{fn}: loss must be a scalar tensor, got shape {tuple(loss.shape)}; reduce it first, "
            f"e.g. loss.mean() or reduction='mean' in the loss function."
        )
    if not loss.is_floating_point():
        raise TypeError(f"{fn}: loss has dtype {loss.dtype}; cast it to a floating point type.")
    if not loss.requires_grad:
        raise ValueError(
            f"{fn}: loss does not require grad, so it does not depend on the fast weights; compute "
            f"it from the functional model's output (fmodel(x), not the original model) and "
            f"outside torch.no_grad()."
        )
    return loss


def required_grads(
    loss: Tensor, tensors: Sequence[Tensor], create_graph: bool
) -> list[Tensor | None]:
    """The gradients of ``loss`` w.r.t. ``tensors``, aligned with them: ``None`` for a tensor
    that does not require grad or that ``loss`` does not reach (no autograd call if none
    requires grad)."""
    targets = [i for i, t in enumerate(tensors) if t.requires_grad]
    out: list[Tensor | None] = [None] * len(tensors)
    if targets:
        raw = torch.autograd.grad(
            loss, [tensors[i] for i in targets], create_graph=create_graph, allow_unused=True
        )
        for i, g in zip(targets, raw):
            out[i] = g
    return out


def merge_state(old: Any, new: Any) -> Any:
    """Per-field union of two optimizer states (NamedTuples of dicts); ``new`` wins on clashes.

    The result has the type with more fields, so ``SGDState`` survives an ``EmptyState``
    returned for a subset of parameters without momentum.
    """
    if old is None:
        return new
    old_fields = getattr(old, "_fields", None)
    new_fields = getattr(new, "_fields", None)
    if old_fields is None or new_fields is None:
        return new  # not a NamedTuple of dicts: nothing to merge into
    cls = type(new) if len(new_fields) >= len(old_fields) else type(old)
    return cls(*({**getattr(old, f, {}), **getattr(new, f, {})} for f in cls._fields))


def detach_state(state: Any) -> Any:
    """The state with every tensor detached (no graph kept from one step to the next)."""
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, state)


def update_by_count(
    optimizer: Optimizer,
    grads: Params,
    params: Params,
    state: Any,
    counts: dict[str, int],
) -> tuple[Params, Any]:
    """One update of the parameters in ``grads``, each at its own 0-based step count.

    ``torch.optim`` counts steps per parameter (a parameter without a gradient does not
    advance), so parameters are updated in groups of equal count; ``counts`` is advanced in
    place. Returns the updated parameters and the new state of those parameters only.
    """
    by_count: dict[int, list[str]] = {}
    for name in grads:
        by_count.setdefault(counts.get(name, 0), []).append(name)
    out: Params = {}
    new_state: Any = None
    for count in sorted(by_count):
        names = by_count[count]
        upd, st = optimizer.update(
            {n: grads[n] for n in names}, state, {n: params[n] for n in names}, count
        )
        out.update(upd)
        new_state = merge_state(new_state, st)
        for n in names:
            counts[n] = count + 1
    return out, new_state


class DiffOptimizer:
    r"""A :mod:`metagrad.optim` optimizer as an object whose ``step(loss)`` returns new weights.

    .. math::
        w_t = U\bigl(w_{t-1}, \nabla_w \ell_t(w_{t-1}), s_{t-1}; h\bigr)

    With ``track_higher_grads`` the gradient is taken with ``create_graph=True``: :math:`w_t`
    is an exact, differentiable function of :math:`w_0`, of the tensor hyperparameters
    :math:`h` and of anything the losses close over (second and higher order). Without it the
    new weights are detached leaves (test-time adaptation, no graph kept).

    Usually made by :func:`metagrad.bilevel.innerloop`; standalone, pass ``params`` to
    :meth:`step`.

    Args:
        optimizer: A :mod:`metagrad.optim` optimizer, e.g. ``metagrad.optim.Adam(lr=1e-3)``.
        fmodel: The :class:`FastModel` whose fast weights :meth:`step` reads and updates.
        adapted: Names of the parameters the optimizer updates (default: the fmodel's
            trainable parameters, or every entry of ``params`` that requires grad).
        track_higher_grads: Keep the graph through the updates (exact higher-order
            gradients).
        allow_unused: A parameter whose gradient does not exist is skipped (value, state
            and step count unchanged, as ``torch.optim`` does) instead of raising.
        check_finite: Raise :class:`metagrad.NonFiniteError` naming the step when the loss or
            a gradient holds NaN/Inf.
        name: The public name used in error messages.

    Example:
        >>> import torch
        >>> from metagrad.optim import SGD
        >>> opt = DiffOptimizer(SGD(lr=0.5))
        >>> w = {"w": torch.tensor([1.0], requires_grad=True)}
        >>> new = opt.step((w["w"] ** 2).sum(), params=w)
        >>> new["w"]
        tensor([0.], grad_fn=<SubBackward0>)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        fmodel: FastModel | None = None,
        adapted: list[str] | None = None,
        *,
        track_higher_grads: bool = True,
        allow_unused: bool = False,
        check_finite: bool = True,
        name: str = "metagrad.bilevel.DiffOptimizer",
    ) -> None:
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(
                f"{name}: optimizer={optimizer!r} has no init/update; pass a metagrad.optim "
                f"optimizer such as metagrad.optim.SGD(lr=0.1) (a torch.optim optimizer goes "
                f"through metagrad.bilevel.innerloop or metagrad.optim.from_torch)."
            )
        self._opt = optimizer
        self._fmodel = fmodel
        if adapted is None and fmodel is not None:
            adapted = list(fmodel.trainable)
        self._adapted = None if adapted is None else list(adapted)
        self.track_higher_grads = bool(track_higher_grads)
        self.allow_unused = bool(allow_unused)
        self.check_finite = bool(check_finite)
        self._name = name
        self._state: Any = None
        self._counts: dict[str, int] = {}
        self._steps = 0

    # ------------------------------------------------------------------------ inspection
    @property
    def optimizer(self) -> Optimizer:
        """The optimizer in use (with the overrides applied so far)."""
        return self._opt

    @property
    def state(self) -> Any:
        """The optimizer state (a NamedTuple of per-parameter dicts); None before a step."""
        return self._state

    @property
    def steps(self) -> int:
        """How many times :meth:`step` ran."""
        return self._steps

    @property
    def step_counts(self) -> dict[str, int]:
        """Updates received by each parameter (``torch.optim``'s per-parameter ``step``)."""
        return dict(self._counts)

    def hyperparams(self) -> dict[str, Tensor]:
        """The optimizer's tensor hyperparameters (see ``Optimizer.hyperparams``)."""
        return self._opt.hyperparams()

    def override(self, values: Mapping[str, Tensor]) -> None:
        """Replace hyperparameters from now on (keys as in :meth:`hyperparams`, e.g. ``"lr"``).

        Raises:
            ValueError: A key names no hyperparameter of the optimizer.
        """
        try:
            self._opt = self._opt.with_hyperparams(dict(values))
        except ValueError as err:
            raise ValueError(f"{self._name}: override: {err}") from None

    # ------------------------------------------------------------------------------ step
    def step(
        self,
        loss: Tensor,
        params: Mapping[str, Tensor] | list[Tensor] | tuple[Tensor, ...] | None = None,
        override: Mapping[str, Tensor] | None = None,
        grad_callback: GradCallback | None = None,
    ) -> Params:
        r"""One differentiable update; returns every parameter (updated or not) by name.

        Args:
            loss: Scalar loss at the current weights.
            params: The weights to update (a dict, or a list in ``named_parameters()`` order);
                default the fmodel's latest fast weights. Given with an fmodel, they replace
                its fast weights.
            override: Hyperparameters replaced from this step on (see :meth:`override`).
            grad_callback: ``grads -> grads`` applied to this step's gradients (dict by
                name), e.g. clipping.

        Returns:
            The new weights; the fmodel (if any) records them as its latest fast weights.

        Raises:
            ValueError: Non-scalar loss, a loss that does not depend on the weights, a
                parameter that does not reach the loss (unless ``allow_unused``), an unknown
                override key.
            NonFiniteError: NaN/Inf in the loss or a gradient (with ``check_finite``).
        """
        fn = f"{self._name}.step" if not self._name.endswith(".step") else self._name
        loss = check_loss(fn, loss)
        if override is not None:
            self.override(override)
        current = self._current(fn, params)
        names = self._adapted if self._adapted is not None else list(current)
        raw = required_grads(loss, [current[n] for n in names], self.track_higher_grads)
        grads = {n: g for n, g in zip(names, raw) if g is not None}
        missing = [n for n in names if current[n].requires_grad and n not in grads]
        if missing and not self.allow_unused:
            raise ValueError(
                f"{fn}: parameters {missing} do not reach the loss, so they have no gradient. "
                f"Pass allow_unused=True to leave them unchanged (as torch.optim does for a None "
                f".grad), or set requires_grad=False on them."
            )
        if grad_callback is not None:
            grads = {n: g for n, g in grad_callback(dict(grads)).items() if g is not None}
        if self.check_finite:
            self._check_finite(loss, grads)
        if self._state is None and self._adapted is not None:
            # Build the state of every adapted parameter at once, as init(params) expects.
            pending = [n for n in self._adapted if n in current]
            self._state = self._opt.init({n: current[n] for n in pending})
            self._counts.update({n: 0 for n in pending})
        new_names = [n for n in grads if n not in self._counts]
        if new_names:
            fresh = self._opt.init({n: current[n] for n in new_names})
            self._state = merge_state(self._state, fresh)
            self._counts.update({n: 0 for n in new_names})
        updated, new_state = update_by_count(self._opt, grads, current, self._state, self._counts)
        self._state = merge_state(self._state, new_state)
        if not self.track_higher_grads:
            updated = {
                n: v.detach().requires_grad_(v.is_floating_point()) for n, v in updated.items()
            }
            self._state = detach_state(self._state)
        out = {**current, **updated}
        self._steps += 1
        if self._fmodel is not None:
            self._fmodel.update_params(out)
        return out

    def _current(
        self, fn: str, params: Mapping[str, Tensor] | list[Tensor] | tuple[Tensor, ...] | None
    ) -> Params:
        if params is not None:
            if self._fmodel is not None:
                return self._fmodel.as_params(params, f"{fn}(params=...)")
            if not isinstance(params, Mapping):
                raise TypeError(
                    f"{fn}: params must be a dict name -> tensor when the optimizer has no "
                    f"functional model; got {type(params).__name__}."
                )
            return dict(params)
        if self._fmodel is None:
            raise ValueError(
                f"{fn}: no weights to update; pass params={{name: tensor}} or create the "
                f"optimizer with metagrad.bilevel.innerloop, which links it to a functional model."
            )
        return self._fmodel.fast_params

    def _check_finite(self, loss: Tensor, grads: Params) -> None:
        fn = self._name
        if not bool(loss.detach().isfinite()):
            raise NonFiniteError(fn, "inner loss", None, self._steps)
        if grads:
            ok = torch.stack([g.detach().isfinite().all() for g in grads.values()])
            if not bool(ok.all()):
                bad = [n for n, f in zip(grads, ok.tolist()) if not f]
                raise NonFiniteError(fn, f"gradient of {bad[0]!r}", None, self._steps)

    def __repr__(self) -> str:
        return f"DiffOptimizer({self._opt!r}, steps={self._steps})"
