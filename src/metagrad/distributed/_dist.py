r"""Data-parallel meta-training on ``torch.distributed``: tasks sharded across ranks.

Every rank holds the same meta-batch of ``T`` tasks (drawn from the same seed) and computes the
meta-gradient of its contiguous shard of :math:`n_r` tasks; one bucketed all-reduce then forms

.. math:: g = \sum_r \frac{n_r}{T}\, g_r = \frac1T \sum_{i=1}^{T} \nabla_\theta \mathcal{L}_i,

exactly the single-process meta-gradient, also when ``T`` does not divide by the world size.
PyTorch's own collectives do the communication (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from metagrad._errors import NonFiniteError
from metagrad._tree import tree_flatten_vector, tree_unflatten_vector
from metagrad.algorithms._maml import MAML


def shard_bounds(num_tasks: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``rank``'s tasks; shard sizes differ by at most one.

    Raises:
        ValueError: more ranks than tasks (a rank would have nothing to do).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"metagrad.distributed.shard_bounds: rank={rank} is not in [0, {world_size})."
        )
    if num_tasks < world_size:
        raise ValueError(
            f"metagrad.distributed: the meta-batch has {num_tasks} tasks but the world size is "
            f"{world_size}; every rank needs at least one task. Raise --meta-batch to >= "
            f"{world_size} or launch fewer processes (torchrun --nproc_per_node)."
        )
    base, extra = divmod(num_tasks, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# Collective timeout of the group joined by init_from_env (None: set by someone else).
_timeout_s: float | None = None


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung, or timed out; the message names which."""


def _all_reduce(t: Tensor, what: str, op: Any = None) -> None:
    """``dist.all_reduce`` whose failure says what happened instead of gloo's raw text."""
    try:
        if op is None:
            dist.all_reduce(t)
        else:
            dist.all_reduce(t, op=op)
    except RuntimeError as err:  # gloo/NCCL raise RuntimeError (DistBackendError) subclasses
        raise DistributedError(_explain_collective_error(what, err)) from err


