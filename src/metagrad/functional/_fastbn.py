"""Batch-statistics BatchNorm whose double backward avoids a slow PyTorch reduction.

PyTorch's double backward of ``native_batch_norm`` reduces over the batch dimension first
(``sum(0, keepdim=True)``), and on a channels-last tensor that single reduction runs much
slower than the same sum on NCHW (measured in BENCHMARKS.md): for a 20-way support set it is a
large part of the whole second-order meta-step.

:class:`BatchStatsNorm` keeps the native kernels for the forward and for a plain backward, and
only when a graph of the backward is requested (``create_graph=True``, the inner loop of
second-order MAML) writes the backward in differentiable tensor ops, whose own derivatives
reduce over all non-channel dimensions at once. With ``m`` elements per channel,
``x_hat = (x - mean) * rstd``:

    dL/db = sum(g),  dL/dw = sum(g * x_hat),
    dL/dx = w * rstd * (g - (dL/db + x_hat * dL/dw) / m).

Mean and ``rstd`` are recomputed from ``x`` in that branch so their dependence on ``x`` is in
the graph. The values equal the native ones up to rounding (tests: float64, gradgradcheck).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagrad._compat import is_functorch_wrapped


class _BatchStatsNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        out, mean, rstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        if not torch.is_grad_enabled():  # plain backward: the native kernel
            mask = list(ctx.needs_input_grad[:3])
            if (
                x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last)
                and not g.is_contiguous(memory_format=torch.channels_last)
            ):
                # An NCHW gradient (max-pool's double backward gathers into NCHW) against an
                # NHWC input sends the native kernel down a ~7x slower mixed-layout path.
                g = g.contiguous(memory_format=torch.channels_last)
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, x, weight, None, None, mean, rstd, True, ctx.eps, mask
            )
            return gx, gw, gb, None
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        m = x.numel() // x.shape[1]
        centred = x - x.mean(dims, keepdim=True)
        rstd_x = torch.rsqrt(centred.square().mean(dims, keepdim=True) + ctx.eps)
        x_hat = centred * rstd_x
        gb = g.sum(dims)
        gw = (g * x_hat).sum(dims)
        gx = (weight.view(shape) * rstd_x) * (g - (gb.view(shape) + x_hat * gw.view(shape)) / m)
        return gx, gw, gb, None


def batch_stats_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.batch_norm`` with batch statistics and affine ``weight``/``bias`` (see module doc)."""
    return _BatchStatsNormFn.apply(x, weight, bias, eps)  # type: ignore[no-any-return]


class BatchStatsNorm(nn.BatchNorm2d):
    """Template-only stand-in for a stock ``BatchNorm1d/2d/3d`` (see :func:`use_batch_stats_norm`).

    Batch statistics that update nothing (the templates switch ``track_running_stats`` off) go
    through :func:`batch_stats_norm`; anything else, and inputs under ``torch.func`` transforms
    or ``torch.compile``, through the stock ``forward``.
    """

    _stock: type[nn.Module]

    def forward(self, input: Tensor) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        updates_stats = self.training and self.track_running_stats and self.running_mean is not None
        if (
            not batch_stats
            or updates_stats  # the stock layer also moves its running statistics
            or self.weight is None
            or self.bias is None
            or is_functorch_wrapped(input)
            or torch.compiler.is_compiling()
        ):
            return self._stock.forward(self, input)  # type: ignore[arg-type]
        self._check_input_dim(input)
        return batch_stats_norm(input, self.weight, self.bias, self.eps)


class FastBatchNorm1d(BatchStatsNorm):
    _stock = nn.BatchNorm1d
    _check_input_dim = nn.BatchNorm1d._check_input_dim


class FastBatchNorm2d(BatchStatsNorm):
    _stock = nn.BatchNorm2d


class FastBatchNorm3d(BatchStatsNorm):
    _stock = nn.BatchNorm3d
    _check_input_dim = nn.BatchNorm3d._check_input_dim


_FAST: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FastBatchNorm1d,
    nn.BatchNorm2d: FastBatchNorm2d,
    nn.BatchNorm3d: FastBatchNorm3d,
}


def use_batch_stats_norm(module: nn.Module) -> int:
    """Give every stock affine BatchNorm of ``module`` (a private template) the fast path.

    Only the class of each layer changes (to a subclass that keeps the stock input check);
    parameters, buffers and hooks stay. Returns the number of layers changed.
    """
    n = 0
    for m in module.modules():
        if type(m) in _FAST and m.affine:  # type: ignore[union-attr]
            m.__class__ = _FAST[type(m)]
            n += 1
    return n
