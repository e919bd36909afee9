"""Distributed meta-training on ``torch.distributed`` (``torchrun``)."""

from __future__ import annotations

from metagrad.distributed._dist import (
    DistributedError,
    any_rank,
    check_same_config,
    distributed_meta_loss,
    init_from_env,
    is_distributed,
    shard_bounds,
)

__all__ = [
    "DistributedError",
    "any_rank",
    "check_same_config",
    "distributed_meta_loss",
    "init_from_env",
    "is_distributed",
    "shard_bounds",
]
