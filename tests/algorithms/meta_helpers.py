"""Small float64 models, task batches and comparison oracles shared by the meta-gradient tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

F64 = torch.float64


# -- models ---------------------------------------------------------------------------------
def mlp() -> nn.Module:
    """1-16-16-1 tanh MLP (a stock Sequential: ``strategy="auto"`` picks vmap)."""
    return nn.Sequential(
        nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    ).to(F64)


def _conv(norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        norm(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).to(F64)


def conv_bn() -> nn.Module:
    """Two 3x3 conv blocks (1->4->4) with BatchNorm, ReLU, maxpool; linear 3-way head ("9")."""
    return _conv(nn.BatchNorm2d)


def conv_gn() -> nn.Module:
    return _conv(lambda c: nn.GroupNorm(2, c))


def mlp_ln() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 1),
    ).to(F64)


class GRUNet(nn.Module):
    """GRU(2 -> 6) over a length-4 sequence; linear head on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def gru() -> nn.Module:
    return GRUNet().to(F64)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "conv_bn": conv_bn,
    "conv_gn": conv_gn,
    "mlp_ln": mlp_ln,
    "gru": gru,
}
LOSSES = {
    "mlp": F.mse_loss,
    "conv_bn": F.cross_entropy,
    "conv_gn": F.cross_entropy,
    "mlp_ln": F.mse_loss,
    "gru": F.mse_loss,
}


def tasks(kind: str, T: int = 2, K: int = 5, Q: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A meta-batch ``xs [T,K,...], ys, xq [T,Q,...], yq`` for the model ``kind``."""
    if kind in ("mlp", "mlp_ln"):
        amp = torch.rand(T, 1, 1, dtype=F64) + 0.5
        phase = torch.rand(T, 1, 1, dtype=F64) * 3
        xs = torch.rand(T, K, 1, dtype=F64) * 4 - 2
        xq = torch.rand(T, Q, 1, dtype=F64) * 4 - 2
        return xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase)
    if kind in ("conv_bn", "conv_gn"):
        return (
            torch.randn(T, K, 1, 8, 8, dtype=F64),
            torch.randint(0, 3, (T, K)),
            torch.randn(T, Q, 1, 8, 8, dtype=F64),
            torch.randint(0, 3, (T, Q)),
        )
    if kind == "gru":
        return (
            torch.randn(T, K, 4, 2, dtype=F64),
            torch.randn(T, K, 1, dtype=F64),
            torch.randn(T, Q, 4, 2, dtype=F64),
            torch.randn(T, Q, 1, dtype=F64),
        )
    raise AssertionError(kind)


# -- comparisons ----------------------------------------------------------------------------
def sequence_tasks(T: int, K: int, S: int, D: int, seed: int) -> tuple[Tensor, ...]:
    """A seeded float64 meta-batch of sequences: ``xs, xq [T, K, S, D]``, ``ys, yq [T, K, 1]``."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, K, S, D, generator=g, dtype=F64),
        torch.randn(T, K, 1, generator=g, dtype=F64),
        torch.randn(T, K, S, D, generator=g, dtype=F64),
        torch.randn(T, K, 1, generator=g, dtype=F64),
    )


def flat(d: dict[str, Tensor | None], keys: list[str], like: dict[str, Tensor]) -> Tensor:
    """Concatenate ``d[k]`` (None as zeros shaped like ``like[k]``) into one vector."""
    return torch.cat(
        [
            (torch.zeros_like(like[k]) if d.get(k) is None else d[k]).reshape(-1)  # type: ignore[union-attr]
            for k in keys
        ]
    )


def rel_err(got: dict[str, Tensor | None], want: dict[str, Tensor | None]) -> float:
    """``||got - want|| / ||want||`` over every key (both dicts must have the same keys)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    keys = sorted(want)
    like = {k: (want[k] if want[k] is not None else got[k]) for k in keys}
    for k in keys:
        if like[k] is None:  # None on both sides: nothing to compare
            like[k] = torch.zeros(0, dtype=F64)
    a, b = flat(got, keys, like), flat(want, keys, like)  # type: ignore[arg-type]
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextmanager
def perturbed(params: list[Tensor], direction: list[Tensor], h: float) -> Iterator[None]:
    """Temporarily move ``params`` by ``h * direction`` in place."""
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(h * v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(h * v)


def fd_directional(
    value: Callable[[], Tensor], params: list[Tensor], direction: list[Tensor], h: float = 1e-5
) -> float:
    """Central difference of ``value()`` along ``direction`` (no graph is built)."""
    with perturbed(params, direction, h), torch.no_grad():
        up = float(value())
    with perturbed(params, direction, -h), torch.no_grad():
        down = float(value())
    return (up - down) / (2 * h)


def fd_rel_errors(
    learner: nn.Module,
    grads: dict[str, Tensor | None],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    n_dirs: int = 2,
    only: Callable[[str], bool] = lambda name: True,
    h: float = 1e-5,
) -> list[float]:
    """Relative errors of ``<grads, v>`` against central differences of ``learner.meta_loss``.

    Random unit directions ``v`` over the learner's meta-parameters selected by ``only``.
    """
    named = {k: p for k, p in learner.named_parameters() if p.requires_grad and only(k)}
    errs = []
    for _ in range(n_dirs):
        vs = [torch.randn_like(p) for p in named.values()]
        scale = torch.cat([v.reshape(-1) for v in vs]).norm()
        vs = [v / scale for v in vs]
        analytic = sum(
            float((grads[k] * v).sum()) for k, v in zip(named, vs) if grads.get(k) is not None
        )
        numeric = fd_directional(lambda: learner.meta_loss(*batch), list(named.values()), vs, h)
        errs.append(abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-12))
    return errs


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything a meta-step must leave alone on the user's module."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    sb, sa = before["state"], after["state"]
    assert isinstance(sb, dict) and isinstance(sa, dict)
    assert sb.keys() == sa.keys()
    for k in sb:
        assert torch.equal(sb[k], sa[k]), k
    for gb, ga in zip(before["grads"], after["grads"]):  # type: ignore[call-overload]
        assert (gb is None and ga is None) or torch.equal(gb, ga)
