"""Meta-gradient clipping only when asked, overflow-safe norms, and NaN blamed on the real cause."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from metagrad import NonFiniteError
from metagrad.training import TrainConfig, Trainer

# Float32 overflows above 3.4e38: 5e17 per entry is finite (and so is its square, Adam's second
# moment), but the squared norm over the sinusoid MLP's 1761 entries is 4.4e38.
HUGE = 5e17


class _Fixed(torch.autograd.Function):
    """Value 0.5; gradient ``scale`` in every entry of every input."""

    @staticmethod
    def forward(ctx: Any, scale: float, *params: torch.Tensor) -> torch.Tensor:
        ctx.scale, ctx.shapes = scale, [p.shape for p in params]
        return torch.tensor(0.5)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        return (None, *(torch.full(s, ctx.scale) for s in ctx.shapes))


def _fake_meta_loss(t: Trainer, scale: float) -> None:
    """The learner's meta-loss replaced by one whose meta-gradient is ``scale`` everywhere."""

    def meta_loss(*batch: Any) -> torch.Tensor:
        out: torch.Tensor = _Fixed.apply(scale, *t.learner.parameters())
        return out

    t.learner.meta_loss = meta_loss  # type: ignore[method-assign]


def _n_params(t: Trainer) -> int:
    return sum(p.numel() for p in t.learner.parameters())


def test_finite_gradient_whose_norm_overflows_is_not_turned_into_nan(
    tiny_sinusoid: TrainConfig,
) -> None:
    t = Trainer(tiny_sinusoid.replace(iterations=2), progress=False)
    _fake_meta_loss(t, HUGE)
    before = {k: v.clone() for k, v in t.learner.state_dict().items()}
    _, norm = t.step()
    assert math.isfinite(norm) and norm == pytest.approx(HUGE * math.sqrt(_n_params(t)), rel=1e-5)
    grads = [p.grad for p in t.learner.parameters() if p.grad is not None]
    assert math.isinf(float(torch.nn.utils.get_total_norm(grads)))  # it does overflow float32
    for k, v in t.learner.state_dict().items():
        assert bool(v.isfinite().all()), k
        if v.is_floating_point() and k.startswith("module."):
            assert not torch.equal(v, before[k]), k  # and the update happened
    assert t.skipped == 0


def test_clip_grad_with_an_overflowing_norm_scales_to_the_limit(
    tiny_sinusoid: TrainConfig,
) -> None:
    t = Trainer(tiny_sinusoid.replace(iterations=2, clip_grad=1.0), progress=False)
    _fake_meta_loss(t, HUGE)
    t.step()
    grads = [p.grad for p in t.learner.parameters() if p.grad is not None]
    assert all(bool(g.isfinite().all()) for g in grads)
    clipped = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert clipped == pytest.approx(1.0, rel=1e-4)
    assert all(bool(v.isfinite().all()) for v in t.learner.state_dict().values())


def test_no_clipping_without_clip_grad(
    tiny_sinusoid: TrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    Trainer(tiny_sinusoid.replace(iterations=2), progress=False).train()
    assert calls == []
    Trainer(tiny_sinusoid.replace(iterations=2, clip_grad=0.5), progress=False).train()
    assert len(calls) == 2


def test_non_finite_meta_gradient_names_the_parameter_not_task_0(
    tiny_sinusoid: TrainConfig,
) -> None:
    t = Trainer(tiny_sinusoid.replace(iterations=2), progress=False)
    _fake_meta_loss(t, math.inf)
    with pytest.raises(NonFiniteError) as exc:
        t.step()
    msg = str(exc.value)
    assert "meta-gradient of 'module.0.weight'" in msg and "meta-loss" in msg
    assert "task 0" not in msg and "inner step" not in msg
    t = Trainer(tiny_sinusoid.replace(iterations=2, nan_policy="skip"), progress=False)
    before = {k: v.clone() for k, v in t.learner.state_dict().items()}
    _fake_meta_loss(t, math.inf)
    assert t.train() == 2 and t.skipped == 2
    assert all(torch.equal(v, before[k]) for k, v in t.learner.state_dict().items())


def test_huge_meta_lr_is_blamed_on_meta_lr_not_inner_lr(tiny_sinusoid: TrainConfig) -> None:
    t = Trainer(tiny_sinusoid.replace(meta_lr=1e9, iterations=30), progress=False)
    with pytest.raises(NonFiniteError) as exc:
        t.train()
    msg = str(exc.value)
    assert "inner_lr is not the cause" in msg and "meta_lr=1e+09" in msg and "--meta-lr" in msg
    assert "lower inner_lr" not in msg
    # under --nan-policy skip it stops after 10 batches skipped in a row, naming the cause
    t = Trainer(
        tiny_sinusoid.replace(meta_lr=1e9, iterations=30, nan_policy="skip"), progress=False
    )
    with pytest.raises(NonFiniteError, match=r"10 meta-batches in a row.*--meta-lr"):
        t.train()
    assert t.skipped == 9


def test_nan_in_the_data_is_blamed_on_the_data(tiny_sinusoid: TrainConfig) -> None:
    t = Trainer(tiny_sinusoid.replace(iterations=3), progress=False)
    sampler = t.samplers["train"]
    orig = sampler.sample

    def sample(n: int) -> Any:
        b = orig(n)
        ys = b.ys.clone()
        ys[2, 1] = math.nan
        return b._replace(ys=ys)

    sampler.sample = sample  # type: ignore[method-assign]
    with pytest.raises(NonFiniteError, match=r"task 2 .* NaN/Inf in its data \(ys\)"):
        t.step()


def test_entries_whose_square_overflows_would_freeze_adam(tiny_sinusoid: TrainConfig) -> None:
    t = Trainer(tiny_sinusoid.replace(iterations=2), progress=False)
    _fake_meta_loss(t, 1e37)  # finite; 1e74 is not: Adam's v would be Inf, the step 0 forever
    with pytest.raises(NonFiniteError, match=r"square overflows float32.*--clip-grad"):
        t.step()
    t = Trainer(tiny_sinusoid.replace(iterations=2, clip_grad=10.0), progress=False)
    _fake_meta_loss(t, 1e37)
    t.step()  # clipped first: fine
    assert all(bool(v.isfinite().all()) for v in t.learner.state_dict().values())
