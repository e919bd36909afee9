"""The batch-statistics BatchNorm of channels-last templates: values and derivatives."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import MODELS
from torch import Tensor, nn

from metagrad.functional import FunctionalModel
from metagrad.functional._fastbn import FastBatchNorm2d, batch_stats_norm, use_batch_stats_norm

F64 = torch.float64


def _inputs(shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, dtype=F64, generator=g).requires_grad_()
    w = (torch.rand(c, dtype=F64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=F64, generator=g).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 2), (3, 2, 4)])
def test_gradcheck_and_gradgradcheck(shape: tuple[int, ...]) -> None:
    x, w, b = _inputs(shape)
    fn = lambda x, w, b: batch_stats_norm(x, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_double_backward_equals_native_batch_norm(layout: str) -> None:
    x, w, b = _inputs((5, 4, 6, 6))
    if layout == "nhwc":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()

    def second(norm) -> tuple[Tensor, ...]:  # type: ignore[no-untyped-def]
        out = norm(x, w, b)
        g = torch.autograd.grad((out * out.sin()).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(sum((gi * gi.cos()).sum() for gi in g), (x, w, b))

    want = second(lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    got = second(lambda x, w, b: batch_stats_norm(x, w, b, 1e-5))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    out = batch_stats_norm(x, w, b, 1e-5)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))


@pytest.mark.parametrize("grad_layout", ["nchw", "nhwc"])
def test_plain_backward_of_nhwc_input_with_either_gradient_layout(grad_layout: str) -> None:
    # An NCHW gradient against an NHWC input is made NHWC before the native kernel (speed);
    # the values must not change.
    x, w, b = _inputs((5, 4, 6, 6))
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(5, 4, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    if grad_layout == "nhwc":
        g = g.contiguous(memory_format=torch.channels_last)
    want = torch.autograd.grad(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5), (x, w, b), g)
    got = torch.autograd.grad(batch_stats_norm(x, w, b, 1e-5), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_template_layers_swapped_only_for_channels_last() -> None:
    fast = FunctionalModel.from_module(MODELS["conv_bn"](), memory_format="channels_last")
    slow = FunctionalModel.from_module(MODELS["conv_bn"](), memory_format="preserve")
    assert sum(isinstance(m, FastBatchNorm2d) for m in fast.template.modules()) == 2
    assert not any(isinstance(m, FastBatchNorm2d) for m in slow.template.modules())
    assert fast.vmap_wrong_second_order() == ["BatchNorm2d", "BatchNorm2d"]


def test_eval_mode_with_running_statistics_uses_the_stock_path() -> None:
    bn = nn.BatchNorm2d(3).to(F64)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    fast = copy.deepcopy(bn)
    assert use_batch_stats_norm(fast) == 1
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    for mode in (True, False, True):
        bn.train(mode), fast.train(mode)
        torch.testing.assert_close(fast(x), bn(x))
        torch.testing.assert_close(fast.running_mean, bn.running_mean)  # still updated alike
    fast.track_running_stats = bn.track_running_stats = False  # as in the templates
    bn.running_mean = bn.running_var = fast.running_mean = fast.running_var = None
    torch.testing.assert_close(fast(x), bn(x))


def test_non_affine_layers_are_left_alone() -> None:
    assert use_batch_stats_norm(nn.Sequential(nn.BatchNorm2d(3, affine=False))) == 0
