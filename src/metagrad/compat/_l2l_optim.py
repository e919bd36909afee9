r"""learn2learn's differentiable update machinery (``l2l.optim``) and gradient transforms.

:class:`ParameterUpdate` computes, for each parameter :math:`\theta_j`, an update
:math:`u_j = T_j(\nabla_{\theta_j}\mathcal{L})` where :math:`T_j` is a small learnable module
(a *transform*) built from the parameter; :class:`DifferentiableSGD` applies
:math:`\theta_j \leftarrow \theta_j - \mathrm{lr}\,u_j` without breaking the graph. With
``l2l.algorithms.GBML`` this gives Meta-SGD (``Scale``), Meta-Curvature
(:class:`MetaCurvatureTransform`) and KFO (:class:`KroneckerTransform`).

References:
    Park and Oliva, *Meta-Curvature*, NeurIPS 2019.
    Arnold, Iqbal, Sha, *When MAML Can Adapt Fast and How to Assist When It Cannot*, AISTATS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metagrad._errors import translate_autograd_error
from metagrad.compat._l2l_clone import update_module

TransformFactory = Callable[..., nn.Module | None]


class ReshapedTransform(nn.Module):
    """Apply ``transform`` to the gradient viewed as ``shape``, and give it its shape back."""

    def __init__(self, transform: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.transform = transform
        self.in_shape = tuple(shape)

    def forward(self, grad: Tensor) -> Tensor:
        out: Tensor = self.transform(grad.reshape(self.in_shape))
        return out.reshape(grad.shape)


class ModuleTransform:
    """Factory: a ``module_cls(numel, numel)`` acting on the flattened gradient of each parameter.

    Example:
        >>> import torch
        >>> t = ModuleTransform(torch.nn.Linear)(torch.zeros(2, 3))
        >>> t(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, module_cls: Callable[[int, int], nn.Module]) -> None:
        self.module_cls = module_cls

    def __call__(self, parameter: Tensor) -> nn.Module:
        numel = parameter.numel()
        return ReshapedTransform(self.module_cls(numel, numel), (1, numel))


def kronecker_dims(param: Tensor) -> tuple[int, int]:
    """``(n, m)`` of the Kronecker factors for a bias, a linear or a conv weight."""
    shape = param.shape
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 1:
        return int(shape[0]), 1
    if len(shape) == 4:
        return int(shape[1]), int(shape[2] * shape[3])
    raise ValueError(
        f"l2l.optim.transforms.KroneckerTransform: parameters of shape {tuple(shape)} are not "
        f"supported (1-D, 2-D and 4-D only)."
    )


class KroneckerTransform:
    """Factory: a Kronecker-factored linear map (e.g. ``l2l.nn.KroneckerLinear``) per parameter.

    Args:
        kronecker_cls: called as ``kronecker_cls(n=..., m=..., bias=..., psd=...)``.
        bias: give the maps a bias.
        psd: positive semi-definite factors.
    """

    def __init__(
        self, kronecker_cls: Callable[..., nn.Module], bias: bool = False, psd: bool = True
    ):
        self.kronecker_cls = kronecker_cls
        self.bias, self.psd = bias, psd

    def __call__(self, param: Tensor) -> nn.Module:
        n, m = kronecker_dims(param)
        transform = self.kronecker_cls(n=n, m=m, bias=self.bias, psd=self.psd)
        return ReshapedTransform(transform, (-1, n, m))


