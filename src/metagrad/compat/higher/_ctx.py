"""``higher.innerloop_ctx``: a functional module and a differentiable optimizer in one context."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from metagrad.compat.higher._optim import DifferentiableOptimizer, _lookup, get_diff_optim
from metagrad.compat.higher._patch import FunctionalModule, monkeypatch

_FN = "metagrad.compat.higher.innerloop_ctx"


@contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    r"""A differentiable inner loop: ``(fmodel, diffopt)`` for ``model`` and ``opt``.

    ``diffopt.step(loss)`` replaces ``opt.zero_grad(); loss.backward(); opt.step()`` and
    returns the new fast weights :math:`w_{t+1} = U(w_t, \nabla_w \ell(w_t), s_t)`, kept on the
    autograd tape, so a loss of the final weights differentiates through every step. The model
    is never modified: ``fmodel`` is a view that runs a private copy of it.

    Args:
        model: The user's module.
        opt: A ``torch.optim`` optimizer over (a subset of) ``model.parameters()``, of a
            supported or registered type; its param groups and accumulated state are copied.
        device: Device of the fast weights and of the optimizer state.
        copy_initial_weights: True (higher's default): the initial fast weights are detached
            copies, and gradients stop there (take them with respect to
            ``fmodel.parameters(time=0)``). False: they are differentiable copies, so
            ``loss.backward()`` reaches ``model``'s parameters (MAML).
        override: ``{setting: [value]}`` or ``{setting: [one value per param group]}``;
            tensors that require grad are differentiable hyperparameters.
        track_higher_grads: False runs detached, first-order steps (test-time adaptation).

    Yields:
        ``(fmodel, diffopt)``: a :class:`FunctionalModule` and the matching
        :class:`DifferentiableOptimizer`.

    Raises:
        TypeError: ``model`` is not a module or ``opt`` not a torch optimizer.
        ValueError: An unsupported optimizer type or a malformed override.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import metagrad.compat.higher as higher
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        ...     for _ in range(3):
        ...         _ = diffopt.step(F.mse_loss(fmodel(x), y))
        ...     F.mse_loss(fmodel(x), y).backward()
        >>> model.weight.grad.shape
        torch.Size([1, 3])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"{_FN}: opt must be a torch.optim optimizer over model.parameters(), got "
            f"{type(opt).__name__}; for a metagrad.optim optimizer use metagrad.bilevel.innerloop."
        )
    _lookup(_FN, type(opt))
    fmodel = monkeypatch(
        model,
        device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    yield fmodel, diffopt
