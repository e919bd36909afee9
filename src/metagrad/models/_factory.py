"""Resolve a user's model factory given as ``"package.module:function"`` (CLI ``--model``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``"package.module:function"`` to a zero-argument factory returning an ``nn.Module``.

    The attribute may be dotted (``pkg.mod:Class.build``).

    Raises:
        ValueError: Malformed spec, module not importable, attribute missing or not callable.
    """
    fn = "metagrad.models.load_factory"
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(
            f"{fn}: model {spec!r} is neither a built-in (mlp, conv4) nor "
            f"'package.module:function' (e.g. mypkg.models:make_net, a function returning an "
            f"nn.Module)."
        )
    try:
        obj: object = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(
            f"{fn}: cannot import module {mod_name!r} for {spec!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{fn}: module {mod_name!r} has no callable {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{fn}: {spec!r} is not callable; point at a function or class.")
    return obj  # type: ignore[return-value]
