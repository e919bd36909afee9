"""Ops without a double backward get an explanation naming the op, the module, who needs it and the fix.

Three kinds: a fused attention kernel pinned inside a model, a custom ``autograd.Function``
whose backward is ``@once_differentiable``, and cuDNN's fused RNN (simulated on CPU with its
own message, as ``test_cudnn_error.py`` does), plus an op with no derivative at all.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

import metagrad as mg
from metagrad._errors import translate_autograd_error
from metagrad.functional._locate import NodeRecord


class PinnedFlash(nn.Module):
    """Self-attention that pins the flash kernel inside its forward (no double backward)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = (t.reshape(B, S, 2, D // 2).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            a = F.scaled_dot_product_attention(q, k, v)
        return a.transpose(1, 2).reshape(B, S, D)


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = PinnedFlash()
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.block(x)).mean(1))


class Cube(torch.autograd.Function):
    """x^3 with a hand-written backward marked once_differentiable (a typical custom kernel)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class CubeAct(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return Cube.apply(x)


def cube_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), CubeAct(), nn.Linear(6, 1))


def _seq_tasks() -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, *s, generator=g) for s in ((4, 8), (1,), (4, 8), (1,)))


def _vec_tasks() -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, d, generator=g) for d in (3, 1, 3, 1))


@pytest.mark.parametrize("strategy", ["auto", "loop", "hvp_chain", "checkpoint"])
def test_pinned_attention_kernel_is_explained(strategy: str) -> None:
    learner = mg.MAML(AttnNet(), F.mse_loss, 0.1, 1, strategy=strategy)
    with pytest.raises(RuntimeError) as exc:
        learner.meta_loss(*_seq_tasks())
    msg = str(exc.value)
    assert msg.startswith("metagrad.MAML: the fused attention kernel")
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in msg
    assert "module 'block' (PinnedFlash)" in msg  # the layer, found by a diagnostic re-run
    assert "order=2" in msg and "strategy=" in msg
    assert "order=1" in msg and "SDPBackend.MATH" in msg  # the fixes
    assert "derivative for aten::" in msg  # PyTorch's own words at the end


def test_pinned_attention_kernel_works_at_first_order() -> None:
    learner = mg.MAML(AttnNet(), F.mse_loss, 0.1, 1, order=1, strategy="loop")
    learner.meta_loss(*_seq_tasks()).backward()
    assert learner.module.block.qkv.weight.grad is not None


@pytest.mark.parametrize("strategy", ["loop", "hvp_chain"])
def test_once_differentiable_function_is_explained(strategy: str) -> None:
    learner = mg.MAML(cube_net(), F.mse_loss, 0.1, 1, strategy=strategy)
    with pytest.raises(RuntimeError) as exc:
        learner.meta_loss(*_vec_tasks())
    msg = str(exc.value)
    assert "the custom autograd.Function Cube marks its backward @once_differentiable" in msg
    assert "module '1' (CubeAct)" in msg
    assert "order=2" in msg and "order=1" in msg and "drop @once_differentiable" in msg


def test_function_without_setup_context_under_vmap_is_explained() -> None:
    learner = mg.MAML(cube_net(), F.mse_loss, 0.1, 1, order=1, strategy="vmap")
    with pytest.raises(RuntimeError, match=r"strategy='loop'.*setup_context"):
        learner.meta_loss(*_vec_tasks())


def test_once_differentiable_is_fine_at_first_order() -> None:
    learner = mg.MAML(cube_net(), F.mse_loss, 0.1, 1, order=1, strategy="loop")
    learner.meta_loss(*_vec_tasks()).backward()


class _FakeCudnn(torch.autograd.Function):
    """Identity whose double backward fails with cuDNN's message (as test_cudnn_error.py)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "double backwards is not supported for CuDNN RNNs due to limitations in the CuDNN API"
            )
        return g


class CudnnLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.Linear(3, 3)
        self.fc = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(_FakeCudnn.apply(torch.tanh(self.rnn(x))))


def test_cudnn_rnn_is_explained_with_strategy() -> None:
    learner = mg.MAML(CudnnLike(), F.mse_loss, 0.1, 1, strategy="hvp_chain")
    with pytest.raises(RuntimeError) as exc:
        learner.meta_loss(*_vec_tasks())
    msg = str(exc.value)
    assert "cudnn.flags(enabled=False)" in msg and "order=1" in msg
    assert "strategy='adjoint'" in msg and "hvp_chain" in msg


def test_cudnn_node_is_located() -> None:
    rec = NodeRecord("encoder.rnn", "LSTM", "CudnnRnnBackward0", None, False)
    err = RuntimeError("double backwards is not supported for CuDNN RNNs")
    out = translate_autograd_error("metagrad.MAML", err, 2, strategy="unroll", locate=lambda: [rec])
    assert out is not None and "module 'encoder.rnn' (LSTM)" in str(out)


def test_op_without_any_derivative_and_generic_double_backward() -> None:
    none = RuntimeError("derivative for aten::_fused_thing is not implemented")
    out = translate_autograd_error("metagrad.MAML", none, 1)
    assert out is not None and "no derivative for aten::_fused_thing at all" in str(out)
    twice = RuntimeError("derivative for aten::_fancy_pool_backward is not implemented")
    rec = NodeRecord("features.3", "FancyPool", "FancyPoolBackward0", None, False)
    out = translate_autograd_error("metagrad.MAML", twice, 2, locate=lambda: [rec])
    assert out is not None
    msg = str(out)
    assert "aten::_fancy_pool has a backward but no double backward" in msg
    assert "module 'features.3' (FancyPool)" in msg and "order=1" in msg
    fused = RuntimeError("derivative for aten::_native_multi_head_attention is not implemented")
    out = translate_autograd_error("metagrad.MAML", fused, 2)
    assert out is not None and "set_fastpath_enabled(False)" in str(out)


def test_unknown_errors_pass_through_and_a_failing_locator_is_harmless() -> None:
    assert translate_autograd_error("f", RuntimeError("something else"), 2) is None

    def broken() -> list[NodeRecord]:
        raise ValueError("diagnostic failed")

    err = RuntimeError("derivative for aten::_x_backward is not implemented")
    out = translate_autograd_error("f", err, 2, locate=broken)
    assert out is not None and "It is created by" not in str(out)
