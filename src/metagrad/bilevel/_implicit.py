r"""Implicit differentiation of inner solutions: :func:`custom_root` and :func:`fixed_point`.

A bilevel problem solves an inner problem for :math:`w^\star(h)` and differentiates an outer
loss :math:`L(w^\star(h), h)` in the hyperparameters :math:`h`. Instead of backpropagating
through the inner iterations, write the inner solution as a root of an optimality condition
:math:`F(w^\star(h), h) = 0` (for a minimiser of :math:`f`, :math:`F = \nabla_w f`). The implicit
function theorem then gives

.. math::
    \frac{\partial w^\star}{\partial h} = -\Big(\frac{\partial F}{\partial w}\Big)^{-1}
    \frac{\partial F}{\partial h},
    \qquad
    \frac{dL}{dh} = -\Big(\frac{\partial F}{\partial h}\Big)^{\!\top} u
    \quad\text{with}\quad \Big(\frac{\partial F}{\partial w}\Big)^{\!\top} u =
    \frac{\partial L}{\partial w^\star},

one linear solve per backward pass whose cost does not depend on how :math:`w^\star` was found.
Both products, :math:`(\partial F/\partial w)^\top u` (a Hessian-vector product when
:math:`F = \nabla_w f`) and :math:`(\partial F/\partial h)^\top u`, are vector-Jacobian products by
reverse mode on one graph of :math:`F` rebuilt at the detached solution.

The idea follows jaxopt's ``custom_root`` (Blondel et al., 2022); the code is metagrad's own.

References:
    M. Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from metagrad._tree import tree_vdot
from metagrad._typing import Params
from metagrad.bilevel._foreign import foreign_leaves
from metagrad.bilevel._linsolve import MatVec, SolveResult, cg, neumann, normal_cg

__all__ = ["ImplicitSolver", "RootInfo", "custom_root", "fixed_point"]

OptimalityFn = Callable[..., Params]
"""``F(w, h, *args) -> Params`` with the keys and shapes of ``w``; zero at the solution."""

InnerSolver = Callable[..., Params]
"""``solver(w_init, h, *args) -> w_star`` (any method; its graph is discarded)."""

LinearSolve = Callable[[MatVec, Params], "Params | SolveResult"]
"""``(matvec, b) -> x`` solving ``matvec(x) = b``; may return a :class:`SolveResult`."""

_SOLVES = ("cg", "normal_cg", "neumann")


@dataclass(frozen=True)
class RootInfo:
    """Diagnostics of the last call of an :class:`ImplicitSolver` (and of its backward).

    Attributes:
        residual: optimality residual :math:`\\|F(w^\\star, h)\\| / (1 + \\|w^\\star\\|)` at the
            returned solution (norms over all leaves together).
        residual_tol: the tolerance it was checked against.
        solve_iterations: iterations of the linear solve of the last backward (``None`` until
            a backward ran, or for a callable ``solve`` returning a plain dict).
        solve_residual: its relative residual :math:`\\|A^\\top u - b\\| / \\|b\\|`.
        solve_converged: whether it reached ``tol``.
        solve_indefinite: whether ``solve="cg"`` met non-positive curvature (``dF/dw`` not
            positive definite: the hypergradient is unreliable).
    """

    residual: float
    residual_tol: float
    solve_iterations: int | None = None
    solve_residual: float | None = None
    solve_converged: bool | None = None
    solve_indefinite: bool | None = None


@dataclass(frozen=True)
class _Options:
    fn_name: str
    solve: str | LinearSolve
    maxiter: int
    tol: float
    damping: float
    residual_tol: float
    symmetric: bool
    allow_unused: bool


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_options(
    fn_name: str,
    solve: object,
    maxiter: object,
    tol: object,
    damping: object,
    residual_tol: object,
    symmetric: object,
    allow_unused: object,
) -> _Options:
    if isinstance(solve, str):
        if solve not in _SOLVES:
            raise ValueError(
                f"{fn_name}: unknown solve={solve!r}; use one of {list(_SOLVES)} or a callable "
                f"(matvec, b) -> x. 'cg' needs dF/dw symmetric positive definite (F the gradient "
                f"of a strongly convex loss), 'normal_cg' works for any non-singular dF/dw, "
                f"'neumann' needs the spectral radius of I - dF/dw below 1."
            )
    elif not callable(solve):
        raise TypeError(
            f"{fn_name}: solve must be a name in {list(_SOLVES)} or a callable (matvec, b) -> x, "
            f"got {type(solve).__name__}."
        )
    if not isinstance(maxiter, int) or isinstance(maxiter, bool) or maxiter < 1:
        raise ValueError(f"{fn_name}: maxiter={maxiter!r} must be an int >= 1.")
    for name, value in (("tol", tol), ("damping", damping), ("residual_tol", residual_tol)):
        if not (_is_number(value) and value >= 0):  # type: ignore[operator]
            raise ValueError(f"{fn_name}: {name}={value!r} must be a finite number >= 0.")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise TypeError(f"{fn_name}: symmetric={symmetric!r} must be True, False or None.")
    if solve == "cg" and symmetric is False:
        raise ValueError(
            f"{fn_name}: solve='cg' needs a symmetric dF/dw but symmetric=False was given; use "
            f"solve='normal_cg' for a non-symmetric dF/dw."
        )
    if not isinstance(allow_unused, bool):
        raise TypeError(f"{fn_name}: allow_unused={allow_unused!r} must be True or False.")
    return _Options(
        fn_name=fn_name,
        solve=solve,  # type: ignore[arg-type]
        maxiter=maxiter,
        tol=float(tol),  # type: ignore[arg-type]
        damping=float(damping),  # type: ignore[arg-type]
        residual_tol=float(residual_tol),  # type: ignore[arg-type]
        symmetric=(solve == "cg") if symmetric is None else symmetric,
        allow_unused=allow_unused,
    )


def _check_params(fn_name: str, what: str, value: object, fix: str) -> Params:
    """A ``dict[str, Tensor]`` or a TypeError naming ``what`` and how to fix it."""
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{fn_name}: {what} must be a dict[str, Tensor], got {type(value).__name__}; {fix}"
        )
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(
                f"{fn_name}: {what} must be a dict[str, Tensor], but its entry {k!r} is a "
                f"{type(v).__name__}; {fix}"
            )
    return dict(value)


def _check_like(fn_name: str, what: str, value: object, like: Params, fix: str) -> Params:
    """``value`` must have exactly the keys, shapes and dtypes of ``like`` (the solution w)."""
    out = _check_params(fn_name, what, value, fix)
    if set(out) != set(like):
        raise ValueError(
            f"{fn_name}: {what} has keys {sorted(out)} but the solution w has keys {sorted(like)}; "
            f"{fix}"
        )
    for k, t in like.items():
        if out[k].shape != t.shape:
            raise ValueError(
                f"{fn_name}: {what}[{k!r}] has shape {tuple(out[k].shape)} but w[{k!r}] has shape "
                f"{tuple(t.shape)}; {fix}"
            )
        if out[k].dtype != t.dtype:
            raise TypeError(
                f"{fn_name}: {what}[{k!r}] has dtype {out[k].dtype} but w[{k!r}] has dtype "
                f"{t.dtype}; {fix}"
            )
    return {k: out[k] for k in like}  # w's key order, so leaves line up


def _norm(v: Params) -> float:
    return math.sqrt(float(tree_vdot(v, v))) if v else 0.0


def _vjp_or_none(
    outputs: list[Tensor],
    inputs: list[Tensor],
    cotangents: list[Tensor],
    create_graph: bool = False,
) -> list[Tensor | None]:
    """``sum_i cotangents[i]^T d outputs[i] / d inputs``; ``None`` where there is no path."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not (pairs and inputs):
        return [None] * len(inputs)
    return list(
        torch.autograd.grad(
            [o for o, _ in pairs],
            inputs,
            grad_outputs=[c for _, c in pairs],
            retain_graph=True,  # one graph of F serves every product of the solve
            create_graph=create_graph,
            allow_unused=True,
        )
    )


