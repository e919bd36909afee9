"""Every use of a private PyTorch API, in one place, each with a fallback.

metagrad is tested on torch 2.13 only (``pyproject.toml`` pins ``torch>=2.13,<2.14``). The
engine needs a few things torch does not expose publicly; each is reached through this module,
so a torch upgrade that moves one breaks here, with a fallback that keeps results correct:

* ``pytree``: ``torch.utils._pytree`` (the flatten/unflatten that ``torch.func`` itself uses).
  Fallback: ``torch.utils._cxx_pytree``, its drop-in twin.
* :func:`is_functorch_wrapped`: ``torch._C._functorch.is_functorch_wrapped_tensor`` (is this
  tensor inside a ``torch.func`` transform?). Fallback: answer True, which sends the callers
  down their stock, always-correct path (no channels-last view, the stock BatchNorm).

PyTorch error-message texts the library recognizes to explain a failure are matched in
``metagrad._errors`` and ``metagrad.algorithms._task``; when a text changes, the original
error passes through unexplained (never a wrong explanation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    from torch.utils import _pytree as pytree
except ImportError:  # pragma: no cover - a torch without the private module
    from torch.utils import _cxx_pytree as pytree  # type: ignore[no-redef]

_is_wrapped: Any = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None
)


def is_functorch_wrapped(x: Tensor) -> bool:
    """True when ``x`` is a tensor inside a ``torch.func`` transform (vmap, grad, jvp).

    Without the private query (another torch) this answers True: callers then take their
    stock path, which is correct under transforms and off them.
    """
    if _is_wrapped is None:  # pragma: no cover - a torch without the private query
        return True
    return bool(_is_wrapped(x))


__all__ = ["is_functorch_wrapped", "pytree"]
