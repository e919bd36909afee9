"""``higher.utils``: copies of parameters and small helpers over nested containers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "_copy_tensor",
    "_find_param_in_list",
    "_get_param_mapping",
    "_is_container",
    "_recursive_copy_and_cast",
    "_recursive_map",
    "flatten",
    "get_func_params",
]


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | str | None = None) -> Tensor:
    """``t`` cut from the graph (a fresh leaf), cloned when ``safe_copy``, on ``device``.

    The copy requires grad exactly when ``t`` does.
    """
    out = t.detach()
    if device is not None:
        out = out.to(device)
    if safe_copy and out.data_ptr() == t.data_ptr():
        out = out.clone()
    return out.requires_grad_(t.requires_grad)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """``map_fn`` applied to every leaf of nested lists, tuples, dicts and sets."""
    if isinstance(target, tuple) and hasattr(target, "_fields"):  # a NamedTuple
        return type(target)(*(_recursive_map(x, map_fn) for x in target))
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(x, map_fn) for x in target)
    if isinstance(target, dict):
        return type(target)({k: _recursive_map(v, map_fn) for k, v in target.items()})
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """Every tensor of a nested container copied (detached, cloned) to ``device``."""
    return _recursive_map(
        target, lambda x: _copy_tensor(x, True, device) if isinstance(x, Tensor) else x
    )


def _is_container(target: Any) -> bool:
    """Whether ``target`` is a list, tuple, dict or set."""
    return isinstance(target, (list, tuple, dict, set))


def _find_param_in_list(param: Tensor, items: Iterable[Tensor]) -> int | None:
    """The index of ``param`` in ``items``, compared by identity (None when absent)."""
    for i, p in enumerate(items):
        if p is param:
            return i
    return None


def _get_param_mapping(module: nn.Module, seen: list[Tensor], mapping: list[int]) -> list[int]:
    """For every parameter slot of ``module`` (shared ones counted each time, submodules
    depth-first), its index among the distinct parameters; ``seen`` collects those."""
    for param in module._parameters.values():
        if param is None:
            continue
        found = _find_param_in_list(param, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(param)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def flatten(x: Any) -> list[Any]:
    """The leaves of a nested structure of dicts (values), lists, tuples and sets, in order.

    Example:
        >>> flatten({"a": [1, (2, 3)], "b": 4})
        [1, 2, 3, 4]
    """
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in flatten(v)]
    if isinstance(x, (list, tuple, set)):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached copies of ``module.parameters()`` that require grad as the originals do.

    Args:
        module: The module whose parameters are copied.
        device: Device of the copies (default: the parameters').
        safe_copy: Clone the storage (False shares it with the module's parameters).

    Returns:
        One fresh leaf per distinct parameter, in ``module.parameters()`` order.
    """
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]