def _explain_collective_error(what: str, err: BaseException) -> str:
    raw = " ".join(str(err).split()) or type(err).__name__
    rank = dist.get_rank() if dist.is_initialized() else "?"
    low = raw.lower()
    waited = f"{_timeout_s:g} s" if _timeout_s is not None else "the process group's timeout"
    if "timed out" in low or "timeout" in low:
        cause = (
            f"another rank did not take part within {waited} (it hung, was stopped, or is far "
            f"slower). Fix: look at that rank's log; raise --dist-timeout only if the ranks are "
            f"merely slow"
        )
    elif "closed" in low or "reset" in low or "broken pipe" in low or "refused" in low:
        cause = "another rank died (its connection closed). Fix: look at that rank's log"
    else:
        cause = "the collective failed. Fix: look at the other ranks' logs"
    return (
        f"metagrad.distributed: rank {rank} stopped in {what}: {cause}; resume from the last "
        f"checkpoint with --resume. The backend said: {raw[:300]}"
    )


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (one small all-reduce; no group: flag)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    _all_reduce(t, "agreeing on a stop request", op=dist.ReduceOp.MAX)
    return bool(int(t) > 0)


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``...).

    Returns ``(rank, world_size)``; ``(0, 1)`` when not launched by torchrun. ``timeout_s`` bounds
    every collective (``metagrad train --dist-timeout``, 60 s by default there): a rank that dies
    or hangs makes the others fail with a :class:`DistributedError` naming the cause instead of
    waiting forever.
    """
    global _timeout_s
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(
            f"metagrad.distributed.init_from_env: timeout_s={timeout_s!r} must be a number of "
            f"seconds > 0."
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s))
        _timeout_s = float(timeout_s)
    return dist.get_rank(), dist.get_world_size()


def check_same_config(config: dict[str, Any]) -> None:
    """Raise on every rank if the ranks were launched with different settings.

    Each rank hashes its config (JSON, sorted keys); rank 0's hash is broadcast and compared.
    """
    if not is_distributed():
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).digest()[:8]
    mine = torch.tensor(list(digest), dtype=torch.int64)
    ref = mine.clone()
    try:
        dist.broadcast(ref, src=0)
    except RuntimeError as err:
        raise DistributedError(_explain_collective_error("comparing the configs", err)) from err
    same = torch.tensor([int(torch.equal(mine, ref))], dtype=torch.int64)
    _all_reduce(same, "comparing the configs", op=dist.ReduceOp.MIN)
    if int(same) != 1:
        raise RuntimeError(
            f"metagrad.distributed: rank {dist.get_rank()} was started with a configuration that "
            f"differs from another rank's (config hash mismatch). Launch every rank with the same "
            f"flags and config file."
        )


def distributed_meta_loss(
    learner: MAML, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, stop: bool = False
) -> Tensor:
    """The full meta-batch's meta-loss, computed on this rank's shard and all-reduced.

    Call it with the *same* ``[T, ...]`` meta-batch on every rank. ``loss.backward()`` then puts
    the exact single-process meta-gradient (mean over all ``T`` tasks) into ``.grad`` on every
    rank, so identical optimizer steps keep the replicas identical. Without an initialised
    multi-rank group it is ``learner.meta_loss``.

    A NaN/Inf in one rank's shard is agreed on by all ranks (a small all-reduce of a status per
    rank comes first): every rank raises :class:`metagrad.NonFiniteError` naming the task index
    in the whole meta-batch and the inner step, so a skip or a stop is collective and the
    replicas never pair different iterations.

    ``stop=True`` (this rank was asked to stop, e.g. by Ctrl-C) is agreed on in the same small
    all-reduce: every rank then raises ``KeyboardInterrupt`` before any update, so all ranks
    stop after the same iteration. Without a process group it raises at once.
    """
    if not is_distributed():
        if stop:
            raise KeyboardInterrupt
        return learner.meta_loss(xs, ys, xq, yq)
    if getattr(learner, "_stat_modules", ()):
        raise ValueError(
            "metagrad.distributed_meta_loss: per-step running statistics (per_step_bn=True with "
            "bn='running') are not synchronised across ranks yet; use bn='transductive' (default)."
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    T = int(xs.shape[0])
    start, end = shard_bounds(T, rank, world)
    need_grad = torch.is_grad_enabled()
    failure: NonFiniteError | None = None
    res: Any = None
    try:
        res = learner.meta_result(
            xs[start:end], ys[start:end], xq[start:end], yq[start:end], need_grad=need_grad
        )
    except NonFiniteError as err:  # agreed on with the other ranks first
        failure = err
    _agree(learner, failure, stop, rank, world, start)
    w = (end - start) / T
    dtype = res.loss.dtype
    keys = [k for k in sorted(res.grads) if res.grads[k] is not None]  # None: on every rank
    # closed-over tensors that reach the loss (engines that report them)
    foreign = [(t, g) for t, g in getattr(res, "foreign", ()) if g is not None]
    # One bucket: the loss, every gradient, every foreign gradient (keys cannot clash: " " prefix).
    local = {" loss": res.loss.reshape(1), **{k: res.grads[k] for k in keys}}
    local.update({f" foreign{i}": g for i, (_, g) in enumerate(foreign)})
    bucket = tree_flatten_vector({k: (v * w).to(dtype) for k, v in local.items()})
    _all_reduce(bucket, "the meta-gradient all-reduce")
    summed = cast(dict[str, Tensor], tree_unflatten_vector(bucket, local))
    grads: dict[str, Tensor | None] = dict(res.grads)
    for k in keys:
        grads[k] = summed[k].to(local[k].dtype)
    reduced_foreign = [(t, summed[f" foreign{i}"].to(g.dtype)) for i, (t, g) in enumerate(foreign)]
    changes: dict[str, Any] = {"loss": bucket[0].to(res.loss.dtype), "grads": grads}
    if hasattr(res, "foreign"):
        changes["foreign"] = reduced_foreign
    reduced = dataclasses.replace(res, **changes)
    if not need_grad:
        return reduced.loss  # type: ignore[no-any-return]
    return learner.attach(reduced)


def _agree(
    learner: Any, failure: NonFiniteError | None, stop: bool, rank: int, world: int, start: int
) -> None:
    """Raise the same error on every rank if any rank's shard hit NaN/Inf or asked to stop."""
    # [failed per rank | 1 + task index in the whole meta-batch | 1 + inner step | stop]
    status = torch.zeros(3 * world + 1, dtype=torch.int64)
    if failure is not None:
        status[rank] = 1
        status[world + rank] = 0 if failure.task is None else start + failure.task + 1
        status[2 * world + rank] = 0 if failure.step is None else failure.step + 1
    status[3 * world] = int(stop)
    _all_reduce(status, "agreeing on NaN/Inf and stop requests across ranks")
    if int(status[3 * world]) > 0:
        raise KeyboardInterrupt  # a rank was interrupted: all stop before this update
    failed = [r for r in range(world) if int(status[r]) > 0]
    if not failed:
        return
    fn = str(getattr(learner, "fn_name", "metagrad.distributed_meta_loss"))
    if failure is not None:  # this rank's own error, with the task index in the whole batch
        task = None if failure.task is None else start + failure.task
        raise NonFiniteError(fn, failure.where, task, failure.step) from failure
    r = failed[0]
    task_code, step_code = int(status[world + r]), int(status[2 * world + r])
    raise NonFiniteError(
        fn,
        f"shard of rank {r} (every rank skips or stops on this meta-batch)",
        task_code - 1 if task_code else None,
        step_code - 1 if step_code else None,
    )
