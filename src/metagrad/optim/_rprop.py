"""Rprop: sign-based steps with per-element adaptive step sizes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.optim._base import LR, Group, Hyper
from metagrad.optim._common import NONNEG, Bound, OptimizerBase, entry, signed


class RpropState(NamedTuple):
    """The previous (masked) gradient and the current step size per parameter."""

    prev: dict[str, Tensor]
    step_size: dict[str, Tensor]


def _clamp(x: Tensor, lo: Any, hi: Any) -> Tensor:
    # torch.clamp takes numbers or tensors for both bounds, not a mix.
    x = torch.maximum(x, lo) if isinstance(lo, Tensor) else x.clamp(min=lo)
    return torch.minimum(x, hi) if isinstance(hi, Tensor) else x.clamp(max=hi)


@dataclass(frozen=True)
class Rprop(OptimizerBase):
    r"""Differentiable ``torch.optim.Rprop``.

    With :math:`g_t = \pm\nabla f(p_{t-1})` (minus when ``maximize``), :math:`s_0 = \gamma`
    and :math:`\sigma_t = \operatorname{sign}(g_t\, g'_{t-1})`:

    .. math::
        s_t = \operatorname{clip}\big(s_{t-1}\,
        [\eta_+ \text{ if } \sigma_t > 0,\ \eta_- \text{ if } \sigma_t < 0,\ 1 \text{ else}],
        \ s_{min}, s_{max}\big)

    .. math::
        g'_t = \begin{cases} 0 & \sigma_t < 0 \\ g_t & \text{else}\end{cases},\qquad
        p_t = p_{t-1} - \operatorname{sign}(g'_t)\, s_t

    The branches are ``torch.where`` selections, so the update has no data-dependent
    control flow; it is differentiable in :math:`\gamma`, :math:`\eta_\pm` and the active
    clip bound, and has zero derivative with respect to the gradient's value.

    At ``step == 0`` the step sizes start from the learning rate given to that call (the
    configured ``lr`` or ``lrs``), not from what :meth:`init` stored, so ``lr`` stays
    differentiable when :meth:`init` ran outside a transform.

    Args:
        lr: Initial step size :math:`\gamma`.
        etas: :math:`(\eta_-, \eta_+)` with :math:`0 < \eta_- < 1 < \eta_+`.
        step_sizes: :math:`(s_{min}, s_{max})`.
        maximize: Ascend instead of descend.
        groups: Per-parameter overrides, see :class:`~metagrad.optim.Group`.

    Raises:
        ValueError: A negative ``lr``, ``etas`` out of order, or negative or unordered
            ``step_sizes``.

    Example:
        >>> import torch
        >>> opt = Rprop(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 1.0])}
        >>> state = opt.init(params)
        >>> for step in range(2):
        ...     params, state = opt.update({"w": torch.tensor([3.0, -2.0])}, state, params, step)
        >>> params["w"]
        tensor([0.7800, 1.2200])

    References:
        Riedmiller, Braun, *A Direct Adaptive Method for Faster Backpropagation Learning:
        The RPROP Algorithm*, 1993.
    """

    lr: Hyper = 1e-2
    etas: tuple[Hyper, Hyper] = (0.5, 1.2)
    step_sizes: tuple[Hyper, Hyper] = (1e-6, 50.0)
    maximize: bool = False
    groups: tuple[Group, ...] = ()

    _hypers = ("lr", "etas", "step_sizes")
    _pairs = frozenset({"etas", "step_sizes"})
    _flags = ("maximize",)
    _bounds: ClassVar[Mapping[str, Bound]] = {
        "lr": NONNEG,
        "etas.0": (0.0, 1.0, False, False),
        "etas.1": (1.0, float("inf"), False, False),
        "step_sizes.0": NONNEG,
        "step_sizes.1": NONNEG,
    }

    def _check_config(self, cfg: dict[str, Any], where: str) -> None:
        lo, hi = cfg["step_sizes"]
        if not isinstance(lo, Tensor) and not isinstance(hi, Tensor) and lo > hi:
            raise ValueError(
                f"{self._fn}: step_sizes={cfg['step_sizes']!r}{where} must be (min, max) with "
                f"min <= max, e.g. step_sizes=(1e-6, 50)."
            )

    def init(self, params: Params) -> RpropState:
        """Zero previous gradients and step sizes equal to ``lr``."""
        return RpropState(
            prev={k: torch.zeros_like(p) for k, p in params.items()},
            step_size={
                k: torch.zeros_like(p) + self._config(k, p, None)["lr"] for k, p in params.items()
            },
        )

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        step: int,
        lrs: Mapping[str, LR] | None = None,
    ) -> tuple[Params, RpropState]:
        """One Rprop step; see the class docstring for the rule."""
        step = self._check_inputs(grads, params, step)
        out: Params = {}
        new = RpropState({}, {})
        for k, p in params.items():
            h = self._config(k, p, lrs)
            g = signed(grads[k], h["maximize"])
            (eta_minus, eta_plus), (s_min, s_max) = h["etas"], h["step_sizes"]
            one = torch.ones_like(g)
            s_prev = one * h["lr"] if step == 0 else entry(self._fn, state, "step_size", k)
            sign = torch.sign(g * entry(self._fn, state, "prev", k))
            # Multiplying by `one` keeps the factor in the gradient's dtype for number etas.
            factor = torch.where(
                sign > 0, eta_plus * one, torch.where(sign < 0, eta_minus * one, one)
            )
            s = _clamp(s_prev * factor, s_min, s_max)
            g = torch.where(sign < 0, torch.zeros_like(g), g)
            new.prev[k], new.step_size[k] = g, s
            out[k] = p - torch.sign(g) * s
        return out, new
