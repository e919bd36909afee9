"""The currency of task samplers: a meta-batch of support/query sets, and seed helpers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class TaskBatch(NamedTuple):
    """``T`` tasks: support ``xs [T, K, ...]``, ``ys [T, K, ...]``; query ``xq``, ``yq``.

    Unpacks as ``xs, ys, xq, yq = batch`` and feeds ``learner.meta_loss(*batch)``.
    """

    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch on ``device``."""
        return TaskBatch(*(t.to(device) for t in self))


def derive_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for ``stream`` (train, val, test...) of a run seeded ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def check_positive(fn_name: str, **values: object) -> None:
    """``ValueError`` naming ``fn_name`` and the first argument that is not an int > 0."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{fn_name}: {name}={v!r} must be an int > 0.")


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` owned by a sampler (never the global RNG)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r}).")
    gen = torch.Generator()
    gen.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    return gen
