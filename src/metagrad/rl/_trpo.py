r"""Trust-region policy optimization over parameter dicts, Fisher products from metagrad.hvp.

One TRPO step (Schulman et al., 2015) maximizes a surrogate :math:`L(\theta)` subject to
:math:`\overline{\mathrm{KL}}(\theta_{\mathrm{old}}, \theta) \le \delta`:

.. math::

    x = (F + \lambda I)^{-1} g, \qquad
    \Delta\theta = \sqrt{\frac{2\delta}{x^\top (F + \lambda I) x}}\; x,

with :math:`g = \nabla L(\theta_{\mathrm{old}})`, :math:`F = \nabla^2 \overline{\mathrm{KL}}`
at :math:`\theta_{\mathrm{old}}` (the Fisher matrix: the KL's gradient vanishes there), the
solve done by :func:`metagrad.bilevel.cg` with products :math:`F v` from
:func:`metagrad.hvp` (exact double backward, no finite differences), then a backtracking line
search that keeps the first step improving :math:`L` within the KL bound. For MAML the KL is a
function of the meta-parameters *through* the adaptation step, so :math:`F v` is a
third-order derivative of the policy; the MAML paper approximated it by finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad._tree import tree_vdot
from metagrad._typing import Params
from metagrad.bilevel import cg
from metagrad.derivatives import hvp


@dataclass(frozen=True)
class TRPOInfo:
    """What one :func:`trpo_step` did.

    Attributes:
        surrogate_before, surrogate_after: :math:`L` at the old and the new parameters.
        kl: mean KL of the accepted step (0 when rejected).
        expected_improvement: :math:`g^\\top \\Delta\\theta` of the full step.
        backtracks: line-search halvings (by ``backtrack``) before acceptance.
        accepted: whether a step was taken (else the parameters are unchanged).
        cg_iterations, cg_residual: the conjugate-gradient solve's diagnostics.
    """

    surrogate_before: float
    surrogate_after: float
    kl: float
    expected_improvement: float
    backtracks: int
    accepted: bool
    cg_iterations: int
    cg_residual: float


def fisher_vector_product(
    kl: Callable[[Params], Tensor], params: Params, damping: float = 0.0
) -> Callable[[Params], Params]:
    r"""``v -> (F + damping I) v`` with :math:`F = \nabla^2 \mathrm{kl}(\theta)` at ``params``,
    by :func:`metagrad.hvp` (reverse over reverse)."""
    point = {k: v.detach() for k, v in params.items()}

    def matvec(v: Params) -> Params:
        hv = hvp(kl, point, v)
        assert isinstance(hv, dict)
        return {k: hv[k] + damping * v[k] for k in hv} if damping else hv

    return matvec


def trpo_step(
    params: Params,
    surrogate: Callable[[Params], Tensor],
    kl: Callable[[Params], Tensor],
    *,
    fisher_kl: Callable[[Params], Tensor] | None = None,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    damping: float = 1e-5,
    backtrack: float = 0.8,
    max_backtracks: int = 15,
) -> tuple[Params, TRPOInfo]:
    r"""One TRPO update of ``params`` (maximizing ``surrogate`` within ``max_kl``).

    Args:
        params: the current parameters (dict of tensors; not modified).
        surrogate: :math:`L(\theta)`, a scalar to maximize.
        kl: mean KL between the sampling policy and the policy at :math:`\theta` (0, with
            zero gradient, at ``params``); it bounds the line search.
        fisher_kl: the KL whose Hessian is the Fisher matrix of the solve (default ``kl``;
            a cheaper estimate, e.g. on a subsample of states, may be given).
        max_kl: the trust region :math:`\delta` (0.01 in the MAML paper).
        cg_iters: conjugate-gradient iterations (10).
        damping: :math:`\lambda` added to the Fisher matrix (1e-5).
        backtrack: line-search shrink factor per try (0.8).
        max_backtracks: tries before the step is rejected (15).

    Returns:
        The new parameters (detached) and a :class:`TRPOInfo`.

    Raises:
        ValueError: ``max_kl``, ``backtrack`` or the counts out of range.

    Example:
        >>> import torch
        >>> p = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> target = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> surrogate = lambda q: q["w"] @ target  # linear objective
        >>> kl = lambda q: 0.5 * (q["w"] - p["w"]).square().sum()  # Fisher = I
        >>> new, info = trpo_step(p, surrogate, kl, max_kl=0.5)
        >>> round(info.kl, 6), info.accepted  # the step lands on the trust region's edge
        (0.5, True)
    """
    fn = "metagrad.rl.trpo_step"
    if not (math.isfinite(max_kl) and max_kl > 0):
        raise ValueError(f"{fn}: max_kl={max_kl!r} must be a finite number > 0.")
    if not 0 < backtrack < 1:
        raise ValueError(f"{fn}: backtrack={backtrack!r} must be in (0, 1).")
    if cg_iters < 1 or max_backtracks < 1:
        raise ValueError(f"{fn}: cg_iters and max_backtracks must be >= 1.")
    old = {k: v.detach() for k, v in params.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in old.items()}
    with torch.enable_grad():
        before = surrogate(leaves)
        grads = torch.autograd.grad(before, list(leaves.values()), allow_unused=True)
    g = {k: torch.zeros_like(v) if d is None else d for (k, v), d in zip(old.items(), grads)}
    surr0 = float(before.detach())
    matvec = fisher_vector_product(kl if fisher_kl is None else fisher_kl, old, damping)
    solve = cg(matvec, g, maxiter=cg_iters)
    x = solve.x
    xfx = float(tree_vdot(x, matvec(x)))
    if not (math.isfinite(xfx) and xfx > 0):
        info = TRPOInfo(surr0, surr0, 0.0, 0.0, 0, False, solve.iterations, solve.residual)
        return old, info
    step_size = math.sqrt(2.0 * max_kl / xfx)
    full = {k: step_size * v for k, v in x.items()}
    expected = float(tree_vdot(g, full))
    for k in range(max_backtracks):
        frac = backtrack**k
        cand = {name: old[name] + frac * full[name] for name in old}
        surr = float(surrogate(cand).detach())
        div = float(kl(cand).detach())
        if math.isfinite(surr) and surr > surr0 and div <= max_kl:
            info = TRPOInfo(surr0, surr, div, expected, k, True, solve.iterations, solve.residual)
            return {name: v.detach() for name, v in cand.items()}, info
    info = TRPOInfo(surr0, surr0, 0.0, expected, max_backtracks, False, solve.iterations,
                    solve.residual)  # fmt: skip
    return old, info
