"""Derivative toolkit: exact higher-order derivatives of scalar functions of tensor trees.

A *tree* is a tensor or a flat dict name -> tensor (e.g. ``dict(model.named_parameters())``).
Every function here uses ``torch.autograd.grad`` or ``torch.func`` and never writes to
``.grad``; results are detached unless ``create_graph=True`` is requested.
"""

from __future__ import annotations

from metagrad.derivatives._dense import DenseDerivative, hessian, jacobian
from metagrad.derivatives._hvp import HVPMode, hvp
from metagrad.derivatives._nth import nth_derivative
from metagrad.derivatives._penalty import grad_norm_penalty

__all__ = [
    "DenseDerivative",
    "HVPMode",
    "grad_norm_penalty",
    "hessian",
    "hvp",
    "jacobian",
    "nth_derivative",
]
