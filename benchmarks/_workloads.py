"""Benchmark workloads: models, task batches and losses, built identically for every implementation.

Every implementation of a workload starts from a deep copy of the same model (same parameter
values) and sees the same task tensors. Peers get a copy whose BatchNorm layers are switched to
``track_running_stats=False`` (batch statistics everywhere, nothing written), which is what
metagrad's default ``bn="transductive"`` policy computes; metagrad gets the stock model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagrad.models import conv4, sinusoid_mlp

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class MetaWorkload:
    """One second-order (or first-order) meta-step: ``T`` tasks, ``steps`` inner SGD steps."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    loss_fn: LossFn
    inner_lr: float
    steps: int
    make_tasks: Callable[[torch.Generator], tuple[Tensor, Tensor, Tensor, Tensor]]
    # Seconds of timed rounds to aim for (at least 3 rounds, at most --repeats).
    time_budget_s: float = 60.0
    # Reuse the float64 gate of this workload, whose tasks are a prefix of this one's.
    gate_from: str | None = None
    # Time rows that failed the gate too (shown as invalid); off where one step costs seconds.
    time_wrong: bool = True
    # Untimed calls per implementation before the rounds (the last one sizes the rounds) ...
    warmup: int = 2
    # ... on this many tasks (None: all). One task warms every kernel of a per-task loop.
    warmup_tasks: int | None = None
    # Only the second-order rows (first-order ones are shown on a smaller workload).
    second_order_only: bool = False
    seed: int = 0
    _cache: dict[torch.dtype, tuple[nn.Module, tuple[Tensor, ...]]] = field(
        default_factory=dict, repr=False
    )

    def build(self, dtype: torch.dtype) -> tuple[nn.Module, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """The reference model (train mode) and task tensors, in ``dtype``; same values every call."""
        if dtype not in self._cache:
            torch.manual_seed(self.seed)
            model = self.make_model().to(dtype).train()
            gen = torch.Generator().manual_seed(self.seed + 1)
            tasks = tuple(t.to(dtype) if t.is_floating_point() else t for t in self.make_tasks(gen))
            self._cache[dtype] = (model, tasks)
        model, tasks = self._cache[dtype]
        return model, tasks  # type: ignore[return-value]


@dataclass
class DerivProblem:
    """``f`` (scalar loss of a flat parameter vector), the point ``x`` and a tangent ``v``.

    ``f_manual_mse`` is the same function with the MSE written as ``(pred - y).pow(2).mean()``:
    PyTorch 2.13's ``F.mse_loss`` breaks forward-over-reverse AD ("ZeroTensors are immutable"),
    so torch.func's forward-over-reverse peers are also run on this form.
    """

    f: Callable[[Tensor], Tensor]
    f_manual_mse: Callable[[Tensor], Tensor]
    x: Tensor
    v: Tensor


@dataclass
class DerivWorkload:
    """One sinusoid task's loss (K=10) as a function of the MLP's 1761 flat parameters."""

    name: str
    description: str
    kind: str  # "hvp" or "hessian"
    time_budget_s: float = 30.0
    time_wrong: bool = True
    warmup: int = 2
    seed: int = 0
    _cache: dict[torch.dtype, DerivProblem] = field(default_factory=dict, repr=False)

    def build(self, dtype: torch.dtype) -> DerivProblem:
        if dtype not in self._cache:
            torch.manual_seed(self.seed)
            model = sinusoid_mlp().to(dtype)
            names = [n for n, _ in model.named_parameters()]
            shapes = [p.shape for _, p in model.named_parameters()]
            sizes = [p.numel() for _, p in model.named_parameters()]
            x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
            gen = torch.Generator().manual_seed(self.seed + 1)
            xs, ys, _, _ = sinusoid_tasks(1, 10, 10, gen)
            inp, tgt = xs[0].to(dtype), ys[0].to(dtype)
            v = torch.randn(x0.shape, generator=gen).to(dtype)

            def predict(flat: Tensor) -> Tensor:
                params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
                return torch.func.functional_call(model, params, (inp,))

            def f(flat: Tensor) -> Tensor:
                return F.mse_loss(predict(flat), tgt)

            def f_manual_mse(flat: Tensor) -> Tensor:
                return (predict(flat) - tgt).pow(2).mean()

            self._cache[dtype] = DerivProblem(f, f_manual_mse, x0, v)
        return self._cache[dtype]


def sinusoid_tasks(
    T: int, K: int, Q: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MAML's sinusoid regression: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]."""
    amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(T, 1, 1).uniform_(0.0, math.pi, generator=gen)
    xs = torch.empty(T, K, 1).uniform_(-5.0, 5.0, generator=gen)
    xq = torch.empty(T, Q, 1).uniform_(-5.0, 5.0, generator=gen)
    return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)


def regression_tasks(
    T: int, N: int, D: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random regression tasks, ``N`` support and ``N`` query points in ``D`` dimensions (values
    do not matter for timing or for the gate)."""
    xs, xq = torch.randn(T, N, D, generator=gen), torch.randn(T, N, D, generator=gen)
    return xs, torch.randn(T, N, 1, generator=gen), xq, torch.randn(T, N, 1, generator=gen)


def _mlp_workload(name: str, d: int, width: int, T: int, N: int, description: str) -> MetaWorkload:
    """A tanh MLP ``d-width-width-1`` on ``T`` random regression tasks of ``N`` points, 1 inner
    SGD step (lr 0.01): the shapes where one task's work, not the dispatch, dominates."""

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
            nn.Linear(width, 1),
        )  # fmt: skip

    return MetaWorkload(
        name=name,
        description=description,
        make_model=make,
        loss_fn=F.mse_loss,
        inner_lr=0.01,
        steps=1,
        make_tasks=lambda g: regression_tasks(T, N, d, g),
        time_budget_s=40.0,
        time_wrong=False,
        second_order_only=True,
    )


def image_tasks(
    T: int, n_way: int, k_shot: int, q_per_class: int, size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random N-way K-shot image tasks (values do not matter for timing or for the gate).

    Drawn task by task, so the first ``t`` tasks of a batch of ``T > t`` equal a batch of ``t``.
    """
    pairs = [
        (
            torch.randn(n_way * k_shot, 1, size, size, generator=gen),
            torch.randn(n_way * q_per_class, 1, size, size, generator=gen),
        )
        for _ in range(T)
    ]
    xs = torch.stack([p[0] for p in pairs])
    xq = torch.stack([p[1] for p in pairs])
    ys = torch.arange(n_way).repeat_interleave(k_shot).expand(T, -1).contiguous()
    yq = torch.arange(n_way).repeat_interleave(q_per_class).expand(T, -1).contiguous()
    return xs, ys, xq, yq


def peer_copy(model: nn.Module) -> nn.Module:
    """Deep copy with every BatchNorm using batch statistics only (no running stats kept)."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return out.train()


def _sinusoid_workload(steps: int) -> MetaWorkload:
    """MAML's sinusoid MLP on 25 tasks, K=10 support / 10 query, ``steps`` inner SGD steps."""
    return MetaWorkload(
        name=f"sinusoid-{steps}step",
        description="sinusoid MLP 1-40-40-1 (1761 params), 25 tasks, K=10 support / 10 query, "
        f"{steps} inner SGD step{'s' if steps > 1 else ''} (lr 0.01)",
        make_model=sinusoid_mlp,
        loss_fn=F.mse_loss,
        inner_lr=0.01,
        steps=steps,
        make_tasks=lambda g: sinusoid_tasks(25, 10, 10, g),
        time_budget_s=25.0,
    )


def _conv4_workload(
    tasks: int,
    description: str,
    time_budget_s: float,
    gate_from: str | None = None,
    second_order_only: bool = False,
) -> MetaWorkload:
    """conv-4 + BatchNorm (64 filters, 28x28x1) on ``tasks`` 5-way 1-shot tasks, 15 queries
    per class, 1 inner SGD step (lr 0.4); one-task warm-up, wrong rows untimed."""
    return MetaWorkload(
        name=f"conv4-bn-{tasks}tasks",
        description=description,
        make_model=lambda: conv4(n_way=5, hidden=64, image_size=28),
        loss_fn=F.cross_entropy,
        inner_lr=0.4,
        steps=1,
        make_tasks=lambda g: image_tasks(tasks, 5, 1, 15, 28, g),
        time_budget_s=time_budget_s,
        time_wrong=False,
        warmup=1,
        warmup_tasks=1,
        gate_from=gate_from,
        second_order_only=second_order_only,
    )


def meta_workloads(quick: bool) -> list[MetaWorkload]:
    out = [
        _sinusoid_workload(1),
        _sinusoid_workload(5),
        _conv4_workload(
            8,
            "conv-4 + BatchNorm (64 filters, 28x28x1, 112,261 params), 5-way 1-shot, "
            "15 queries per class, 8 tasks, 1 inner SGD step (lr 0.4)",
            60.0,
        ),
    ]
    if not quick:
        out += [
            _mlp_workload(
                "wide-mlp-2tasks", 64, 512, 2, 4000,
                "tanh MLP 64-512-512-1 (296,449 params), 2 tasks x 4,000 support / 4,000 query "
                "points, 1 inner SGD step (lr 0.01); activations dominate; second-order rows only",
            ),
            _mlp_workload(
                "mlp640-16tasks", 1, 640, 16, 10,
                "tanh MLP 1-640-640-1 (412,161 params), 16 tasks x 10 support / 10 query "
                "points, 1 inner SGD step (lr 0.01); parameters dominate; second-order rows only",
            ),
        ]  # fmt: skip
        out.append(
            _conv4_workload(
                32,
                "conv-4 + BatchNorm (64 filters, 28x28x1), 5-way 1-shot, 15 queries "
                "per class, 32 tasks, 1 inner SGD step (lr 0.4); second-order rows only",
                120.0,
                gate_from="conv4-bn-8tasks",
                second_order_only=True,
            )
        )
    return out


def deriv_workloads(quick: bool) -> list[DerivWorkload]:
    return [
        DerivWorkload(
            name="hvp-mlp",
            description="Hessian-vector product of one sinusoid task's MSE (K=10) w.r.t. the "
            "1761 flat parameters of the MLP",
            kind="hvp",
            time_budget_s=8.0 if quick else 15.0,
        ),
        DerivWorkload(
            name="hessian-mlp",
            description="full 1761x1761 Hessian of the same loss",
            kind="hessian",
            warmup=1,
            time_budget_s=12.0 if quick else 25.0,
        ),
    ]
