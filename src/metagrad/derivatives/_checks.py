"""Input validation for the derivative toolkit: errors name the function, the value and the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from metagrad._typing import TensorTree


def describe(value: object) -> str:
    """Short description of a received value for error messages (type, dtype and shape)."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__} ({value!r:.60})"


def check_tree(fn_name: str, x: object, name: str = "x") -> None:
    """Raise unless ``x`` is a floating tensor or a non-empty flat dict of floating tensors."""
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise TypeError(
                f"{fn_name}: {name} must be a floating-point tensor, got {describe(x)}; "
                f"cast it with {name}.double() (or .float())."
            )
        return
    if not isinstance(x, Mapping):
        raise TypeError(
            f"{fn_name}: {name} must be a tensor or a dict name -> tensor, got {describe(x)}; "
            f"wrap numbers with torch.tensor(..., dtype=torch.float64) and pass modules' "
            f"parameters as dict(module.named_parameters())."
        )
    if not x:
        raise ValueError(
            f"{fn_name}: {name} is an empty dict; pass at least one tensor to differentiate."
        )
    for key, leaf in x.items():
        if not isinstance(key, str):
            raise TypeError(
                f"{fn_name}: {name} has a non-string key {key!r}; use parameter names as keys."
            )
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            raise TypeError(
                f"{fn_name}: {name}[{key!r}] must be a floating-point tensor, got "
                f"{describe(leaf)}; cast it with .double() (or .float())."
            )


def split_aux(fn_name: str, result: object, has_aux: bool) -> tuple[object, Any]:
    """Split ``f``'s return value into ``(output, aux)`` according to ``has_aux``."""
    if not has_aux:
        return result, None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(
            f"{fn_name}: with has_aux=True, f must return a pair (output, aux), got "
            f"{describe(result)}; return `loss, aux` or pass has_aux=False."
        )
    return result[0], result[1]


def check_scalar_output(fn_name: str, out: object) -> Tensor:
    """Return ``out`` as a 0-dim tensor, raising unless it is a one-element floating tensor."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{fn_name}: f must return a scalar tensor, got {describe(out)}; return a "
            f"torch.Tensor (not a Python float or .item())."
        )
    if out.numel() != 1:
        raise ValueError(
            f"{fn_name}: f must return a scalar (one-element) tensor, got {describe(out)}; "
            f"reduce it first, e.g. with .sum() or .mean()."
        )
    if not out.is_floating_point():
        raise TypeError(
            f"{fn_name}: f must return a floating-point scalar, got {describe(out)}; "
            f"integer outputs have no derivative."
        )
    return out.reshape(())


def check_order(fn_name: str, n: object) -> int:
    """Return ``n`` if it is a non-negative int (bools rejected), else raise."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(
            f"{fn_name}: n must be a non-negative int, got {describe(n)}; pass e.g. n=2."
        )
    if n < 0:
        raise ValueError(
            f"{fn_name}: n must be >= 0, got n={n}; n=0 returns f(x), n=1 the first derivative."
        )
    return n


def check_choice(fn_name: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{fn_name}: {name} must be one of {list(choices)}, got {value!r}; "
            f"pass {name}={choices[0]!r} (the default)."
        )
    return value


def leaf_names(x: TensorTree) -> list[str]:
    """Names used in messages for the leaves of ``x``: ``['x']`` or the dict keys."""
    return ["x"] if isinstance(x, Tensor) else list(x)
