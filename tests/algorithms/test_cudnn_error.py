"""A cuDNN-style RNN without double backward gets an explanation and the fix (simulated on CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reference import RefConfig, reference_meta_grad
from torch import nn

import metagrad as mg


class _NoDoubleBackward(torch.autograd.Function):
    """Identity whose backward refuses to be differentiated, with cuDNN's own message."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # create_graph=True: the double backward MAML needs
            raise RuntimeError(
                "double backwards is not supported for CuDNN RNNs due to limitations in the CuDNN API"
            )
        return g


class FakeCudnnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn_like = nn.Linear(3, 3)  # stands for the cuDNN RNN's weights
        self.fc = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_NoDoubleBackward.apply(torch.tanh(self.rnn_like(x))))


def _tasks() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, d, generator=g) for d in (3, 1, 3, 1))


@pytest.mark.parametrize("strategy", ["loop", "hvp_chain"])
def test_cudnn_double_backward_error_is_explained(strategy: str) -> None:
    learner = mg.MAML(FakeCudnnNet(), F.mse_loss, 0.1, 1, strategy=strategy)
    with pytest.raises(RuntimeError, match=r"cudnn\.flags\(enabled=False\)") as exc:
        learner.meta_loss(*_tasks())
    assert "order=1" in str(exc.value) and "metagrad.MAML" in str(exc.value)


def test_first_order_needs_no_double_backward() -> None:
    learner = mg.MAML(FakeCudnnNet().double(), F.mse_loss, 0.1, 1, order=1, strategy="loop")
    tasks = tuple(t.double() for t in _tasks())
    loss = learner.meta_loss(*tasks)
    loss.backward()
    want_loss, want = reference_meta_grad(
        learner, F.mse_loss, RefConfig(inner_lr=0.1, steps=1, order=1), *tasks
    )
    assert torch.allclose(loss.detach(), want_loss, rtol=1e-10, atol=1e-12)
    for name, p in learner.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, want[name], rtol=1e-10, atol=1e-12), name
