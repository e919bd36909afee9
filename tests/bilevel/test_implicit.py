"""Implicit differentiation (custom_root, fixed_point) and its linear solvers, in float64.

Checked three ways: ridge regression's closed-form hypergradients, central finite differences
with the inner problem re-solved per perturbation, and the linear solvers against
``torch.linalg.solve`` (plus IMAML's CG iterate for iterate).
"""

from __future__ import annotations

import doctest
import warnings
from collections.abc import Callable
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.algorithms._imaml import conjugate_gradient
from metagrad.bilevel import _implicit, _linsolve
from metagrad.bilevel._implicit import ImplicitSolver, custom_root, fixed_point
from metagrad.bilevel._linsolve import SolveResult, cg, neumann, normal_cg

DT = torch.float64


# --------------------------------------------------------------------------------------------
# Ridge regression: inner 0.5 sum_i c_i (x_i.w - y_i)^2 + 0.5 sum_j lam_j w_j^2, outer
# g = 0.5 ||X_v w* - y_v||^2. With A = X^T C X + diag(lam), s = A^{-1} X_v^T (X_v w* - y_v):
#   dg/dlam = -s.w* (scalar lam),  dg/dlam_j = -s_j w*_j,  dg/dc = (X s) * (y - X w*).
# --------------------------------------------------------------------------------------------


class Ridge:
    def __init__(self, n: int = 30, d: int = 4, nv: int = 20) -> None:
        self.X, self.y = torch.randn(n, d, dtype=DT), torch.randn(n, dtype=DT)
        self.Xv, self.yv = torch.randn(nv, d, dtype=DT), torch.randn(nv, dtype=DT)
        self.n, self.d = n, d

    def weights(self, h: Params) -> Tensor:
        return h["c"] if "c" in h else torch.ones(self.n, dtype=DT)

    def F(self, w: Params, h: Params) -> Params:
        """Gradient of the inner loss."""
        r = self.X @ w["w"] - self.y
        return {"w": self.X.T @ (self.weights(h) * r) + h["lam"] * w["w"]}

    def matrix(self, h: Params) -> Tensor:
        lam = h["lam"].detach()
        c = self.weights(h).detach()
        return self.X.T @ (c[:, None] * self.X) + torch.diag(lam.expand(self.d))

    def exact(self, w_init: Params, h: Params) -> Params:
        c = self.weights(h).detach()
        return {"w": torch.linalg.solve(self.matrix(h), self.X.T @ (c * self.y))}

    def gd(self, w_init: Params, h: Params, steps: int = 400) -> Params:
        """Plain gradient descent with autograd inside the solver (its graph is discarded)."""
        lr = 1.0 / float(torch.linalg.eigvalsh(self.matrix(h)).max())
        w = w_init["w"].clone().requires_grad_(True)
        for _ in range(steps):
            r = self.X @ w - self.y
            f = 0.5 * (self.weights(h) * r * r).sum() + 0.5 * (h["lam"] * w * w).sum()
            (gw,) = torch.autograd.grad(f, w)
            w = (w - lr * gw).detach().requires_grad_(True)
        return {"w": w.detach()}

    def outer(self, w: Params) -> Tensor:
        return 0.5 * ((self.Xv @ w["w"] - self.yv) ** 2).sum()

    def closed_form(self, h: Params) -> dict[str, Tensor]:
        w = self.exact({}, h)["w"]
        s = torch.linalg.solve(self.matrix(h), self.Xv.T @ (self.Xv @ w - self.yv))
        out = {"lam": (-(s * w)).sum() if h["lam"].dim() == 0 else -(s * w)}
        if "c" in h:
            out["c"] = (self.X @ s) * (self.y - self.X @ w)
        return out

    def w0(self) -> Params:
        return {"w": torch.zeros(self.d, dtype=DT)}


def hyper(lam: Tensor, c: Tensor | None = None) -> Params:
    h = {"lam": lam.clone().requires_grad_(True)}
    if c is not None:
        h["c"] = c.clone().requires_grad_(True)
    return h


