"""A direct forward for plain layer chains, without ``functional_call``'s reparametrization.

``torch.func.functional_call`` swaps the given tensors into the module for each call and back
(a walk over every submodule's parameters and buffers); on a small MLP that bookkeeping costs
more than the layers. For a template that is an ``nn.Sequential`` of stock ``nn.Linear`` layers
and parameter-free stock activations (ReLU, Tanh, Dropout, ...), :class:`Chain` runs the same
arithmetic directly: ``F.linear(x, params[w], params[b])`` for each linear layer, and the
activation module's own ``forward`` for the others. Same function, same graph, same
derivatives of every order (the layers' ``forward`` is what ``functional_call`` would run).

It is used only while nothing could observe the difference: no hooks on any layer of the
template, no global module hooks, and exactly the chain's parameter names given (no buffer
overrides). Anything else takes ``functional_call``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from metagrad._typing import Params

# Parameter-free layers whose ``forward`` depends on the input (and ``training``) only.
_STATELESS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
)
_GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def _hooked(m: nn.Module) -> bool:
    return bool(
        m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
    )


class Chain:
    """The layers of a plain ``nn.Sequential`` as direct calls (see the module docstring)."""

    def __init__(self, template: nn.Sequential, steps: list[tuple[str, str, nn.Module]]) -> None:
        self.template = template
        self.steps = steps  # (weight name, bias name, layer): names empty for stateless layers
        self.names = frozenset(n for w, b, _ in steps for n in (w, b) if n)

    @classmethod
    def of(cls, template: nn.Module) -> Chain | None:
        """The chain of ``template``, or None when it is not a plain stock chain."""
        if type(template) is not nn.Sequential or len(template) == 0 or _hooked(template):
            return None
        if any(True for _ in template.buffers()):
            return None
        steps: list[tuple[str, str, nn.Module]] = []
        for name, m in template.named_children():
            if type(m) is nn.Linear:
                if m.bias is None:
                    return None
                steps.append((f"{name}.weight", f"{name}.bias", m))
            elif type(m) in _STATELESS and not any(True for _ in m.parameters()):
                steps.append(("", "", m))
            else:
                return None
        return cls(template, steps)

    def usable(self, params: Params, buffers: Params) -> bool:
        """True when the direct forward is the function ``functional_call`` would run."""
        if buffers or len(params) != len(self.names) or not self.names.issuperset(params):
            return False
        if any(getattr(_module, h) for h in _GLOBAL_HOOKS):
            return False
        return not any(_hooked(m) for _, _, m in self.steps)

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        for w, b, m in self.steps:
            # a stateless layer's forward without __call__: no hooks exist (usable() checked)
            x = F.linear(x, params[w], params[b]) if w else m.forward(x)
        return x
