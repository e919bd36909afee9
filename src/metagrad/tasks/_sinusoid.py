r"""Sinusoid regression, exactly as in the MAML paper (section 5.1).

Each task is :math:`y = A \sin(x - \varphi)` with amplitude :math:`A \sim U[0.1, 5]`, phase
:math:`\varphi \sim U[0, \pi]`, inputs :math:`x \sim U[-5, 5]`; ``K`` support and ``Q`` query
points per task; the loss is the mean squared error.

Reference: Finn, Abbeel, Levine, *Model-Agnostic Meta-Learning*, ICML 2017.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metagrad.tasks._batch import TaskBatch, check_positive, make_generator


class SinusoidTasks:
    r"""Sampler of sinusoid regression tasks, deterministic given ``seed``.

    Args:
        shots: support points per task ``K`` (MAML paper: 10 for training, 5 or 10 for testing).
        queries: query points per task (default ``shots``, as the MAML reference code).
        seed: seed of the sampler's own ``torch.Generator`` (the global RNG is never used).
        amplitude: range of :math:`A`.
        phase: range of :math:`\varphi`.
        x_range: range of the inputs.
        dtype: floating dtype of the returned tensors.

    Example:
        >>> tasks = SinusoidTasks(shots=5, seed=0)
        >>> xs, ys, xq, yq = tasks.sample(4)
        >>> tuple(xs.shape), tuple(yq.shape)
        ((4, 5, 1), (4, 5, 1))
    """

    def __init__(
        self,
        shots: int = 10,
        queries: int | None = None,
        *,
        seed: int = 0,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        queries = shots if queries is None else queries
        check_positive("metagrad.tasks.SinusoidTasks", shots=shots, queries=queries)
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(
                    f"metagrad.tasks.SinusoidTasks: {name}=({lo}, {hi}) must be finite with low <= high."
                )
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.dtype = dtype
        self.generator = make_generator(seed)

    def _uniform(self, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
        return torch.empty(shape, dtype=torch.float64).uniform_(lo, hi, generator=self.generator)

    def sample_functions(self, tasks: int) -> tuple[Tensor, Tensor]:
        """Amplitudes and phases of ``tasks`` new tasks, each ``[tasks]`` (float64)."""
        check_positive("metagrad.tasks.SinusoidTasks.sample", tasks=tasks)
        return self._uniform((tasks,), *self.amplitude), self._uniform((tasks,), *self.phase)

    def batch_for(self, amplitude: Tensor, phase: Tensor) -> TaskBatch:
        """Support and query points drawn for the given task functions."""
        T = amplitude.shape[0]
        xs = self._uniform((T, self.shots, 1), *self.x_range)
        xq = self._uniform((T, self.queries, 1), *self.x_range)
        a, p = amplitude.view(T, 1, 1), phase.view(T, 1, 1)
        out = (xs, a * torch.sin(xs - p), xq, a * torch.sin(xq - p))
        return TaskBatch(*(t.to(self.dtype) for t in out))

    def sample(self, tasks: int) -> TaskBatch:
        """``tasks`` new tasks: ``xs, ys [T, K, 1]``, ``xq, yq [T, Q, 1]``."""
        return self.batch_for(*self.sample_functions(tasks))

    @staticmethod
    def function(amplitude: float, phase: float, x: Tensor) -> Tensor:
        """The ground truth :math:`A \\sin(x - \\varphi)` of one task."""
        return amplitude * torch.sin(x - phase)

    def state_dict(self) -> dict[str, Tensor]:
        """The generator state (a uint8 tensor: safe for ``torch.load(weights_only=True)``)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