def hypergrad(solver: ImplicitSolver, prob: Ridge, h: Params) -> dict[str, Tensor]:
    loss = prob.outer(solver(prob.w0(), h))
    return dict(zip(h, torch.autograd.grad(loss, list(h.values()))))


@pytest.mark.parametrize("inner", ["exact", "gd"])
def test_ridge_scalar_lam_matches_closed_form(inner: str) -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(getattr(prob, inner))
    h = hyper(torch.tensor(0.7, dtype=DT))
    got = hypergrad(solver, prob, h)["lam"]
    exact = prob.closed_form(h)["lam"]
    assert abs(float(got - exact)) < 1e-8 * max(1.0, abs(float(exact)))


def test_ridge_per_feature_lam_matches_closed_form() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(prob.exact)
    h = hyper(torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=DT))
    got = hypergrad(solver, prob, h)["lam"]
    torch.testing.assert_close(got, prob.closed_form(h)["lam"], rtol=1e-8, atol=1e-10)


def test_ridge_example_weights_matches_closed_form() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(prob.exact)
    h = hyper(torch.tensor(0.3, dtype=DT), 0.5 + torch.rand(prob.n, dtype=DT))
    got, exact = hypergrad(solver, prob, h), prob.closed_form(h)
    torch.testing.assert_close(got["c"], exact["c"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got["lam"], exact["lam"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("lam_learned", [True, False])
def test_closed_over_tensor_in_F_gets_its_gradient(lam_learned: bool) -> None:
    """Example weights read from the enclosing scope (not passed in h) are a hyperparameter of
    the root too: their gradient equals the closed form of the same weights passed in h."""
    prob = Ridge()
    c = (0.5 + torch.rand(prob.n, dtype=DT)).requires_grad_(True)
    h = hyper(torch.tensor(0.3, dtype=DT))
    if not lam_learned:
        h["lam"].requires_grad_(False)

    def F(w: Params, hh: Params) -> Params:
        return prob.F(w, {**hh, "c": c})

    def solve(w_init: Params, hh: Params) -> Params:
        return prob.exact(w_init, {**hh, "c": c.detach()})

    loss = prob.outer(custom_root(F)(solve)(prob.w0(), h))
    loss.backward()
    exact = prob.closed_form({**h, "c": c})
    torch.testing.assert_close(c.grad, exact["c"], rtol=1e-8, atol=1e-10)
    if lam_learned:
        torch.testing.assert_close(h["lam"].grad, exact["lam"], rtol=1e-8, atol=1e-10)
    else:
        assert h["lam"].grad is None
    # finite differences in one random direction of c (an independent check of the closed form)
    v = torch.randn(prob.n, dtype=DT, generator=torch.Generator().manual_seed(3))
    eps = 1e-6

    def G(cc: Tensor) -> float:
        return float(prob.outer(prob.exact({}, {"lam": h["lam"].detach(), "c": cc})))

    fd = (G(c.detach() + eps * v) - G(c.detach() - eps * v)) / (2 * eps)
    assert abs(float(c.grad @ v) - fd) < 1e-6 * max(1.0, abs(fd))


def test_backward_and_autograd_grad_agree_and_other_paths_add_up() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(prob.exact)
    h = hyper(torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=DT))
    implicit = prob.closed_form(h)["lam"]
    # A direct path from lam to the loss besides w*: its gradient 2 lam adds to the implicit one.
    (prob.outer(solver(prob.w0(), h)) + (h["lam"] ** 2).sum()).backward()
    torch.testing.assert_close(h["lam"].grad, implicit + 2 * h["lam"].detach(), rtol=1e-8, atol=0)
    # Calling again gives the same numbers: nothing accumulates inside the solver object.
    again = hypergrad(solver, prob, h)["lam"]
    torch.testing.assert_close(again, implicit, rtol=1e-8, atol=1e-12)


def test_gradients_only_when_needed() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(prob.exact)
    lam = torch.tensor(0.5, dtype=DT)
    assert solver(prob.w0(), {"lam": lam})["w"].grad_fn is None
    with torch.no_grad():
        out = solver(prob.w0(), {"lam": lam.clone().requires_grad_(True)})
    assert out["w"].grad_fn is None and not out["w"].requires_grad


# ----------------------------------------------- fixed_point -----------------------------------


@pytest.mark.parametrize(
    ("solve", "symmetric"),
    [("neumann", None), ("normal_cg", None), ("normal_cg", True), ("cg", None)],
)
def test_fixed_point_gradient_step_matches_closed_form(solve: str, symmetric: bool | None) -> None:
    prob = Ridge()
    h = hyper(torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=DT), 0.5 + torch.rand(prob.n, dtype=DT))
    eta = 1.0 / float(torch.linalg.eigvalsh(prob.matrix(h)).max())

    def T(w: Params, h: Params) -> Params:  # one gradient-descent step on the inner loss
        return {"w": w["w"] - eta * prob.F(w, h)["w"]}

    solver = fixed_point(T, solve=solve, symmetric=symmetric)(prob.exact)
    got, exact = hypergrad(solver, prob, h), prob.closed_form(h)
    for k in exact:
        torch.testing.assert_close(got[k], exact[k], rtol=1e-8, atol=1e-10)
    assert solver.last_result is not None and solver.last_result.solve_converged


@pytest.mark.parametrize("solve", ["neumann", "normal_cg"])
def test_fixed_point_nonsymmetric_jacobian(solve: str) -> None:
    # T(w, h) = M w + B h with a non-symmetric contraction M: w* = (I - M)^{-1} B h and
    # dL/dh = B^T (I - M)^{-T} dL/dw*. A transpose mistake would show here, not in ridge.
    d, m = 5, 3
    M = 0.15 * torch.randn(d, d, dtype=DT)
    M = 0.6 * M / torch.linalg.matrix_norm(M, ord=2)
    B, target = torch.randn(d, m, dtype=DT), torch.randn(d, dtype=DT)

    def T(w: Params, h: Params) -> Params:
        return {"w": M @ w["w"] + B @ h["b"]}

    @fixed_point(T, solve=solve)
    def iterate(w_init: Params, h: Params) -> Params:
        return {"w": torch.linalg.solve(torch.eye(d, dtype=DT) - M, B @ h["b"])}

    b = torch.randn(m, dtype=DT, requires_grad=True)
    w = iterate({"w": torch.zeros(d, dtype=DT)}, {"b": b})["w"]
    (0.5 * ((w - target) ** 2).sum()).backward()
    ws = w.detach()
    exact = B.T @ torch.linalg.solve((torch.eye(d, dtype=DT) - M).T, ws - target)
    torch.testing.assert_close(b.grad, exact, rtol=1e-9, atol=1e-11)


def test_custom_root_normal_cg_general_optimality() -> None:
    # A root of a non-symmetric linear F(w, h) = K w - h: dL/dh = K^{-T} dL/dw*.
    K = torch.eye(4, dtype=DT) + 0.5 * torch.randn(4, 4, dtype=DT)
    solver = custom_root(lambda w, h: {"w": K @ w["w"] - h["b"]}, solve="normal_cg")(
        lambda w0, h: {"w": torch.linalg.solve(K, h["b"])}
    )
    b = torch.randn(4, dtype=DT, requires_grad=True)
    t = torch.randn(4, dtype=DT)
    (solver({"w": torch.zeros(4, dtype=DT)}, {"b": b})["w"] @ t).backward()
    torch.testing.assert_close(b.grad, torch.linalg.solve(K.T, t), rtol=1e-9, atol=1e-11)


# ------------------------------------------ finite differences ---------------------------------


def directional_fd(f: Callable[[Params], float], h: Params, d: Params, eps: float) -> float:
    plus = {k: h[k].detach() + eps * d[k] for k in h}
    minus = {k: h[k].detach() - eps * d[k] for k in h}
    return (f(plus) - f(minus)) / (2 * eps)


def test_ridge_finite_differences_random_directions() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(prob.exact)
    h = hyper(torch.tensor([0.3, 0.6, 0.9, 1.2], dtype=DT), 0.5 + torch.rand(prob.n, dtype=DT))
    grads = hypergrad(solver, prob, h)

    def g(hh: Params) -> float:
        return float(prob.outer(prob.exact({}, hh)))

    for _ in range(3):
        d = {k: torch.randn_like(v) for k, v in h.items()}
        analytic = sum(float((grads[k] * d[k]).sum()) for k in h)
        fd = directional_fd(g, h, d, 1e-5)
        assert abs(analytic - fd) < 1e-6 * max(1.0, abs(fd))


class MLPProblem:
    """A 2-5-1 tanh MLP fitted with per-tensor L2 strengths ``lam`` and an input scale ``s``.

    The L2 term makes the inner loss strongly convex around its minimiser (checked through the
    Hessian), which is what the implicit function theorem needs locally.
    """

    shapes: ClassVar[dict[str, tuple[int, ...]]] = {
        "W1": (5, 2),
        "b1": (5,),
        "W2": (1, 5),
        "b2": (1,),
    }

    def __init__(self) -> None:
        self.X, self.Xv = torch.randn(24, 2, dtype=DT), torch.randn(16, 2, dtype=DT)
        self.y = torch.sin(2 * self.X[:, :1]) + 0.1 * torch.randn(24, 1, dtype=DT)
        self.yv = torch.sin(2 * self.Xv[:, :1]) + 0.1 * torch.randn(16, 1, dtype=DT)
        self.init = {k: 0.5 * torch.randn(s, dtype=DT) for k, s in self.shapes.items()}

    @staticmethod
    def predict(w: Params, x: Tensor) -> Tensor:
        return torch.tanh(x @ w["W1"].T + w["b1"]) @ w["W2"].T + w["b2"]

    def inner(self, w: Params, h: Params) -> Tensor:
        fit = ((self.predict(w, h["s"] * self.X) - self.y) ** 2).mean()
        return fit + 0.5 * sum(lam * (w[k] ** 2).sum() for lam, k in zip(h["lam"], w))

    def F(self, w: Params, h: Params) -> Params:
        gw = torch.autograd.grad(self.inner(w, h), list(w.values()), create_graph=True)
        return dict(zip(w, gw))

    def flat_loss(self, h: Params) -> Callable[[Tensor], Tensor]:
        sizes = [int(torch.Size(s).numel()) for s in self.shapes.values()]
        hd = {k: t.detach() for k, t in h.items()}
        return lambda v: self.inner(self.unflat(v, sizes), hd)

    def unflat(self, v: Tensor, sizes: list[int]) -> Params:
        return {k: t.view(s) for (k, s), t in zip(self.shapes.items(), v.split(sizes))}

    def newton(self, w_init: Params, h: Params) -> Params:
        """Newton's method from a point in the basin, to a gradient norm of ~1e-14."""
        f = self.flat_loss(h)
        v = torch.cat([t.reshape(-1) for t in w_init.values()])
        for _ in range(20):
            g = torch.func.grad(f)(v)
            if float(g.norm()) < 1e-14:
                break
            v = v - torch.linalg.solve(torch.func.hessian(f)(v), g)
        return self.unflat(v.detach(), [t.numel() for t in w_init.values()])

    def solve(self, w_init: Params, h: Params) -> Params:
        """L-BFGS into a minimum's basin (Newton alone may stop at a saddle), then Newton."""
        f = self.flat_loss(h)
        v = torch.cat([t.reshape(-1) for t in w_init.values()]).requires_grad_(True)
        opt = torch.optim.LBFGS(
            [v], max_iter=300, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = f(v)
            loss.backward()
            return loss

        opt.step(closure)
        return self.newton(self.unflat(v.detach(), [t.numel() for t in w_init.values()]), h)

    def outer(self, w: Params) -> Tensor:
        return ((self.predict(w, self.Xv) - self.yv) ** 2).mean()


def test_mlp_inner_problem_matches_finite_differences() -> None:
    prob = MLPProblem()
    solver = custom_root(prob.F, residual_tol=1e-10)(prob.solve)
    h = {
        "lam": torch.tensor([0.03, 0.02, 0.04, 0.01], dtype=DT, requires_grad=True),
        "s": torch.tensor(0.8, dtype=DT, requires_grad=True),
    }
    w_star = solver(prob.init, h)
    grads = dict(zip(h, torch.autograd.grad(prob.outer(w_star), list(h.values()))))
    assert solver.last_result is not None and solver.last_result.solve_converged
    v = torch.cat([t.detach().reshape(-1) for t in w_star.values()])
    assert float(torch.linalg.eigvalsh(torch.func.hessian(prob.flat_loss(h))(v)).min()) > 1e-3

    def g(hh: Params) -> float:  # re-solved per perturbation, from the minimiser's basin
        return float(prob.outer(prob.newton({k: t.detach() for k, t in w_star.items()}, hh)))

    for _ in range(3):
        d = {k: torch.randn_like(v) for k, v in h.items()}
        analytic = sum(float((grads[k] * d[k]).sum()) for k in h)
        fd = directional_fd(g, h, d, 1e-5)
        assert abs(analytic - fd) < 1e-6 * max(1.0, abs(fd))


# ------------------------------------------------ diagnostics ----------------------------------


def test_warns_with_the_residual_when_the_solver_did_not_converge() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(lambda w0, h: prob.gd(w0, h, steps=3))
    h = hyper(torch.tensor(0.5, dtype=DT))
    with pytest.warns(
        RuntimeWarning, match=r"optimality residual .* = \d\.\d+e[-+]\d+ > residual_tol=1\.0e-06"
    ) as rec:
        w = solver(prob.w0(), h)
    assert solver.last_result is not None
    assert f"{solver.last_result.residual:.3e}" in str(rec[0].message)
    assert "more inner iterations" in str(rec[0].message)
    assert "custom_root" in str(rec[0].message)
    prob.outer(w).backward()  # still differentiable, just inexact


def test_no_warning_when_converged() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(prob.gd)
    h = hyper(torch.tensor(0.5, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prob.outer(solver(prob.w0(), h)).backward()
    info = solver.last_result
    assert info is not None and info.residual < 1e-10 and info.solve_converged
    assert info.solve_iterations is not None and 1 <= info.solve_iterations <= prob.d


def test_warns_when_the_linear_solve_stops_short() -> None:
    prob = Ridge()
    solver = custom_root(prob.F, maxiter=1)(prob.exact)
    h = hyper(torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=DT))
    loss = prob.outer(solver(prob.w0(), h))
    with pytest.warns(RuntimeWarning, match=r"stopped after 1 iterations at relative residual"):
        loss.backward()
    info = solver.last_result
    assert info is not None and info.solve_iterations == 1 and info.solve_converged is False


def test_last_result_before_and_after_backward() -> None:
    prob = Ridge()
    solver = custom_root(prob.F)(prob.exact)
    assert solver.last_result is None
    loss = prob.outer(solver(prob.w0(), hyper(torch.tensor(0.5, dtype=DT))))
    assert solver.last_result is not None and solver.last_result.solve_iterations is None
    loss.backward()
    assert solver.last_result.solve_iterations is not None


def test_callable_solve() -> None:
    prob = Ridge()
    h = hyper(torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=DT))
    exact = prob.closed_form(h)["lam"]
    full = custom_root(prob.F, solve=lambda mv, b: cg(mv, b))(prob.exact)
    torch.testing.assert_close(hypergrad(full, prob, h)["lam"], exact, rtol=1e-8, atol=1e-10)
    assert full.last_result is not None and full.last_result.solve_converged
    plain = custom_root(prob.F, solve=lambda mv, b: cg(mv, b).x)(prob.exact)
    torch.testing.assert_close(hypergrad(plain, prob, h)["lam"], exact, rtol=1e-8, atol=1e-10)
    assert plain.last_result is not None and plain.last_result.solve_iterations is None


# ------------------------------------------------- bad input -----------------------------------


def test_bad_input_errors() -> None:
    prob = Ridge()
    h = hyper(torch.tensor(0.5, dtype=DT))
    w0 = prob.w0()

    def run(F: Callable[..., object], **kw: object) -> None:
        custom_root(F, **kw)(prob.exact)(w0, h)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=r"custom_root.*keys \['v'\].*keys \['w'\]"):
        run(lambda w, h: {"v": w["w"]})
    with pytest.raises(ValueError, match=r"custom_root.*shape \(2,\).*shape \(4,\)"):
        run(lambda w, h: {"w": w["w"][:2]})
    with pytest.raises(TypeError, match=r"custom_root.*entry 'w' is a float"):
        run(lambda w, h: {"w": 0.0})
    with pytest.raises(TypeError, match=r"custom_root.*must be a dict\[str, Tensor\], got list"):
        run(lambda w, h: [w["w"]])
    with pytest.raises(ValueError, match=r"custom_root: unknown solve='gmres'.*'cg'"):
        custom_root(prob.F, solve="gmres")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"custom_root: solve='cg' needs a symmetric"):
        custom_root(prob.F, symmetric=False)
    with pytest.raises(ValueError, match=r"custom_root: maxiter=0"):
        custom_root(prob.F, maxiter=0)
    with pytest.raises(TypeError, match=r"custom_root: the first argument must be a callable"):
        custom_root("F")  # type: ignore[arg-type]

    solver = custom_root(prob.F)(prob.exact)
    with pytest.raises(
        TypeError, match=r"custom_root: h must be a dict\[str, Tensor\], got Tensor.*\{'lam': lam\}"
    ):
        solver(w0, torch.tensor(0.5, dtype=DT))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"custom_root: h must be .* entry 'lam' is a float"):
        solver(w0, {"lam": 0.5})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"custom_root: the output of .* must be a dict"):
        custom_root(prob.F)(lambda w, h: w["w"])(w0, h)
    with pytest.raises(ValueError, match=r"custom_root: args\[0\] .* requires grad.*into h"):
        custom_root(lambda w, h, t: prob.F(w, h))(lambda w, h, t: prob.exact(w, h))(
            w0, h, torch.ones(1, requires_grad=True)
        )

    def T_bad(w: Params, h: Params) -> Params:
        return {"w": w["w"], "extra": w["w"]}

    with pytest.raises(ValueError, match=r"fixed_point: T 'test_bad_input_errors.<locals>.T_bad'"):
        fixed_point(T_bad)(prob.exact)(w0, h)

    nan_solver = custom_root(prob.F)(lambda w, h: {"w": torch.full((4,), float("nan"), dtype=DT)})
    with pytest.raises(FloatingPointError, match=r"custom_root: the optimality residual .* nan"):
        nan_solver(w0, h)


