"""Work around forward-mode AD gaps so forward-over-reverse HVPs run on common losses.

On torch 2.13, ``torch.func.jvp(torch.func.grad(f), ...)`` raises ``RuntimeError: ZeroTensors
are immutable`` when ``f`` calls ``F.mse_loss`` with the default ``reduction="mean"``: the
forward-mode formula of ``mse_loss_backward`` writes in place into the (immutable, zero)
tangent of the target, which has no tangent of its own. ``reduction="sum"`` and
``reduction="none"`` are not affected, so :class:`MeanMSEAsNone` rewrites the mean reduction
as ``mse_loss(..., reduction="none").mean()``: the same value and derivatives of every order,
through the native kernel, with the constant target still a constant.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MSE_SIGNATURE = inspect.signature(F.mse_loss)


class MeanMSEAsNone(TorchFunctionMode):
    """Torch-function mode computing ``F.mse_loss(a, b)`` as ``F.mse_loss(a, b, "none").mean()``.

    Only the plain mean reduction is rewritten (no legacy ``size_average``/``reduce``, no
    ``weight``); every other call, including ``nn.MSELoss`` with other options, runs unchanged.
    The mode adds no measurable overhead to a small MLP's HVP, so it is always on in ``"fwd"``.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.mse_loss:
            bound = _MSE_SIGNATURE.bind(*args, **kwargs).arguments
            plain_mean = (
                bound.get("reduction", "mean") == "mean"
                and bound.get("size_average") is None
                and bound.get("reduce") is None
                and bound.get("weight") is None
            )
            if plain_mean:
                # Inside a mode handler the mode is disabled, so this does not recurse.
                return F.mse_loss(bound["input"], bound["target"], reduction="none").mean()
        return func(*args, **kwargs)


def is_forward_ad_gap(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch lacking (or mis-implementing) a forward-mode AD formula."""
    msg = str(err)
    return "ZeroTensors are immutable" in msg or "Trying to use forward AD with" in msg
