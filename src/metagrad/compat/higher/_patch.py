r"""``higher.patch`` without the patching: a functional view of a module with fast weights.

``higher.monkeypatch`` builds a new class per submodule that inherits the user's and writes
fast weights into it. Here :class:`FunctionalModule` runs a private copy of the module with
``torch.func.functional_call`` (through :class:`metagrad.bilevel.FastModel`), so the user's
module is never patched, never written, and nothing outlives the view (higher's patched
classes kept references alive, its issue #6).

Semantics kept from higher: ``fmodel(x, params=p)`` makes ``p`` the latest fast weights,
``fast_params`` is a list in ``module.parameters()`` order (shared parameters once),
``parameters(time=t)`` is the history, and BatchNorm layers in train mode update the view's
*own* copy of the running statistics (the module's are copied at creation, never written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.bilevel._innerloop import FastModel, ParamsLike

_FN = "metagrad.compat.higher.monkeypatch"


class _HigherFast(FastModel):
    """A FastModel with higher's calling convention: ``params=`` become the latest weights."""

    def _call_target(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], params: Any
    ) -> Any:
        if params is not None:
            self.update_params(params)
        elif not self._history:
            raise ValueError(
                f"{self._name}: this functional module has no fast weights of its own (it was "
                f"made by make_functional); pass params=[...] to the call, one tensor per entry "
                f"of model.parameters(), or set fmodel.fast_params first."
            )
        return self._run(target, args, kwargs, None)

    def sync_buffers(self, module: nn.Module, device: torch.device | str | None) -> None:
        """Replace this view's buffers by copies of ``module``'s (same names)."""
        source = dict(module.named_buffers())
        missing = [n for n in self._buffers if n not in source]
        if missing:
            raise KeyError(
                f"metagrad.compat.higher.buffer_sync: the module has no buffers {missing}; "
                f"sync from the module the functional module was made from."
            )
        for n in self._buffers:
            b = source[n].detach()
            self._buffers[n] = (b if device is None else b.to(device)).clone()
        self._refresh_buffer_keys()


