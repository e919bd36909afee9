"""Shared type aliases and protocols.

``Params`` is the currency of the functional core: a mapping from a parameter's qualified
name (as in ``nn.Module.named_parameters``) to a tensor.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

Params = dict[str, Tensor]
"""Parameter dict: qualified name -> tensor (same keys as ``module.named_parameters()``)."""

Buffers = dict[str, Tensor]
"""Buffer dict: qualified name -> tensor (same keys as ``module.named_buffers()``)."""

TensorTree = Tensor | dict[str, Tensor]
"""A single tensor or a flat dict of tensors: the structures the derivative toolkit accepts."""


class LossFn(Protocol):
    """``loss_fn(prediction, target) -> scalar``: mean loss over the examples of one task."""

    def __call__(self, prediction: Tensor, target: Tensor, /) -> Tensor: ...


class ScalarFn(Protocol):
    """A function of a tensor (or parameter dict) returning a scalar tensor."""

    def __call__(self, x: TensorTree, /) -> Tensor: ...
