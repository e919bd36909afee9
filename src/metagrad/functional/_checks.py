"""Validation of meta-batches: catch shape/dtype/device mistakes before any compute."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor


def _as_task_tensor(fn_name: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{fn_name}: {name} must be a torch.Tensor with a leading task dimension, got "
            f"{type(t).__name__}; stack per-task tensors with torch.stack(list_of_tasks)."
        )
    if t.dim() < 2:
        raise ValueError(
            f"{fn_name}: {name} has shape {tuple(t.shape)}; expected [tasks, examples, ...]. "
            f"For a single task add the task dimension with {name}.unsqueeze(0)."
        )
    return t


def check_tasks(
    fn_name: str,
    xs: object,
    ys: object,
    xq: object,
    yq: object,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check ``xs [T,K,...], ys [T,K,...], xq [T,Q,...], yq [T,Q,...]`` and return them."""
    ts = {
        n: _as_task_tensor(fn_name, n, t)
        for n, t in {"xs": xs, "ys": ys, "xq": xq, "yq": yq}.items()
    }
    counts = {n: t.shape[0] for n, t in ts.items()}
    if counts["xs"] == 0:
        raise ValueError(
            f"{fn_name}: the meta-batch has 0 tasks (xs.shape={tuple(ts['xs'].shape)}); give at "
            f"least one task along the first dimension."
        )
    for n in ("xs", "xq"):
        t = ts[n]
        if t.dim() == 2 and t.is_floating_point():
            # [K, F] for one task reads as K tasks of one scalar example: say so before it runs.
            raise ValueError(
                f"{fn_name}: {n} has shape {tuple(t.shape)}, read as [tasks, examples] of scalar "
                f"examples. For one task of {t.shape[0]} examples with {t.shape[1]} feature(s) "
                f"add the task dimension: {n}.unsqueeze(0); for scalar inputs give "
                f"[tasks, examples, 1]."
            )
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"{fn_name}: the leading (task) dimensions differ: {counts}; every tensor needs the "
            f"same number of tasks."
        )
    for x, y, xn, yn, which in (
        ("xs", "ys", "xs", "ys", "support"),
        ("xq", "yq", "xq", "yq", "query"),
    ):
        if ts[x].shape[1] == 0:
            raise ValueError(
                f"{fn_name}: the {which} set is empty ({xn}.shape={tuple(ts[x].shape)}); give at "
                f"least one example per task."
            )
        if ts[x].shape[1] != ts[y].shape[1]:
            raise ValueError(
                f"{fn_name}: {xn} has {ts[x].shape[1]} examples per task but {yn} has "
                f"{ts[y].shape[1]} (shapes {tuple(ts[x].shape)} and {tuple(ts[y].shape)}); inputs "
                f"and targets must pair up."
            )
    if ts["xs"].shape[2:] != ts["xq"].shape[2:]:
        raise ValueError(
            f"{fn_name}: support inputs have per-example shape {tuple(ts['xs'].shape[2:])} but "
            f"query inputs {tuple(ts['xq'].shape[2:])}; both must match the model's input."
        )
    for name, t in ts.items():
        _check_dtype_device(fn_name, name, t, dtype, device)
    for name in ("ys", "yq"):
        _check_not_all_ignored(fn_name, name, ts[name])
    return ts["xs"], ts["ys"], ts["xq"], ts["yq"]


IGNORE_INDEX = -100
"""``F.cross_entropy``'s default ``ignore_index``."""


def _check_not_all_ignored(fn_name: str, name: str, y: Tensor) -> None:
    """A task whose every label is ``ignore_index`` has a 0/0 = NaN mean cross-entropy."""
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() < 2:
        return
    ignored = (y == IGNORE_INDEX).flatten(1).all(dim=1)
    if bool(ignored.any()):
        bad = ignored.nonzero().flatten().tolist()
        raise ValueError(
            f"{fn_name}: every label of {name} is {IGNORE_INDEX} (cross_entropy's ignore_index) "
            f"in task(s) {bad[:8]}, so their mean loss is 0/0 = NaN. Give each task at least one "
            f"real label, or drop those tasks."
        )


def _check_dtype_device(
    fn_name: str, name: str, t: Tensor, dtype: torch.dtype, device: torch.device
) -> None:
    if t.device != device:
        raise ValueError(
            f"{fn_name}: {name} is on {t.device} but the model is on {device}; move the batch "
            f"with {name}.to({str(device)!r})."
        )
    if t.is_floating_point() and t.dtype != dtype:
        raise TypeError(
            f"{fn_name}: {name} has dtype {t.dtype} but the model's parameters are {dtype}; "
            f"cast with {name}.to({dtype})."
        )


def check_task(
    fn_name: str, x: object, y: object, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Check one task's ``x [K,...], y [K,...]`` (for ``adapt``); messages name ``x`` and ``y``."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() == 0:
            got = "a 0-d tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(
                f"{fn_name}: {name} must be one task's torch.Tensor [examples, ...], got {got}."
            )
    x, y = cast(Tensor, x), cast(Tensor, y)
    if x.shape[0] == 0:
        raise ValueError(
            f"{fn_name}: the support set is empty (x.shape={tuple(x.shape)}); give at least one "
            f"example."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{fn_name}: x has {x.shape[0]} examples but y has {y.shape[0]} (shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}); inputs and targets must pair up."
        )
    for name, t in (("x", x), ("y", y)):
        _check_dtype_device(fn_name, name, t, dtype, device)
    return x, y