def test_unused_hyperparameter_raises_unless_allowed() -> None:
    prob = Ridge()
    h = {
        **hyper(torch.tensor(0.5, dtype=DT)),
        "unused": torch.ones(2, dtype=DT, requires_grad=True),
    }
    loss = prob.outer(custom_root(prob.F)(prob.exact)(prob.w0(), h))
    with pytest.raises(ValueError, match=r"does not depend on h\['unused'\].*allow_unused=True"):
        loss.backward()
    solver = custom_root(prob.F, allow_unused=True)(prob.exact)
    grads = torch.autograd.grad(prob.outer(solver(prob.w0(), h)), list(h.values()))
    assert torch.equal(grads[1], torch.zeros(2, dtype=DT))


# ---------------------------------------------- linear solvers ---------------------------------


def spd_system(n: int = 7) -> tuple[Tensor, Params, Callable[[Params], Params]]:
    """A random SPD matrix acting on a dict with leaves of shapes (3,) and (2, 2)."""
    Q = torch.randn(n, n, dtype=DT)
    A = Q @ Q.T + 0.5 * torch.eye(n, dtype=DT)
    b = {"a": torch.randn(3, dtype=DT), "m": torch.randn(2, 2, dtype=DT)}
    return A, b, lambda v: unflat(A @ flat(v))