class MetaCurvatureTransform(nn.Module):
    r"""Meta-Curvature's learned preconditioner of one parameter's gradient.

    Biases: :math:`M \odot g`. Linear weights :math:`[a, b]`: :math:`M_a\, g\, M_b`. Conv weights
    :math:`[a, b, k_h, k_w]`: :math:`U_{i j f} = \sum M^{in}_{ia} M^{f}_{fg} G_{abg} M^{out}_{bj}`
    over the output channels ``a``, input channels ``b`` and kernel positions ``g``. The factors
    start as identities (ones), so the initial update is ``lr * grad``.

    Args:
        param: the parameter (for its shape).
        lr: scale of the update.

    Raises:
        ValueError: parameters that are not 1-D, 2-D or 4-D.
    """

    def __init__(self, param: Tensor, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = lr
        shape = tuple(param.shape)
        self.dim = len(shape)
        if self.dim == 1:
            self.mc = nn.Parameter(torch.ones_like(param.detach()))
        elif self.dim == 2:
            self.mc_in = nn.Parameter(torch.eye(shape[0]))
            self.mc_out = nn.Parameter(torch.eye(shape[1]))
        elif self.dim == 4:
            self.n_in, self.n_out = shape[0], shape[1]
            self.n_f = math.prod(shape[2:])
            self.mc_in = nn.Parameter(torch.eye(self.n_in))
            self.mc_out = nn.Parameter(torch.eye(self.n_out))
            self.mc_f = nn.Parameter(torch.eye(self.n_f))
        else:
            raise ValueError(
                f"l2l.optim.transforms.MetaCurvatureTransform: parameters of shape {shape} are "
                f"not supported (1-D, 2-D and 4-D only)."
            )

    def forward(self, grad: Tensor) -> Tensor:
        if self.dim == 1:
            update = self.mc * grad
        elif self.dim == 2:
            update = self.mc_in @ grad @ self.mc_out
        else:
            g = grad.reshape(self.n_in, self.n_out, self.n_f)
            update = torch.einsum("ia,fg,abg,bj->ijf", self.mc_in, self.mc_f, g, self.mc_out)
            update = update.reshape(grad.shape)
        return self.lr * update


class TransformDictionary:
    """Factory dispatching on the parameter: ``{module or parameter: factory}``; others get None.

    Raises:
        ValueError: a key that is neither an ``nn.Module`` nor an ``nn.Parameter``.
    """

    def __init__(self, dictionary: Mapping[Any, TransformFactory]) -> None:
        self.param_to_transform: dict[int, TransformFactory] = {}
        for key, transform in dictionary.items():
            if isinstance(key, nn.Module):
                for p in key.parameters():
                    self.param_to_transform[id(p)] = transform
            elif isinstance(key, nn.Parameter):
                self.param_to_transform[id(key)] = transform
            else:
                raise ValueError(
                    "l2l.optim.transforms.TransformDictionary: keys must be nn.Modules or "
                    f"nn.Parameters, got {type(key).__name__}."
                )

    def __call__(self, param: Tensor, *args: Any, **kwargs: Any) -> nn.Module | None:
        factory = self.param_to_transform.get(id(param))
        return None if factory is None else factory(param, *args, **kwargs)


class ParameterUpdate(nn.Module):
    """Updates ``transform_j(grad_j)`` for each parameter, like ``torch.autograd.grad``.

    Args:
        parameters: the parameters (or ``(name, parameter)`` pairs, e.g. ``named_parameters()``)
            the updates will be for, in order.
        transform: called with each parameter (``transform(name, parameter)`` with
            ``pass_param_names=True``); returns a module mapping that parameter's gradient to
            its update, or None for the plain gradient.
        pass_param_names: also pass the parameter's name to ``transform``.

    Raises:
        ValueError: ``transform`` returned something that is neither a module nor None.
    """

    def __init__(
        self,
        parameters: Iterable[Tensor | tuple[str, Tensor]],
        transform: TransformFactory,
        pass_param_names: bool = False,
    ) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        indices: list[int | None] = []
        for item in parameters:
            name, param = item if isinstance(item, tuple) else ("", item)
            t = transform(name, param) if pass_param_names else transform(param)
            if t is None:
                indices.append(None)
            elif isinstance(t, nn.Module):
                indices.append(len(modules))
                modules.append(t)
            else:
                raise ValueError(
                    f"l2l.optim.ParameterUpdate: the transform of parameter {name or len(indices)} "
                    f"returned {type(t).__name__}; it must return an nn.Module or None."
                )
        self.transforms_modules = nn.ModuleList(modules)
        self.transforms_indices = indices

    def forward(
        self,
        loss: Tensor,
        parameters: Iterable[Tensor],
        create_graph: bool = False,
        retain_graph: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
    ) -> list[Tensor | None]:
        """The update of each parameter (None: frozen with ``allow_nograd``, or unused)."""
        fn = "l2l.optim.ParameterUpdate"
        params = list(parameters)
        if len(params) != len(self.transforms_indices):
            raise ValueError(
                f"{fn}: got {len(params)} parameters but the update was built for "
                f"{len(self.transforms_indices)}; pass the same parameters, in the same order."
            )
        frozen = [i for i, p in enumerate(params) if not p.requires_grad]
        if frozen and not allow_nograd:
            raise ValueError(
                f"{fn}: parameters at positions {frozen} have requires_grad=False. Pass "
                f"allow_nograd=True to leave them unchanged."
            )
        diff = [i for i, p in enumerate(params) if p.requires_grad]
        try:
            raw = torch.autograd.grad(
                loss,
                [params[i] for i in diff],
                create_graph=create_graph,
                retain_graph=retain_graph or create_graph,
                allow_unused=True,
            )
        except RuntimeError as err:
            better = translate_autograd_error(fn, err, 2 if create_graph else 1)
            if better is None:
                raise
            raise better from err
        grads: list[Tensor | None] = [None] * len(params)
        for i, g in zip(diff, raw):
            grads[i] = g
        unused = [i for i in diff if grads[i] is None]
        if unused and not allow_unused:
            raise ValueError(
                f"{fn}: parameters at positions {unused} do not reach the loss. Pass "
                f"allow_unused=True to leave them unchanged."
            )
        updates: list[Tensor | None] = []
        for grad, j in zip(grads, self.transforms_indices):
            updates.append(grad if j is None or grad is None else self.transforms_modules[j](grad))
        return updates


class DifferentiableSGD(nn.Module):
    r"""``module``'s parameters :math:`\theta \leftarrow \theta - \mathrm{lr}\,g`, on the graph.

    ``forward(module, gradients=None)`` updates ``module`` in place with ``l2l.update_module``
    (``gradients`` default to each parameter's ``.grad``; None entries are skipped).
    """

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr

    def forward(self, module: nn.Module, gradients: Sequence[Tensor | None] | None = None) -> None:
        if gradients is None:
            gradients = [p.grad for p in module.parameters()]
        update_module(module, [None if g is None else g * -self.lr for g in gradients])
