"""Attention kernels under higher-order differentiation: which kernel runs where, and why.

PyTorch's fused scaled-dot-product attention kernels (flash on CPU and CUDA, memory-efficient
and cuDNN on CUDA) have a backward but **no double backward**: differentiating their backward,
which exact second-order MAML and every Hessian product do, fails with ``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``. The *math*
kernel (``SDPBackend.MATH``) is built from ordinary matmul/softmax ops, so it has derivatives of
every order; it is also what the fused kernels compute (same function, other rounding).

The policy, in one place:

* A forward pass whose backward pass will itself be differentiated runs attention on the math
  kernel: :func:`higher_order_attention` around the inner objective's forward when the inner
  gradient is taken with ``create_graph=True`` (metagrad's backends at ``order=2``), and around
  the function of every derivative-toolkit call that differentiates a backward pass (``hvp``,
  ``hessian``, ``nth_derivative`` with ``n >= 2``, and any call with ``create_graph=True``).
* Everything else keeps PyTorch's choice (the fast kernels): first-order inner steps, the
  query loss (differentiated once), evaluation and ``torch.no_grad()``.
* ``nn.MultiheadAttention`` / ``nn.TransformerEncoder(Layer)`` have an inference fast path (eval
  mode, nested tensors) implemented by fused ops without any derivative, which also reads the
  submodules' weights directly (an adapter wrapped around ``linear1`` would be skipped).
  :class:`~metagrad.functional.FunctionalModel` turns it off for its forward passes
  (:func:`no_fused_inference`) on models that contain ``nn.MultiheadAttention``; attention
  inside still runs on the fast SDPA kernels where they are allowed.

The kernel flags are process-wide in PyTorch (not per thread): another thread running
attention while a second-order step is in progress also gets the math kernel for that time.
Under ``torch.compile`` tracing nothing is switched (the compiler decides kernels itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.backends.mha

_cuda = torch.backends.cuda

# (getter, setter) of every SDPA backend flag other than math; all are consulted on CPU too.
_FUSED_FLAGS = (
    (_cuda.flash_sdp_enabled, _cuda.enable_flash_sdp),
    (_cuda.mem_efficient_sdp_enabled, _cuda.enable_mem_efficient_sdp),
    (_cuda.cudnn_sdp_enabled, _cuda.enable_cudnn_sdp),
)


@contextmanager
def higher_order_attention() -> Iterator[None]:
    """Scaled-dot-product attention on the math kernel (derivatives of any order) inside.

    Restores the previous kernel flags on exit. Costs ~2 us (``sdpa_kernel`` costs ~20 us),
    so the backends enter it at every second-order inner step.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> q = torch.randn(1, 2, 3, 4, requires_grad=True)
        >>> with higher_order_attention():
        ...     out = F.scaled_dot_product_attention(q, q, q)
        >>> out.grad_fn.name().startswith("ScaledDotProductFlash")
        False
    """
    if torch.compiler.is_compiling():
        yield
        return
    saved = [get() for get, _ in _FUSED_FLAGS]
    math_before = _cuda.math_sdp_enabled()
    fastpath_before = torch.backends.mha.get_fastpath_enabled()
    for _, set_ in _FUSED_FLAGS:
        set_(False)
    _cuda.enable_math_sdp(True)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        for (_, set_), value in zip(_FUSED_FLAGS, saved):
            set_(value)
        _cuda.enable_math_sdp(math_before)
        torch.backends.mha.set_fastpath_enabled(fastpath_before)


def attention_for(differentiated_twice: bool) -> AbstractContextManager[None]:
    """:func:`higher_order_attention` when the forward's backward will be differentiated, else nothing."""
    return higher_order_attention() if differentiated_twice else nullcontext()


@contextmanager
def no_fused_inference() -> Iterator[None]:
    """``nn.MultiheadAttention``/``nn.TransformerEncoder`` without their fused inference path.

    The fast path (``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``,
    nested tensors) is taken in eval mode when PyTorch believes no gradient is needed; under
    ``torch.func`` transforms that belief is wrong and the fused ops have no derivative.
    """
    if torch.compiler.is_compiling():
        yield
        return
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def has_fused_attention(module: torch.nn.Module) -> bool:
    """True when ``module`` contains a layer with PyTorch's fused inference fast path."""
    return any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules())