class FunctionalModule:
    r"""higher's "monkey-patched" module, as a view that leaves the user's module alone.

    Calling it runs the user's model with the latest fast weights :math:`w_t`;
    ``fmodel(x, params=p)`` first records ``p`` as the latest fast weights (as higher does).
    Submodules, methods and attributes of the model are reachable through it
    (``fmodel.encoder(x)``, ``fmodel.embed(x)``, ``fmodel[0]``, ``fmodel.fc.weight``) and use
    the fast weights. It is not an instance of the user's class nor an ``nn.Module``.

    Made by :func:`monkeypatch`, :func:`make_functional` or ``innerloop_ctx``.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        device: torch.device | str | None = None,
        copy_initial_weights: bool = True,
        initialize: bool = True,
        name: str = _FN,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{name}: module must be a torch.nn.Module, got {type(module).__name__}."
            )
        self._fast = _HigherFast(
            module,
            copy_initial_weights=copy_initial_weights,
            track_higher_grads=True,
            bn="private",
            device=device,
            name=name,
            initialize=initialize,
        )

    # ------------------------------------------------------------------------ fast weights
    @property
    def fast_params(self) -> list[Tensor] | None:
        """The latest fast weights, in ``module.parameters()`` order (None if there are none)."""
        fast = self._fast
        return fast.parameters() if fast._history else None

    @fast_params.setter
    def fast_params(self, value: ParamsLike) -> None:
        self._fast.update_params(value)

    @property
    def _fast_params(self) -> list[list[Tensor]] | None:
        """Every recorded version (higher's internal history list)."""
        history = self._fast._history
        return [list(h.values()) for h in history] if history else None

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The fast weights at time 0 (only while higher-order gradients are tracked)."""
        if not self.track_higher_grads:
            raise ValueError(
                f"{_FN}: init_fast_params is not kept when track_higher_grads=False (only the "
                f"latest fast weights are); keep fmodel.parameters() before the first step."
            )
        return self._fast.parameters(time=0)

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights after ``time`` updates (None: the latest), as an iterator.

        ``recurse`` exists for ``nn.Module`` compatibility: every fast weight is returned.
        """
        return iter(self._fast.parameters(time))

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, time: int | None = None
    ) -> Iterator[tuple[str, Tensor]]:
        """``(name, fast weight)`` pairs after ``time`` updates."""
        pre = f"{prefix}." if prefix else ""
        return iter([(pre + n, t) for n, t in self._fast.named_parameters(time)])

    def update_params(self, params: ParamsLike) -> None:
        """Record ``params`` (a list in ``parameters()`` order) as the latest fast weights."""
        self._fast.update_params(params)

    @property
    def track_higher_grads(self) -> bool:
        """Keep every version of the fast weights (False: the latest only)."""
        return self._fast.track_higher_grads

    @track_higher_grads.setter
    def track_higher_grads(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"{_FN}: track_higher_grads must be True or False, got {value!r}.")
        self._fast.track_higher_grads = value

    # ----------------------------------------------------------------------------- buffers
    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        """This view's own buffers (copies of the module's)."""
        return iter(self._fast.buffers().values())

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        """``(name, buffer)`` pairs of this view's own buffers."""
        pre = f"{prefix}." if prefix else ""
        return iter([(pre + n, b) for n, b in self._fast.buffers().items()])

    # ----------------------------------------------------------------------------- running
    @property
    def training(self) -> bool:
        """The view's train/eval flag (initially the module's)."""
        return self._fast.training

    def train(self, mode: bool = True) -> FunctionalModule:
        """Set the view's train/eval mode; the user's module keeps its own."""
        self._fast.train(mode)
        return self

    def eval(self) -> FunctionalModule:
        """The view in eval mode; the user's module keeps its own."""
        return self.train(False)

    def __call__(self, *args: Any, params: ParamsLike | None = None, **kwargs: Any) -> Any:
        return self._fast(*args, params=params, **kwargs)

    def forward(self, *args: Any, params: ParamsLike | None = None, **kwargs: Any) -> Any:
        """The model's forward with the latest fast weights (``params`` become them first)."""
        return self._fast(*args, params=params, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only the model's own attributes: FastModel's API must not shadow them.
        if name.startswith("__") or "_fast" not in self.__dict__:
            raise AttributeError(name)
        return self._fast._lookup(name)

    def __getitem__(self, index: Any) -> Any:
        return self._fast[index]

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        versions = len(self._fast._history)
        return f"FunctionalModule({type(self._fast.module).__name__}, versions={versions})"


_MonkeyPatchBase = FunctionalModule
"""higher's base class name for patched modules (for type hints and ``isinstance``)."""


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    r"""A functional version of ``module`` holding fast weights; ``module`` is not modified.

    Args:
        module: The user's module (never patched: parameters, buffers and flags untouched).
        device: Device of the fast weights and of the copied buffers.
        copy_initial_weights: The initial fast weights are detached copies, so gradients stop
            at them (take them with respect to ``fmodel.parameters(time=0)``); False makes
            them differentiable copies of the module's parameters (MAML: the meta-gradient
            reaches ``module``'s ``.grad``).
        track_higher_grads: Keep every version of the fast weights (False: the latest only,
            for test-time adaptation).

    Returns:
        A :class:`FunctionalModule`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = monkeypatch(model)
        >>> len(fmodel.fast_params), fmodel(torch.ones(3, 2)).shape
        (2, torch.Size([3, 1]))
    """
    fmodule = FunctionalModule(module, device=device, copy_initial_weights=copy_initial_weights)
    fmodule.track_higher_grads = track_higher_grads
    return fmodule


def make_functional(
    module: nn.Module, encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None
) -> FunctionalModule:
    """A functional version of ``module`` without fast weights: pass ``params=`` to each call.

    Args:
        module: The user's module (not modified).
        encapsulator: Optional ``f(fmodule, module)`` run on the result, e.g. to set its
            initial fast weights with ``fmodule.update_params(...)``.
    """
    fmodule = FunctionalModule(
        module, initialize=False, name="metagrad.compat.higher.make_functional"
    )
    if encapsulator is not None:
        encapsulator(fmodule, module)
    return fmodule


def buffer_sync(
    module: nn.Module, fmodule: FunctionalModule, device: torch.device | str | None = None
) -> None:
    """Copy ``module``'s buffers into ``fmodule``'s own (a one-off copy, never shared)."""
    if not isinstance(fmodule, FunctionalModule):
        raise TypeError(
            f"metagrad.compat.higher.buffer_sync: fmodule must come from monkeypatch or "
            f"make_functional, got {type(fmodule).__name__}."
        )
    fmodule._fast.sync_buffers(module, device)
