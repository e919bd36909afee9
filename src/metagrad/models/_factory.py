"""Resolve a user's model factory given as ``"package.module:function"`` (CLI ``--model``).

Arguments go in the spec as a Python call with literal values,
``"mypkg.models:build(hidden=32, depth=3)"``, and the current folder is searched first for the
module (as ``python -m`` does), so ``metagrad check --model mypkg.models:build`` works from the
folder that holds ``mypkg`` without setting ``PYTHONPATH``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

FN = "metagrad.models.load_factory"


def _split_call(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """``"mod:f(1, a=2)"`` -> ``("mod:f", (1,), {"a": 2})``; literals only."""
    head, paren, rest = spec.partition("(")
    if not paren:
        return spec, (), {}
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
        if not isinstance(call, ast.Call) or any(isinstance(a, ast.Starred) for a in call.args):
            raise ValueError
        args = tuple(ast.literal_eval(a) for a in call.args)
        if any(k.arg is None for k in call.keywords):
            raise ValueError
        kwargs = {str(k.arg): ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        raise ValueError(
            f"{FN}: cannot read the arguments of {spec!r}; write them as a Python call with "
            f"literal values, e.g. 'mypkg.models:build(hidden=32, act=\"tanh\")'."
        ) from None
    return head.strip(), args, kwargs


def _import(mod_name: str, spec: str) -> object:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # the current folder first, as `python -m` does
        importlib.invalidate_caches()
    try:
        return importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(
            f"{FN}: cannot import module {mod_name!r} for {spec!r} ({exc}); searched the current "
            f"folder {cwd!r} and PYTHONPATH. Run from the folder that holds the package, or add "
            f"its parent to PYTHONPATH."
        ) from None


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``"package.module:function"`` to a zero-argument factory returning an ``nn.Module``.

    The attribute may be dotted (``pkg.mod:Class.build``) and may carry arguments as a call with
    literal values (``pkg.mod:build(32, depth=3)``), bound to the factory. The module is looked
    up in the current folder first, then on ``sys.path``.

    Args:
        spec: ``"module:attr"`` or ``"module:attr(args)"``.

    Returns:
        A callable without arguments (the factory with its arguments bound).

    Raises:
        ValueError: malformed spec or arguments, module not importable, attribute missing or
            not callable, arguments that do not fit the factory's signature.

    Example:
        >>> net = load_factory("metagrad.models:sinusoid_mlp(hidden=8, depth=1)")()
        >>> net[0].out_features, len(net)
        (8, 3)
    """
    target, args, kwargs = _split_call(spec.strip())
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(
            f"{FN}: model {spec!r} is neither a built-in (mlp, conv4) nor "
            f"'package.module:function' (e.g. mypkg.models:make_net, a function returning an "
            f"nn.Module; arguments as mypkg.models:make_net(hidden=32))."
        )
    obj = _import(mod_name, spec)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{FN}: module {mod_name!r} has no callable {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{FN}: {spec!r} is not callable; point at a function or class.")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        sig = None
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as err:
            raise ValueError(
                f"{FN}: {spec!r}: {err}; {attr} takes {sig}. Fix the arguments in the spec."
            ) from None
    if not args and not kwargs:
        return obj  # type: ignore[return-value]
    return functools.partial(obj, *args, **kwargs)
