r"""Matrix-free linear solvers over parameter dicts, for implicit differentiation.

Each solver sees the operator :math:`A` only through ``matvec(v) = A v`` (a Hessian- or
Jacobian-vector product), with vectors stored as :data:`metagrad._typing.Params` so that no
parameter tree is ever flattened into one big vector.

* :func:`cg`: conjugate gradients, for symmetric positive-definite :math:`A` (plus damping).
* :func:`normal_cg`: CG on the normal equations :math:`A^\top A x = A^\top b`, for any
  non-singular :math:`A` (at the price of squaring its condition number).
* :func:`neumann`: the truncated Neumann series, for :math:`A` with
  :math:`\rho(I - \alpha A) < 1` (fixed points of contractions).

All three return a :class:`SolveResult` carrying the iteration count and the relative residual
:math:`\|A x - b\| / \|b\|`, so callers can warn when a solve stopped short.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad._tree import tree_vdot
from metagrad._typing import Params

MatVec = Callable[[Params], Params]
"""A linear operator given by its action: ``matvec(v) = A v`` on parameter dicts."""

__all__ = ["MatVec", "SolveResult", "cg", "neumann", "normal_cg"]


@dataclass(frozen=True)
class SolveResult:
    """The outcome of an iterative linear solve.

    Attributes:
        x: the approximate solution (same keys and shapes as the right-hand side).
        iterations: iterations run (operator products for :func:`neumann`).
        residual: relative residual :math:`\\|A x - b\\| / \\|b\\|` of the system the solver
            iterated on (``0.0`` when :math:`b = 0`; the damped system for ``damping > 0``).
        converged: whether ``residual`` reached the requested tolerance.
        indefinite: :func:`cg` met a direction with :math:`p^\\top A p \\le 0`, so :math:`A` is
            not positive definite and CG's answer is unreliable (it can change completely with
            rounding); ``False`` for the other solvers.
    """

    x: Params
    iterations: int
    residual: float
    converged: bool
    indefinite: bool = False


def _norm(v: Params) -> float:
    return math.sqrt(float(tree_vdot(v, v))) if v else 0.0


def _axpy(a: Tensor | float, x: Params, y: Params) -> Params:
    """``y + a * x`` leafwise (``a`` stays a tensor so no device sync happens per iteration)."""
    return {k: y[k] + a * x[k] for k in y}


def _check_args(
    fn: str, maxiter: int | None, tol: float | None, damping: float, name: str = "maxiter"
) -> None:
    if (maxiter is None and name != "maxiter") or (
        maxiter is not None
        and (not isinstance(maxiter, int) or isinstance(maxiter, bool) or maxiter < 0)
    ):
        raise ValueError(f"{fn}: {name}={maxiter!r} must be an int >= 0.")
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"{fn}: tol={tol!r} must be a finite number >= 0.")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"{fn}: damping={damping!r} must be a finite number >= 0.")


def _check_rhs(fn: str, b: object) -> Params:
    if not isinstance(b, dict) or not all(isinstance(v, Tensor) for v in b.values()):
        raise TypeError(
            f"{fn}: b must be a dict of tensors (a parameter dict), got {type(b).__name__}; "
            f"wrap a single tensor as {{'x': tensor}}."
        )
    return b


def cg(
    matvec: MatVec,
    b: Params,
    *,
    maxiter: int | None = None,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> SolveResult:
    r"""Solve :math:`(A + \delta I)\, x = b` by conjugate gradients, :math:`A` symmetric PD.

    Starting from :math:`x_0 = 0, r_0 = p_0 = b`:

    .. math::
        \alpha_k = \frac{r_k^\top r_k}{p_k^\top (A + \delta I) p_k},\quad
        x_{k+1} = x_k + \alpha_k p_k,\quad
        r_{k+1} = r_k - \alpha_k (A + \delta I) p_k,\quad
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k,

    stopping once :math:`\|r_k\| \le \mathrm{tol}\,\|b\|`. With ``damping=0`` these are exactly
    the iterates of the list-based ``conjugate_gradient`` used by :class:`metagrad.IMAML`.

    Args:
        matvec: ``v -> A v`` on parameter dicts; :math:`A` symmetric positive definite (or
            semi-definite with ``damping > 0``).
        b: right-hand side.
        maxiter: maximum iterations (default: the number of unknowns, where CG is exact in
            exact arithmetic).
        tol: relative residual at which to stop.
        damping: :math:`\delta \ge 0` added to the diagonal (Tikhonov regularisation).

    Returns:
        A :class:`SolveResult`; ``residual`` is the recursively updated :math:`\|r\|/\|b\|`.

    Raises:
        TypeError: ``b`` is not a dict of tensors.
        ValueError: a negative or non-finite ``maxiter``, ``tol`` or ``damping``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> res = cg(lambda v: {"x": A @ v["x"]}, {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)})
        >>> res.x["x"], res.iterations, res.converged
        (tensor([0.0909, 0.6364], dtype=torch.float64), 2, True)
    """
    fn = "metagrad.bilevel.cg"
    _check_args(fn, maxiter, tol, damping)
    b = _check_rhs(fn, b)
    n = sum(t.numel() for t in b.values())
    steps = n if maxiter is None else maxiter

    def op(v: Params) -> Params:
        av = matvec(v)
        return _axpy(damping, v, av) if damping else av

    x = {k: torch.zeros_like(t) for k, t in b.items()}
    r = {k: t.clone() for k, t in b.items()}
    p = {k: t.clone() for k, t in b.items()}
    rs = tree_vdot(r, r) if b else torch.zeros(())
    # float(t.sqrt()) as in IMAML's solver, so the stopping test sees identical numbers.
    b_norm = float(rs.sqrt())
    if b_norm == 0.0:
        # x = 0 solves it exactly; iterating would divide 0 by 0.
        return SolveResult(x, 0, 0.0, True)
    it = 0
    indefinite = False
    floor = _rounding_floor(b)
    r_norm = b_norm  # float(rs.sqrt()) of the current residual
    for it in range(1, steps + 1):  # noqa: B007 (the count is returned)
        ap = op(p)
        pap = tree_vdot(p, ap)
        # CG assumes p^T A p > 0; below the rounding floor of the residual a PD system can
        # show p^T A p <= 0 from rounding alone, so only a live direction counts.
        live = r_norm > floor * b_norm
        indefinite = indefinite or (live and float(pap) <= 0.0)
        alpha = rs / pap
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = tree_vdot(r, r)
        r_norm = float(rs_new.sqrt())
        if r_norm <= tol * b_norm:
            rs = rs_new
            break
        p = _axpy(rs_new / rs, p, r)
        rs = rs_new
    residual = float(rs.sqrt()) / b_norm
    return SolveResult(x, it, residual, residual <= tol, indefinite)


def _rounding_floor(b: Params) -> float:
    """sqrt(machine epsilon) of ``b``'s dtype: the relative residual below which CG's
    curvature signs are rounding noise."""
    t = next(iter(b.values()))
    return float(torch.finfo(t.dtype).eps) ** 0.5 if t.is_floating_point() else 0.0


def normal_cg(
    matvec: MatVec,
    rmatvec: MatVec,
    b: Params,
    *,
    maxiter: int | None = None,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> SolveResult:
    r"""Solve a general non-singular :math:`A x = b` by CG on the normal equations.

    .. math::
        (A^\top A + \delta I)\, x = A^\top b

    is symmetric positive definite for any non-singular :math:`A`, so :func:`cg` applies;
    each iteration costs one product with :math:`A` and one with :math:`A^\top`, and the
    condition number is squared, so prefer :func:`cg` when :math:`A` is symmetric PD.

    Args:
        matvec: ``v -> A v``.
        rmatvec: ``v -> A^T v``.
        b: right-hand side.
        maxiter: maximum CG iterations (default: the number of unknowns).
        tol: stop when the normal-equations residual
            :math:`\|A^\top (b - A x)\|` falls below ``tol`` times :math:`\|A^\top b\|`.
        damping: :math:`\delta \ge 0` added to :math:`A^\top A`.

    Returns:
        A :class:`SolveResult` whose ``residual`` is the true :math:`\|A x - b\| / \|b\|` of the
        original (undamped) system, evaluated with one extra ``matvec``; ``converged`` reports
        the normal-equations criterion above.

    Raises:
        TypeError: ``b`` is not a dict of tensors.
        ValueError: a negative or non-finite ``maxiter``, ``tol`` or ``damping``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
        >>> res = normal_cg(lambda v: {"x": A @ v["x"]}, lambda v: {"x": A.T @ v["x"]},
        ...                 {"x": torch.tensor([3.0, 1.0], dtype=torch.float64)})
        >>> res.x["x"], res.converged
        (tensor([1.0000, 1.0000], dtype=torch.float64), True)
    """
    fn = "metagrad.bilevel.normal_cg"
    _check_args(fn, maxiter, tol, damping)
    b = _check_rhs(fn, b)
    inner = cg(lambda v: rmatvec(matvec(v)), rmatvec(b), maxiter=maxiter, tol=tol, damping=damping)
    b_norm = _norm(b)
    if b_norm == 0.0:
        return SolveResult(inner.x, inner.iterations, 0.0, True)
    ax = matvec(inner.x)
    residual = _norm({k: ax[k] - b[k] for k in b}) / b_norm
    return SolveResult(inner.x, inner.iterations, residual, inner.converged)


def neumann(
    matvec: MatVec,
    b: Params,
    *,
    steps: int,
    alpha: float = 1.0,
    tol: float | None = None,
) -> SolveResult:
    r"""Approximate :math:`A^{-1} b` by the truncated Neumann series.

    .. math::
        x_k = \alpha \sum_{j<k} (I - \alpha A)^j\, b,
        \qquad A x_k - b = -(I - \alpha A)^k\, b,

    which converges iff the spectral radius :math:`\rho(I - \alpha A) < 1`. For a fixed point
    :math:`w = T(w)` one has :math:`A = I - \partial T/\partial w` and, with :math:`\alpha = 1`,
    the series is :math:`\sum_j (\partial T/\partial w)^j b` (recurrent backpropagation). The
    identity above gives the residual for free: it is the next term of the series.

    Args:
        matvec: ``v -> A v``.
        b: right-hand side.
        steps: number of series terms :math:`k` (each costs one ``matvec``, the last one
            computes the residual).
        alpha: step size :math:`\alpha > 0`; for symmetric PD :math:`A` any
            :math:`\alpha < 2/\lambda_{\max}(A)` converges.
        tol: if given, stop early once :math:`\|A x - b\| \le \mathrm{tol}\,\|b\|`, and report
            ``converged`` against it (``None``: run all ``steps``, ``converged=True``).

    Returns:
        A :class:`SolveResult` (``iterations``: series terms summed).

    Raises:
        TypeError: ``b`` is not a dict of tensors.
        ValueError: negative ``steps`` or a non-positive ``alpha``.

    Example:
        >>> import torch
        >>> J = torch.tensor([[0.5, 0.1], [0.0, 0.5]], dtype=torch.float64)  # dT/dw, a contraction
        >>> res = neumann(lambda v: {"x": v["x"] - J @ v["x"]}, {"x": torch.ones(2, dtype=torch.float64)},
        ...               steps=200, tol=1e-12)
        >>> res.x["x"], res.converged
        (tensor([2.4000, 2.0000], dtype=torch.float64), True)
    """
    fn = "metagrad.bilevel.neumann"
    _check_args(fn, steps, tol, 0.0, name="steps")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{fn}: alpha={alpha!r} must be a finite number > 0.")
    b = _check_rhs(fn, b)
    b_norm = _norm(b)
    if b_norm == 0.0 or steps == 0:
        return SolveResult(
            {k: torch.zeros_like(t) for k, t in b.items()},
            0,
            0.0 if b_norm == 0.0 else 1.0,
            b_norm == 0.0 or tol is None,
        )
    term = b  # (I - alpha A)^j b
    acc = {k: t.clone() for k, t in b.items()}
    it = 0
    residual = 1.0
    for it in range(1, steps + 1):
        a_term = matvec(term)
        term = _axpy(-alpha, a_term, term)
        residual = _norm(term) / b_norm
        if it == steps or (tol is not None and residual <= tol):
            break
        acc = {k: acc[k] + term[k] for k in acc}
    x = {k: alpha * v for k, v in acc.items()}
    return SolveResult(x, it, residual, tol is None or residual <= tol)
