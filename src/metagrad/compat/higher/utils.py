"""``higher.utils``: parameter copies and container helpers."""

from __future__ import annotations

from metagrad.compat.higher._utils import (
    _copy_tensor,
    _find_param_in_list,
    _get_param_mapping,
    _is_container,
    _recursive_copy_and_cast,
    _recursive_map,
    flatten,
    get_func_params,
)

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
