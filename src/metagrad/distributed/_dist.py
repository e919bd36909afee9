r"""Data-parallel meta-training on ``torch.distributed``: tasks sharded across ranks.

Every rank holds the same meta-batch of ``T`` tasks (drawn from the same seed) and computes the
meta-gradient of its contiguous shard of :math:`n_r` tasks; one bucketed all-reduce then forms

.. math:: g = \sum_r \frac{n_r}{T}\, g_r = \frac1T \sum_{i=1}^{T} \nabla_\theta \mathcal{L}_i,

exactly the single-process meta-gradient, also when ``T`` does not divide by the world size.
PyTorch's own collectives do the communication (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from metagrad.algorithms._maml import MAML
from metagrad.functional._meta import MetaResult


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


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``...).

    Returns ``(rank, world_size)``; ``(0, 1)`` when not launched by torchrun. The timeout makes
    the other ranks fail with an error instead of hanging when one rank dies.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s))
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
    dist.broadcast(ref, src=0)
    same = torch.tensor([int(torch.equal(mine, ref))], dtype=torch.int64)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if int(same) != 1:
        raise RuntimeError(
            f"metagrad.distributed: rank {dist.get_rank()} was started with a configuration that "
            f"differs from another rank's (config hash mismatch). Launch every rank with the same "
            f"flags and config file."
        )


def distributed_meta_loss(learner: MAML, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    """The full meta-batch's meta-loss, computed on this rank's shard and all-reduced.

    Call it with the *same* ``[T, ...]`` meta-batch on every rank. ``loss.backward()`` then puts
    the exact single-process meta-gradient (mean over all ``T`` tasks) into ``.grad`` on every
    rank, so identical optimizer steps keep the replicas identical. Without an initialised
    multi-rank group it is ``learner.meta_loss``.
    """
    if not is_distributed():
        return learner.meta_loss(xs, ys, xq, yq)
    if getattr(learner, "_stat_modules", ()):
        raise ValueError(
            "metagrad.distributed_meta_loss: per-step running statistics (per_step_bn=True with "
            "bn='running') are not synchronised across ranks yet; use bn='transductive' (default)."
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    T = int(xs.shape[0])
    start, stop = shard_bounds(T, rank, world)
    need_grad = torch.is_grad_enabled()
    res = learner.meta_result(
        xs[start:stop], ys[start:stop], xq[start:stop], yq[start:stop], need_grad=need_grad
    )
    w = (stop - start) / T
    keys = sorted(res.grads)
    dtype = res.loss.dtype
    parts = [(res.loss * w).reshape(1).to(dtype)]
    like = {
        **{f"theta:{k}": v for k, v in learner.fmodel.params().items()},
        **{f"extra:{k}": v for k, v in learner.extra_params().items()},
    }
    for k in keys:
        g = res.grads[k]
        parts.append((torch.zeros_like(like[k]) if g is None else g * w).reshape(-1).to(dtype))
    bucket = torch.cat(parts)
    dist.all_reduce(bucket)  # one bucket: the loss and every gradient
    loss = bucket[0]
    grads: dict[str, Tensor | None] = {}
    offset = 1
    for k in keys:
        n = like[k].numel()
        grads[k] = bucket[offset : offset + n].view_as(like[k]).to(like[k].dtype)
        offset += n
    reduced = MetaResult(loss.to(res.loss.dtype), grads, res.per_task)
    if not need_grad:
        return reduced.loss
    return learner.attach(reduced)
