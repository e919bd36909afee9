r"""learn2learn's ``GBML``: gradient-based meta-learning with a learned update transform.

One adaptation step is :math:`\theta' = \theta - \mathrm{lr}\, T(\nabla_\theta \mathcal{L})`,
with ``T`` built per parameter by ``transform`` (see ``l2l.optim.transforms``): ``Scale`` gives
Meta-SGD, ``MetaCurvatureTransform`` Meta-Curvature, ``KroneckerTransform`` KFO; with
``adapt_transform=True`` the transform's own parameters also take a gradient step before each
later adaptation step (Alpha MAML with ``Scale``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagrad._errors import translate_autograd_error
from metagrad.compat._l2l_clone import clone_module
from metagrad.compat._l2l_optim import DifferentiableSGD, ParameterUpdate, TransformFactory


class GBML(nn.Module):
    """General gradient-based meta-learner, learn2learn's ``l2l.algorithms.GBML``.

    ``gbml.parameters()`` holds the model's and the transforms' parameters (the meta-parameters).
    ``clone()`` copies both with ``l2l.clone_module`` (the copies back-propagate into them), and
    ``clone.adapt(loss)`` takes one transformed step on the copy.

    Differences from learn2learn: ``adapt`` on the wrapper itself (not on a clone) raises
    ``ValueError`` (learn2learn would turn your model's parameters into non-leaf tensors);
    frozen or unused parameters raise one ``ValueError`` naming the flag, instead of a printed
    traceback; clones copy buffers instead of sharing them (see ``clone_module``).

    Args:
        module: the model.
        transform: called with each parameter; returns the module that maps its gradient to
            its update, or None (plain gradient).
        lr: adaptation step size.
        adapt_transform: adapt the transforms' parameters too.
        pass_param_names: call ``transform(name, parameter)``.
        first_order: inner gradients without ``create_graph``.
        allow_unused: leave parameters that do not reach the loss unchanged.
        allow_nograd: leave parameters with ``requires_grad=False`` unchanged.

    References:
        Finn et al. 2017 (MAML); Li et al. 2017 (Meta-SGD); Park and Oliva 2019
        (Meta-Curvature); Behl et al. 2019 (Alpha MAML); Arnold et al. 2021 (KFO).

    Example:
        >>> import torch
        >>> import metagrad.compat.learn2learn as l2l
        >>> model = torch.nn.Linear(3, 1)
        >>> gbml = l2l.algorithms.GBML(model, lambda p: l2l.nn.Scale(p.shape, 0.1), lr=1.0)
        >>> learner = gbml.clone()
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> learner.adapt(torch.nn.functional.mse_loss(learner(x), y))
        >>> torch.nn.functional.mse_loss(learner(x), y).backward()
        >>> gbml.compute_update.transforms_modules[0].alpha.grad.shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        module: nn.Module,
        transform: TransformFactory,
        lr: float = 1.0,
        adapt_transform: bool = False,
        pass_param_names: bool = False,
        first_order: bool = False,
        allow_unused: bool = False,
        allow_nograd: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"l2l.GBML: module must be a torch.nn.Module, got {type(module).__name__}."
            )
        compute_update = kwargs.pop("compute_update", None)
        is_clone = bool(kwargs.pop("_is_clone", False))
        if kwargs:
            raise TypeError(f"l2l.GBML: unexpected arguments {sorted(kwargs)}.")
        self.module = module
        self.transform = transform
        self.adapt_transform = bool(adapt_transform)
        self.lr = lr
        self.first_order = bool(first_order)
        self.allow_unused = bool(allow_unused)
        self.allow_nograd = bool(allow_nograd)
        if compute_update is None:
            compute_update = ParameterUpdate(
                module.named_parameters(), transform, pass_param_names=pass_param_names
            )
        self.compute_update = compute_update
        self.diff_sgd = DifferentiableSGD(lr)
        # True after a model step: the transform's parameters then reach the next loss.
        self._params_updated = False
        self._is_clone = is_clone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
        adapt_transform: bool | None = None,
    ) -> GBML:
        """Differentiable copies of the model and of the update transforms (flags default to ours)."""
        return GBML(
            module=clone_module(self.module),
            transform=self.transform,
            lr=self.lr,
            adapt_transform=self.adapt_transform if adapt_transform is None else adapt_transform,
            first_order=self.first_order if first_order is None else first_order,
            allow_unused=self.allow_unused if allow_unused is None else allow_unused,
            allow_nograd=self.allow_nograd if allow_nograd is None else allow_nograd,
            compute_update=clone_module(self.compute_update),
            _is_clone=True,
        )

    def adapt(
        self,
        loss: Tensor,
        first_order: bool | None = None,
        allow_nograd: bool | None = None,
        allow_unused: bool | None = None,
    ) -> None:
        """One step on ``loss``: the transforms first (if adapted, from the second step), then the model.

        Raises:
            ValueError: called on the wrapper rather than a clone; frozen or unused parameters
                without the matching flag.
        """
        fn = "l2l.GBML.adapt"
        if not self._is_clone:
            raise ValueError(
                f"{fn}: called on the wrapper of your model, not on a clone. Adapt a clone: "
                f"learner = gbml.clone(); learner.adapt(loss)."
            )
        fo = self.first_order if first_order is None else bool(first_order)
        unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        nograd = self.allow_nograd if allow_nograd is None else bool(allow_nograd)
        second = not fo
        if self.adapt_transform and self._params_updated:
            params = list(self.compute_update.parameters())
            try:
                grads = torch.autograd.grad(
                    loss, params, create_graph=second, retain_graph=second, allow_unused=unused
                )
            except RuntimeError as err:
                better = translate_autograd_error(fn, err, 2 if second else 1)
                if better is None:
                    raise
                raise better from err
            self.diff_sgd(self.compute_update, list(grads))
            self._params_updated = False
        keep = second or self.adapt_transform
        updates = self.compute_update(
            loss,
            self.module.parameters(),
            create_graph=keep,
            retain_graph=keep,
            allow_unused=unused,
            allow_nograd=nograd,
        )
        self.diff_sgd(self.module, updates)
        self._params_updated = True