def _vjp(
    outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor], create_graph: bool
) -> list[Tensor]:
    """As :func:`_vjp_or_none` with zeros where there is no dependence."""
    got = _vjp_or_none(outputs, inputs, cotangents, create_graph)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


@dataclass
class _Graph:
    """One evaluation of F at the detached solution, kept for the backward's products."""

    solver: ImplicitSolver
    keys: list[str]  # keys of w (and of F)
    w: list[Tensor]  # leaves requiring grad
    F: list[Tensor]
    h_keys: list[str]
    h: list[Tensor]  # detached copies of h, requiring grad where the originals do
    foreign: list[Tensor]  # leaves requiring grad that F closes over (not in w or h)


class _ImplicitBackward(torch.autograd.Function):
    """Identity on the solution in the forward; the implicit-function-theorem VJP backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, graph: _Graph, w_star: list[Tensor], *h_and_foreign: Tensor
    ) -> Any:
        ctx.graph = graph  # type: ignore[attr-defined]
        return tuple(w_star)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, *grads: Tensor) -> Any:
        graph: _Graph = ctx.graph  # type: ignore[attr-defined]
        grads_h = graph.solver._backward(graph, list(grads))
        return (None, None, *grads_h)


class ImplicitSolver:
    """An inner solver whose output is differentiated implicitly (made by :func:`custom_root`).

    Call it as the undecorated solver, ``solver(w_init, h, *args) -> w_star``. The returned
    tensors carry a graph to the tensors of ``h`` that require grad, so ``loss.backward()`` and
    ``torch.autograd.grad`` give the implicit hypergradient, added to any other path from the
    loss to ``h``. Tensors that require grad and that ``F`` closes over (a learnable loss weight
    read from the enclosing scope) are hyperparameters too: the graph reaches them with
    :math:`-(\\partial F/\\partial \\phi)^\\top u`, so they are never silently left without a
    gradient.

    Attributes:
        last_result: :class:`RootInfo` of the latest call, replaced (with the linear solve's
            iterations and residual) by each backward through that call's output; ``None``
            before the first call.
    """

    def __init__(self, solver: InnerSolver, optimality_fn: OptimalityFn, options: _Options):
        if not callable(solver):
            raise TypeError(
                f"{options.fn_name}: the decorated object must be a callable "
                f"solver(w_init, h, *args) -> w_star, got {type(solver).__name__}."
            )
        self.solver = solver
        self.optimality_fn = optimality_fn
        self.options = options
        self.last_result: RootInfo | None = None
        self.__name__ = getattr(solver, "__name__", type(solver).__name__)
        self.__qualname__ = getattr(solver, "__qualname__", self.__name__)
        self.__doc__ = getattr(solver, "__doc__", None)
        self.__wrapped__ = solver

    def __repr__(self) -> str:
        return f"{self.options.fn_name}(...)({self.__qualname__})"

    def __call__(self, w_init: Params, h: Params, *args: Any) -> Params:
        opts, name = self.options, self.__qualname__
        fn = opts.fn_name
        h = _check_params(fn, "h", h, "pass the hyperparameters as a dict, e.g. {'lam': lam}.")
        w_init = _check_params(fn, "w_init", w_init, "pass the inner parameters as a dict.")
        grad_on = torch.is_grad_enabled()
        for i, a in enumerate(args):
            # Only h is differentiated: a tensor in args that requires grad would silently get
            # no gradient through w*.
            if grad_on and isinstance(a, Tensor) and a.requires_grad:
                raise ValueError(
                    f"{fn}: args[{i}] of {name!r} requires grad, but the implicit gradient flows "
                    f"only to h. Move it into h to get its hypergradient, or pass args[{i}].detach()."
                )
        h_detached = {k: v.detach() for k, v in h.items()}
        w_star = _check_params(
            fn,
            f"the output of {name!r}",
            self.solver(w_init, h_detached, *args),
            "the solver must return the inner parameters as a dict[str, Tensor].",
        )
        for k, v in w_star.items():
            if not v.is_floating_point() and not v.is_complex():
                raise TypeError(
                    f"{fn}: the output of {name!r} has {k!r} of dtype {v.dtype}; the solution must "
                    f"be floating point to be differentiated."
                )
        w_leaves = {k: v.detach().requires_grad_(True) for k, v in w_star.items()}
        h_leaves = {k: v.detach().requires_grad_(grad_on and v.requires_grad) for k, v in h.items()}
        with torch.enable_grad():  # F may call torch.autograd.grad (F = grad of a loss)
            F = self._optimality(w_leaves, h_leaves, *args)
        # Closed-over tensors reach F's graph as leaves that are neither w nor h: they are
        # differentiated like h (dF/dphi^T u) instead of silently getting no gradient.
        foreign = (
            foreign_leaves(
                [f for f in F.values() if f.requires_grad], [*w_leaves.values(), *h_leaves.values()]
            )
            if grad_on
            else []
        )
        needs = grad_on and (any(v.requires_grad for v in h.values()) or bool(foreign))
        residual = _norm({k: v.detach() for k, v in F.items()}) / (
            1.0 + _norm({k: v.detach() for k, v in w_star.items()})
        )
        if not math.isfinite(residual):
            raise FloatingPointError(
                f"{fn}: the optimality residual of {name!r}'s solution is {residual} (NaN/Inf in "
                f"w* or in F(w*, h)). Fix: check the inner solver for divergence (lower its step "
                f"size) and the data for NaN/Inf."
            )
        self.last_result = RootInfo(residual, opts.residual_tol)
        if residual > opts.residual_tol:
            warnings.warn(
                f"{fn}: {name!r} returned w with optimality residual ||F(w, h)|| / (1 + ||w||) = "
                f"{residual:.3e} > residual_tol={opts.residual_tol:.1e}; the implicit hypergradient "
                f"assumes F(w, h) = 0 and is only as accurate as this residual. Fix: run more inner "
                f"iterations or use a smaller tolerance in {name!r} (or raise residual_tol if this "
                f"accuracy is enough).",
                RuntimeWarning,
                stacklevel=2,
            )
        detached = [v.detach() for v in w_star.values()]
        if not needs:
            return dict(zip(w_star, detached))
        graph = _Graph(
            solver=self,
            keys=list(w_star),
            w=list(w_leaves.values()),
            F=list(F.values()),
            h_keys=list(h),
            h=list(h_leaves.values()),
            foreign=foreign,
        )
        out = _ImplicitBackward.apply(graph, detached, *h.values(), *foreign)
        return dict(zip(w_star, out))

    def _optimality(self, w: Params, h: Params, *args: Any) -> Params:
        fix = (
            "the optimality function must return a dict with exactly the keys, shapes and dtypes "
            "of w (F(w, h) = 0 at the solution, e.g. the gradient of the inner loss)."
        )
        return _check_like(
            self.options.fn_name,
            f"optimality_fn {getattr(self.optimality_fn, '__qualname__', 'F')!r}(w, h)",
            self.optimality_fn(w, h, *args),
            w,
            fix,
        )

    def _backward(self, graph: _Graph, grads: list[Tensor]) -> list[Tensor | None]:
        opts, name = self.options, self.__qualname__
        keys = graph.keys
        # dL/dw*; detached, so a create_graph=True backward builds no graph through the solve.
        b = {k: g.detach() for k, g in zip(keys, grads)}

        def at(u: Params) -> Params:  # (dF/dw)^T u, a Hessian-vector product for F = grad f
            return dict(zip(keys, _vjp(graph.F, graph.w, [u[k] for k in keys], False)))

        def at_damped(u: Params) -> Params:
            out = at(u)
            return {k: out[k] + opts.damping * u[k] for k in keys} if opts.damping else out

        with torch.enable_grad():
            result = self._solve(graph, at, at_damped, b)
        u = result.x
        if not all(bool(t.isfinite().all()) for t in u.values()):
            raise FloatingPointError(
                f"{opts.fn_name}: the linear solve for the hypergradient of {name!r} produced "
                f"NaN/Inf. Fix: add damping > 0 (dF/dw may be singular or indefinite), or use "
                f"solve='normal_cg' if dF/dw is not symmetric positive definite."
            )
        if result.indefinite:
            warnings.warn(
                f"{opts.fn_name}: CG met non-positive curvature (p^T A p <= 0) in the linear "
                f"solve for the hypergradient of {name!r}: dF/dw is not positive definite at "
                f"the solution, so the hypergradient is unreliable. Fix: add damping, or use "
                f"solve='normal_cg' if dF/dw is not symmetric positive definite.",
                RuntimeWarning,
                stacklevel=2,
            )
        if not result.converged:
            warnings.warn(
                f"{opts.fn_name}: the linear solve (solve={self._solve_label()}) for the "
                f"hypergradient of {name!r} stopped after {result.iterations} iterations at "
                f"relative residual {result.residual:.3e} > tol={opts.tol:.1e}. Fix: raise maxiter, "
                f"add damping if dF/dw is ill-conditioned, or use solve='normal_cg' if dF/dw is "
                f"not symmetric positive definite.",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.last_result is not None:
            solved = result.iterations >= 0
            self.last_result = dataclasses.replace(
                self.last_result,
                solve_iterations=result.iterations if solved else None,
                solve_residual=result.residual if solved else None,
                solve_converged=result.converged if solved else None,
                solve_indefinite=result.indefinite if solved else None,
            )
        with torch.enable_grad():
            # dL/dh = -(dF/dh)^T u, only for the h leaves that require grad (and the
            # closed-over leaves, which require grad by construction).
            wanted = [i for i, t in enumerate(graph.h) if t.requires_grad]
            vjps_all = _vjp_or_none(
                graph.F, [*(graph.h[i] for i in wanted), *graph.foreign], [u[k] for k in keys]
            )
        vjps, vjps_foreign = vjps_all[: len(wanted)], vjps_all[len(wanted) :]
        unused = [graph.h_keys[i] for i, g in zip(wanted, vjps) if g is None]
        if unused and not opts.allow_unused:
            raise ValueError(
                f"{opts.fn_name}: the optimality function of {name!r} does not depend on "
                f"h[{unused[0]!r}] (unused: {unused}), so its implicit hypergradient is zero. "
                f"Fix: use that hyperparameter in F, remove it from h (or stop it requiring "
                f"grad), or pass allow_unused=True to accept zeros."
            )
        out: list[Tensor | None] = [None] * len(graph.h)
        for i, g in zip(wanted, vjps):
            out[i] = torch.zeros_like(graph.h[i]) if g is None else -g
        return out + [None if g is None else -g for g in vjps_foreign]

    def _solve_label(self) -> str:
        s = self.options.solve
        return repr(s) if isinstance(s, str) else getattr(s, "__qualname__", "callable")

    def _solve(self, graph: _Graph, at: MatVec, at_damped: MatVec, b: Params) -> SolveResult:
        """Solve ``(dF/dw)^T u = b`` by the configured method."""
        opts = self.options
        if opts.solve == "cg":
            return cg(at, b, maxiter=opts.maxiter, tol=opts.tol, damping=opts.damping)
        if opts.solve == "neumann":
            return neumann(at_damped, b, steps=opts.maxiter, tol=opts.tol)
        if opts.solve == "normal_cg":
            rmatvec = at if opts.symmetric else self._jvp_fn(graph)
            return normal_cg(
                at, rmatvec, b, maxiter=opts.maxiter, tol=opts.tol, damping=opts.damping
            )
        assert callable(opts.solve)  # checked in _check_options
        x = opts.solve(at_damped, b)
        if isinstance(x, SolveResult):
            return x
        x = _check_like(
            opts.fn_name,
            f"the output of solve {self._solve_label()}",
            x,
            b,
            "a callable solve must return x (a dict like b) or a SolveResult.",
        )
        return SolveResult(x, -1, float("nan"), True)  # no diagnostics from a plain dict

    def _jvp_fn(self, graph: _Graph) -> MatVec:
        r"""``t -> (dF/dw) t`` by reverse over reverse, for F with no forward-mode rule.

        :math:`g(c) = (\partial F/\partial w)^\top c` is linear in a dummy cotangent :math:`c`,
        so its VJP with :math:`t` is :math:`(\partial F/\partial w)\, t`.
        """
        keys = graph.keys
        dummy = [torch.zeros_like(f, requires_grad=True) for f in graph.F]
        g = _vjp(graph.F, graph.w, dummy, True)

        def jvp(t: Params) -> Params:
            with torch.enable_grad():
                return dict(zip(keys, _vjp(g, dummy, [t[k] for k in keys], False)))

        return jvp


def _decorator(
    fn_name: str, optimality_fn: OptimalityFn, options: _Options
) -> Callable[[InnerSolver], ImplicitSolver]:
    if not callable(optimality_fn):
        raise TypeError(
            f"{fn_name}: the first argument must be a callable F(w, h, *args) -> dict like w, "
            f"got {type(optimality_fn).__name__}. Usage: @{fn_name.rsplit('.', 1)[-1]}(F)."
        )

    def wrap(solver: InnerSolver) -> ImplicitSolver:
        return ImplicitSolver(solver, optimality_fn, options)

    return wrap


def custom_root(
    optimality_fn: OptimalityFn,
    *,
    solve: str | LinearSolve = "cg",
    maxiter: int = 100,
    tol: float = 1e-10,
    damping: float = 0.0,
    residual_tol: float = 1e-6,
    symmetric: bool | None = None,
    allow_unused: bool = False,
) -> Callable[[InnerSolver], ImplicitSolver]:
    r"""Decorate an inner solver so its solution is differentiated by the implicit function theorem.

    With :math:`F(w^\star, h) = 0` at the solution returned by ``solver``, the backward pass of
    any loss :math:`L(w^\star)` solves the transposed linear system and returns

    .. math::
        \Big(\frac{\partial F}{\partial w}\Big)^{\!\top} u = \frac{\partial L}{\partial w^\star},
        \qquad
        \frac{dL}{dh} = -\Big(\frac{\partial F}{\partial h}\Big)^{\!\top} u .

    The solver runs on a detached ``h`` and its own graph (if any) is discarded, so it may be
    anything: a closed form, many gradient steps, L-BFGS. The tensors of ``h`` receive
    gradients, and so does any tensor requiring grad that ``F`` closes over (it is a
    hyperparameter of the root too: :math:`-(\partial F/\partial \phi)^\top u`); ``w_init``
    gets none (a unique root does not depend on the starting point), and a tensor in ``args``
    that requires grad raises a ``ValueError`` (put it in ``h`` instead).
    The returned tensors are differentiable once (no gradients of hypergradients).

    After the solver returns, the residual :math:`\|F(w^\star, h)\| / (1 + \|w^\star\|)` (norms
    over all leaves: relative for large :math:`w`, absolute near 0) is checked against
    ``residual_tol``, and each backward checks that the linear solve reached ``tol``; both
    emit a ``RuntimeWarning`` saying what to change. The values are in ``.last_result``.

    Args:
        optimality_fn: ``F(w, h, *args) -> Params`` with the keys, shapes and dtypes of ``w``,
            zero at the solution; e.g. the gradient of the inner loss
            (``torch.autograd.grad(..., create_graph=True)`` inside is fine).
        solve: how to solve the system with :math:`A = (\partial F/\partial w)^\top` (plus
            ``damping * I``): ``"cg"`` when :math:`\partial F/\partial w` is symmetric positive
            definite (:math:`F = \nabla_w f` with :math:`f` strongly convex: a Hessian),
            ``"normal_cg"`` for any non-singular :math:`\partial F/\partial w` (CG on the normal
            equations; with ``symmetric=False`` its products with :math:`A^\top` use reverse
            over reverse), ``"neumann"`` when :math:`\rho(I - A) < 1`, or a callable
            ``(matvec, b) -> x`` (a dict, or a :class:`~metagrad.bilevel._linsolve.SolveResult`
            for diagnostics) given the damped operator.
        maxiter: iterations of the linear solve (series terms for ``"neumann"``).
        tol: relative residual :math:`\|A u - b\| / \|b\|` the linear solve must reach
            (for ``"normal_cg"``: of the normal equations).
        damping: :math:`\delta \ge 0` added as :math:`A + \delta I` (``"cg"``, ``"neumann"``, a
            callable) or :math:`A^\top A + \delta I` (``"normal_cg"``): a regulariser for
            ill-conditioned :math:`A` that biases the hypergradient.
        residual_tol: largest optimality residual accepted without a warning.
        symmetric: whether :math:`\partial F/\partial w` is symmetric (``None``: ``True`` for
            ``"cg"``, else ``False``); ``True`` lets ``"normal_cg"`` skip reverse over reverse.
        allow_unused: accept hyperparameters that ``F`` does not depend on (zero hypergradient)
            instead of raising in the backward.

    Returns:
        A decorator turning ``solver(w_init, h, *args) -> w_star`` into an
        :class:`ImplicitSolver` with the same call signature.

    Raises:
        ValueError: an unknown ``solve`` name, invalid numeric options, ``solve="cg"`` with
            ``symmetric=False``; at call time a tensor in ``args`` requiring grad, an ``F`` with
            other keys or shapes than ``w``; in the backward an unused hyperparameter.
        TypeError: ``h``, ``w_init``, the solver's output or ``F``'s output is not a
            ``dict[str, Tensor]``.
        FloatingPointError: NaN/Inf in the residual or in the linear solve.

    Example:
        >>> import torch
        >>> from metagrad.bilevel import custom_root
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(20, 3, dtype=torch.float64, generator=g)
        >>> y = torch.randn(20, dtype=torch.float64, generator=g)
        >>> def F(w, h):  # gradient of 0.5 ||X w - y||^2 + 0.5 lam ||w||^2
        ...     return {"w": X.T @ (X @ w["w"] - y) + h["lam"] * w["w"]}
        >>> @custom_root(F)
        ... def ridge(w_init, h):
        ...     A = X.T @ X + h["lam"] * torch.eye(3, dtype=torch.float64)
        ...     return {"w": torch.linalg.solve(A, X.T @ y)}
        >>> lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> w = ridge({"w": torch.zeros(3, dtype=torch.float64)}, {"lam": lam})
        >>> w["w"].sum().backward()  # d/dlam sum(w*) = -1^T (X^T X + lam I)^{-1} w*
        >>> A = X.T @ X + 0.5 * torch.eye(3, dtype=torch.float64)
        >>> bool(torch.isclose(lam.grad, -torch.linalg.solve(A, w["w"].detach()).sum()))
        True
        >>> ridge.last_result.solve_converged
        True

    References:
        M. Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022.
    """
    fn_name = "metagrad.bilevel.custom_root"
    options = _check_options(
        fn_name, solve, maxiter, tol, damping, residual_tol, symmetric, allow_unused
    )
    return _decorator(fn_name, optimality_fn, options)


def fixed_point(
    T: OptimalityFn,
    *,
    solve: str | LinearSolve = "neumann",
    maxiter: int = 1000,
    tol: float = 1e-10,
    damping: float = 0.0,
    residual_tol: float = 1e-6,
    symmetric: bool | None = None,
    allow_unused: bool = False,
) -> Callable[[InnerSolver], ImplicitSolver]:
    r"""Decorate a solver of :math:`w = T(w, h)` for implicit differentiation.

    The optimality condition is :math:`F(w, h) = w - T(w, h)` (the sign makes
    :math:`\partial F/\partial w = I - \partial T/\partial w`, positive definite for a
    gradient-descent map :math:`T = w - \eta \nabla f`), so

    .. math::
        \frac{dL}{dh} = \Big(\frac{\partial T}{\partial h}\Big)^{\!\top} u,
        \qquad
        u = \Big(I - \frac{\partial T}{\partial w}\Big)^{-\top} \frac{\partial L}{\partial w^\star}
          = \sum_{j \ge 0} \Big(\frac{\partial T}{\partial w}\Big)^{\!\top j}
            \frac{\partial L}{\partial w^\star}.

    The default ``solve="neumann"`` sums that series: it converges exactly when
    :math:`\rho(\partial T/\partial w) < 1` at :math:`w^\star`, the same local condition under
    which iterating :math:`T` converges, and at the same rate, so a solver that reached its
    fixed point by iteration has a backward that converges too; each term is a single VJP of
    :math:`T` and needs no double backward (hence the larger default ``maxiter``; it stops early
    at ``tol``). Use ``"normal_cg"`` when :math:`T` is not a contraction but
    :math:`I - \partial T/\partial w` is non-singular, or ``"cg"`` when :math:`T` is a gradient
    step of a strongly convex loss (symmetric :math:`\partial T/\partial w`). The residual checked
    is :math:`\|w^\star - T(w^\star, h)\| / (1 + \|w^\star\|)`.

    Args:
        T: ``T(w, h, *args) -> Params`` with the keys, shapes and dtypes of ``w``.
        solve: ``"neumann"``, ``"normal_cg"``, ``"cg"`` or a callable, as in :func:`custom_root`.
        maxiter: iterations of the linear solve.
        tol: relative residual the linear solve must reach.
        damping: as in :func:`custom_root`.
        residual_tol: largest fixed-point residual accepted without a warning.
        symmetric: whether :math:`\partial T/\partial w` is symmetric (``None``: only for ``"cg"``).
        allow_unused: accept hyperparameters that ``T`` does not depend on.

    Returns:
        A decorator turning ``solver(w_init, h, *args) -> w_star`` into an
        :class:`ImplicitSolver`.

    Raises:
        ValueError, TypeError, FloatingPointError: as in :func:`custom_root`, naming
            ``metagrad.bilevel.fixed_point``.

    Example:
        >>> import torch
        >>> from metagrad.bilevel import fixed_point
        >>> def T(w, h):  # a contraction with fixed point w* = h["b"] / (1 - 0.5) = 2 b
        ...     return {"w": 0.5 * w["w"] + h["b"]}
        >>> @fixed_point(T)
        ... def iterate(w_init, h):
        ...     w = w_init
        ...     for _ in range(100):
        ...         w = T(w, h)
        ...     return w
        >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> w = iterate({"w": torch.zeros(2, dtype=torch.float64)}, {"b": b})
        >>> w["w"].sum().backward()
        >>> torch.allclose(b.grad, torch.full((2,), 2.0, dtype=torch.float64))  # dw*/db = 2 I
        True
    """
    fn_name = "metagrad.bilevel.fixed_point"
    options = _check_options(
        fn_name, solve, maxiter, tol, damping, residual_tol, symmetric, allow_unused
    )
    if not callable(T):
        raise TypeError(
            f"{fn_name}: the first argument must be a callable T(w, h, *args) -> dict like w, "
            f"got {type(T).__name__}. Usage: @fixed_point(T)."
        )
    label = getattr(T, "__qualname__", "T")

    def residual_map(w: Params, h: Params, *args: Any) -> Params:
        tw = _check_like(
            fn_name,
            f"T {label!r}(w, h)",
            T(w, h, *args),
            w,
            "T must return a dict with exactly the keys, shapes and dtypes of w.",
        )
        return {k: w[k] - tw[k] for k in w}

    residual_map.__qualname__ = label
    return _decorator(fn_name, residual_map, options)
