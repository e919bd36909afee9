"""learn2learn's MAML at second order on attention layers (the fused SDPA kernels have no
double backward): the clone's forward runs on the math kernel, and the meta-gradient is
metagrad's own."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
import metagrad.compat.learn2learn as l2l


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(3, 5, 8, generator=g) for _ in range(4))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_l2l_maml_matches_mg_maml(mode: str, steps: int) -> None:
    xs, ys, xq, yq = _data()
    model = _encoder().train(mode == "train")
    maml = l2l.algorithms.MAML(model, lr=0.3, first_order=False)
    learner = maml.clone()
    for _ in range(steps):
        learner.adapt(F.mse_loss(learner(xs), ys))  # raw: "derivative ... not implemented"
    F.mse_loss(learner(xq), yq).backward()
    ours = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(ours) == len(list(model.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in ours)

    model.zero_grad()
    ref = mg.MAML(model, F.mse_loss, inner_lr=0.3, inner_steps=steps).train(mode == "train")
    ref.meta_loss(xs[None], ys[None], xq[None], yq[None]).backward()
    for g, p in zip(ours, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def _record_flash(model: nn.Module, seen: list[bool]) -> None:
    def hook(*_: Any) -> None:
        seen.append(torch.backends.cuda.flash_sdp_enabled())

    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.register_forward_pre_hook(hook)


@pytest.mark.parametrize("first_order", [True, False])
def test_math_kernel_only_for_second_order_clones(first_order: bool) -> None:
    """First order: the inner gradient is not differentiated, so the fast kernels stay."""
    xs, ys, xq, yq = _data()
    model = _encoder()
    seen: list[bool] = []
    _record_flash(model, seen)
    learner = l2l.algorithms.MAML(model, lr=0.3, first_order=first_order).clone()
    learner.adapt(F.mse_loss(learner(xs), ys))
    F.mse_loss(learner(xq), yq).backward()
    assert seen and all(flash == first_order for flash in seen)
    assert all(
        p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters()
    )


def test_flags_are_restored_after_a_second_order_forward() -> None:
    xs = _data()[0]
    learner = l2l.algorithms.MAML(_encoder(), lr=0.3).clone()
    before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()
    learner(xs)
    assert (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
    ) == before