def flat(v: Params) -> Tensor:
    return torch.cat([v["a"], v["m"].reshape(-1)])


def unflat(x: Tensor) -> Params:
    return {"a": x[:3], "m": x[3:].view(2, 2)}


def test_cg_matches_dense_solve_with_and_without_damping() -> None:
    A, b, mv = spd_system()
    res = cg(mv, b)
    assert isinstance(res, SolveResult) and res.converged and res.residual <= 1e-10
    torch.testing.assert_close(flat(res.x), torch.linalg.solve(A, flat(b)), rtol=1e-9, atol=1e-10)
    damped = cg(mv, b, damping=0.3, maxiter=50)
    expect = torch.linalg.solve(A + 0.3 * torch.eye(7, dtype=DT), flat(b))
    torch.testing.assert_close(flat(damped.x), expect, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_cg_iterates_equal_imaml_conjugate_gradient(steps: int) -> None:
    _, b, mv = spd_system()
    ours = cg(mv, b, maxiter=steps, tol=1e-12)
    keys = list(b)
    theirs, it, res = conjugate_gradient(
        lambda v: [mv(dict(zip(keys, v)))[k] for k in keys], list(b.values()), steps
    )
    assert ours.iterations == it and ours.residual == res
    for k, t in zip(keys, theirs):
        assert torch.equal(ours.x[k], t)


def test_cg_stops_short_and_handles_zero_rhs() -> None:
    _, b, mv = spd_system()
    res = cg(mv, b, maxiter=2)
    assert res.iterations == 2 and not res.converged and res.residual > 1e-10
    zero = cg(mv, {k: torch.zeros_like(v) for k, v in b.items()})
    assert zero.converged and zero.iterations == 0 and float(flat(zero.x).abs().max()) == 0.0


def test_normal_cg_matches_dense_solve_for_nonsymmetric() -> None:
    K = torch.randn(7, 7, dtype=DT) + 3 * torch.eye(7, dtype=DT)
    b = {"a": torch.randn(3, dtype=DT), "m": torch.randn(2, 2, dtype=DT)}
    res = normal_cg(lambda v: unflat(K @ flat(v)), lambda v: unflat(K.T @ flat(v)), b, maxiter=50)
    assert res.converged and res.residual < 1e-8
    torch.testing.assert_close(flat(res.x), torch.linalg.solve(K, flat(b)), rtol=1e-8, atol=1e-9)


def test_neumann_partial_sums_and_convergence() -> None:
    A, b, mv = spd_system()
    alpha = 1.0 / float(torch.linalg.eigvalsh(A).max())
    M = torch.eye(7, dtype=DT) - alpha * A
    # Exactly alpha * sum_{j<k} M^j b, with residual ||M^k b|| / ||b||.
    part = neumann(mv, b, steps=3, alpha=alpha)
    expect = alpha * (flat(b) + M @ flat(b) + M @ M @ flat(b))
    torch.testing.assert_close(flat(part.x), expect, rtol=1e-12, atol=1e-14)
    mk = torch.linalg.matrix_power(M, 3) @ flat(b)
    assert part.iterations == 3 and abs(part.residual - float(mk.norm() / flat(b).norm())) < 1e-12
    full = neumann(mv, b, steps=100_000, alpha=alpha, tol=1e-11)
    assert full.converged and full.iterations < 100_000
    torch.testing.assert_close(flat(full.x), torch.linalg.solve(A, flat(b)), rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match=r"neumann: alpha=0"):
        neumann(mv, b, steps=3, alpha=0)


def test_docstring_examples_run() -> None:
    for module in (_implicit, _linsolve):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0
