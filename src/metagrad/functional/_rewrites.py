"""Every rewrite of the private model copy, and the one opt-out: ``memory_format="preserve"``.

:class:`metagrad.functional.FunctionalModel` (and so every learner) runs a deep copy of the
user's module, the *template*; the user's module is never changed. On stock ``torch.nn`` conv
nets on CPU (``memory_format="auto"``, the default) or on any model
(``memory_format="channels_last"``) the template is rewritten, all exact (same function, same
derivatives of every order; float64 tests against an independent reference):

* **channels-last activations**: the input batch gets explicit NHWC strides once
  (:func:`to_channels_last`) and every layer keeps that layout;
* **pool before ReLU**: each ``ReLU -> MaxPool`` pair of an ``nn.Sequential`` becomes
  ``MaxPool -> ReLU`` (:func:`pool_before_relu`);
* **batch-statistics BatchNorm**: stock BatchNorm layers that normalize with batch statistics
  get a double backward in tensor ops (:func:`metagrad.functional._fastbn.use_batch_stats_norm`),
  because PyTorch's own is slow on NHWC.

``memory_format="preserve"`` turns all three off: the template is the user's module, layer for
layer. Models with a custom ``forward`` get none of them under ``"auto"`` (their code might call
``.view`` on an NHWC tensor).

One switch is not an optimization and is not optional: ``nn.MultiheadAttention`` (and
``nn.TransformerEncoderLayer``) in eval mode take a fused inference path that has no derivative,
so a model holding them runs with that path off (:func:`needs_math_attention`; see
``functional/_attention.py``).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from metagrad._compat import is_functorch_wrapped
from metagrad.functional._attention import has_fused_attention
from metagrad.functional._fastbn import use_batch_stats_norm

MEMORY_FORMATS = ("auto", "channels_last", "preserve")


def rewrite_template(source: nn.Module, template: nn.Module, memory_format: str) -> str | None:
    """Apply the rewrites ``memory_format`` calls for to ``template`` (a copy of ``source``).

    Returns where inputs go channels-last: None (never: ``"preserve"``, or ``"auto"`` on a model
    that is not a stock conv net), ``"cpu"`` (CPU inputs only: ``"auto"``) or ``"any"``.
    """
    if memory_format == "channels_last":
        where: str | None = "any"
    elif memory_format == "auto" and _stock_conv2d_net(source):
        where = "cpu"
    else:
        return None
    pool_before_relu(template)
    use_batch_stats_norm(template)
    return where


def needs_math_attention(template: nn.Module) -> bool:
    """True when ``template`` holds attention whose fused inference path must be switched off."""
    return has_fused_attention(template)


def pool_before_relu(module: nn.Module) -> int:
    """Swap every ``ReLU -> MaxPool`` pair of an ``nn.Sequential`` to ``MaxPool -> ReLU``.

    ``max(relu(a)) = relu(max(a))`` because ReLU is non-decreasing, and the derivatives agree
    wherever they exist (at a tie on 0 both give 0), so the function and its meta-gradient
    are unchanged while the ReLU, its backward and its double backward touch a quarter of the
    elements (2x2 pool). Pairs with hooks (which would see other tensors) are left alone.
    Returns the number of swaps.
    """
    swaps = 0
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in itertools.pairwise(keys):
            relu, pool = seq._modules[a], seq._modules[b]
            if (
                type(relu) is nn.ReLU
                and isinstance(pool, nn.modules.pooling._MaxPoolNd)
                and not pool.return_indices
                and not _has_hooks(relu)
                and not _has_hooks(pool)
            ):
                seq._modules[a], seq._modules[b] = pool, relu
                swaps += 1
    return swaps


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _stock_conv2d_net(module: nn.Module) -> bool:
    """A ``Conv2d`` inside, and nothing but ``torch.nn`` classes (no custom ``forward``)."""
    mods = list(module.modules())
    return any(isinstance(m, nn.Conv2d) for m in mods) and all(
        type(m).__module__.startswith("torch.nn.") for m in mods
    )


def to_channels_last(x: Tensor) -> Tensor:
    """``x`` with NHWC strides that no kernel can read as NCHW; other tensors unchanged.

    ``contiguous(memory_format=channels_last)`` leaves a one-channel image batch with NCHW
    strides (both layouts are the same memory when C = 1), and oneDNN then picks NCHW for the
    whole network. The same memory viewed with explicit NHWC strides removes the ambiguity.
    Tensors under ``torch.func`` transforms, tensors that require grad and non-float or
    non-4-D tensors are returned as they are.
    """
    if (
        x.dim() != 4
        or not x.is_floating_point()
        or x.requires_grad
        or is_functorch_wrapped(x)
        or torch.compiler.is_compiling()
    ):
        return x
    _, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    nhwc = (h * w * c, 1, w * c, c)
    # Contiguous in NHWC already, so these strides address exactly the same elements.
    return x if x.stride() == nhwc else x.as_strided(x.shape, nhwc)
