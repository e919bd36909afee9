"""iMAML: implicit meta-gradient vs a dense solve, the converged unrolled gradient, and FD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metagrad as mg
from metagrad.algorithms import conjugate_gradient

D = torch.float64


def _tasks(T: int = 2, K: int = 6, din: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, K, din, generator=g, dtype=D),
        torch.randn(T, K, 1, generator=g, dtype=D),
        torch.randn(T, K, din, generator=g, dtype=D),
        torch.randn(T, K, 1, generator=g, dtype=D),
    )


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)  # 21 parameters


def test_conjugate_gradient_solves_spd_system() -> None:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=g, dtype=D)
    A = m @ m.T + 6 * torch.eye(6, dtype=D)
    b = torch.randn(6, generator=g, dtype=D)
    x, it, res = conjugate_gradient(lambda v: [A @ v[0]], [b], steps=6)
    assert torch.allclose(x[0], torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    assert it <= 6 and res < 1e-10


def test_implicit_gradient_equals_dense_solve() -> None:
    """CG with n steps equals (I + H/lam)^{-1} grad L_q with H the dense Hessian at t*."""
    model, (xs, ys, xq, yq) = _mlp(), _tasks()
    lam = 2.0
    learner = mg.IMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=30, lam=lam, cg_steps=25)
    got = learner.meta_grad(xs, ys, xq, yq)
    names = [n for n, _ in model.named_parameters()]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(xs.shape[0]):
        t_star = learner.solve_inner(dict(model.named_parameters()), {}, xs[i], ys[i], 30)
        flat = torch.cat([t_star[n].reshape(-1) for n in names])

        def unflat(
            v: torch.Tensor, t_star: dict[str, torch.Tensor] = t_star
        ) -> dict[str, torch.Tensor]:
            out, o = {}, 0
            for n in names:
                k = t_star[n].numel()
                out[n] = v[o : o + k].view_as(t_star[n])
                o += k
            return out

        H = torch.autograd.functional.hessian(
            lambda v, i=i: F.mse_loss(functional_call(model, unflat(v), (xs[i],)), ys[i]), flat
        )
        gq = torch.autograd.functional.jacobian(
            lambda v, i=i: F.mse_loss(functional_call(model, unflat(v), (xq[i],)), yq[i]), flat
        )
        x = torch.linalg.solve(torch.eye(flat.numel(), dtype=D) + H / lam, gq)
        for n, v in unflat(x).items():
            expected[n] += v / xs.shape[0]
    for n in names:
        assert torch.allclose(got[f"module.{n}"], expected[n], rtol=1e-8, atol=1e-12), n
    assert all(res < 1e-9 for _, res in learner.last_cg)


def _unrolled_prox_meta_grad(
    model: nn.Module, tasks: tuple[torch.Tensor, ...], lam: float, lr: float, steps: int
) -> dict[str, torch.Tensor]:
    """Independent reference: create_graph through `steps` proximal GD steps."""
    xs, ys, xq, yq = tasks
    theta = dict(model.named_parameters())
    total = torch.zeros((), dtype=D)
    for i in range(xs.shape[0]):
        t = dict(theta)
        for _ in range(steps):
            loss = F.mse_loss(functional_call(model, t, (xs[i],)), ys[i])
            loss = loss + 0.5 * lam * sum(((t[n] - theta[n]) ** 2).sum() for n in t)
            gs = torch.autograd.grad(loss, list(t.values()), create_graph=True)
            t = {n: v - lr * g for (n, v), g in zip(t.items(), gs)}
        total = total + F.mse_loss(functional_call(model, t, (xq[i],)), yq[i]) / xs.shape[0]
    gs = torch.autograd.grad(total, list(theta.values()))
    return {f"module.{n}": g for n, g in zip(theta, gs)}


def test_implicit_equals_unrolled_when_inner_problem_is_solved() -> None:
    """Linear model + MSE: the proximal problem is a strongly convex quadratic; 400 steps solve it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(D)
    tasks = _tasks()
    lam, lr, steps = 1.0, 0.2, 400
    learner = mg.IMAML(model, F.mse_loss, inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=10)
    got = learner.meta_grad(*tasks)
    ref = _unrolled_prox_meta_grad(model, tasks, lam, lr, steps)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-8, atol=1e-12), k


def test_implicit_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(D)
    tasks = _tasks()
    learner = mg.IMAML(model, F.mse_loss, inner_lr=0.2, inner_steps=400, lam=1.0, cg_steps=10)
    g = learner.meta_grad(*tasks)
    d = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    h = 1e-5
    vals = []
    with torch.no_grad():
        for s in (1.0, -1.0):
            for n, p in model.named_parameters():
                p.add_(s * h * d[n])
            vals.append(float(learner.meta_loss(*tasks)))
            for n, p in model.named_parameters():
                p.sub_(s * h * d[n])
    fd = (vals[0] - vals[1]) / (2 * h)
    an = sum(float((g[f"module.{n}"] * d[n]).sum()) for n in d)
    assert abs(fd - an) <= 1e-6 * max(abs(fd), 1e-12)


def test_imaml_backward_adapt_and_module_untouched() -> None:
    model, tasks = _mlp(), _tasks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = mg.IMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=5, lam=1.0, cg_steps=5)
    ref = learner.meta_grad(*tasks)
    learner.meta_loss(*tasks).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[f"module.{n}"])  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    params = learner.adapt(tasks[0][0], tasks[1][0], steps=20)
    before_loss = F.mse_loss(model(tasks[0][0]), tasks[1][0])
    after_loss = F.mse_loss(learner.predict(params, tasks[0][0]), tasks[1][0])
    assert after_loss < before_loss


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": 0.0}, "lam=0.0 must be"),
        ({"cg_steps": 0}, "cg_steps=0 must be"),
        ({"cg_damping": -1.0}, "cg_damping=-1.0 must be"),
        ({"inner_lr": float("nan")}, "inner_lr=nan"),
    ],
)
def test_imaml_bad_options(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mg.IMAML(_mlp(), F.mse_loss, **kwargs)  # type: ignore[arg-type]


def _gd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, lam: float
) -> dict[str, torch.Tensor]:
    """Hand-written proximal gradient descent from the model's weights (lam 0: plain GD)."""
    anchor = {n: p.detach() for n, p in model.named_parameters()}
    t = dict(anchor)
    for _ in range(steps):
        a = {n: v.detach().requires_grad_() for n, v in t.items()}
        loss = F.mse_loss(functional_call(model, a, (x,)), y)
        loss = loss + 0.5 * lam * sum(((a[n] - anchor[n]) ** 2).sum() for n in a)
        gs = torch.autograd.grad(loss, list(a.values()))
        t = {n: v - lr * g for (n, v), g in zip(a.items(), gs)}
    return {n: v.detach() for n, v in t.items()}


def test_eval_lam_sets_the_test_time_problem_only() -> None:
    """adapt() solves the eval_lam problem (0: plain GD, as the reference code evaluates);
    meta_grad() still differentiates the lam problem, so it does not change."""
    xs, ys, xq, yq = _tasks()
    model = _mlp()
    kw = {"inner_lr": 0.1, "inner_steps": 12, "lam": 2.0, "cg_steps": 10}
    default = mg.IMAML(model, F.mse_loss, **kw)  # type: ignore[arg-type]
    plain = mg.IMAML(model, F.mse_loss, eval_lam=0.0, **kw)  # type: ignore[arg-type]
    weak = mg.IMAML(model, F.mse_loss, eval_lam=0.5, **kw)  # type: ignore[arg-type]
    assert (default.eval_lam, plain.eval_lam, weak.eval_lam) == (2.0, 0.0, 0.5)
    for learner, lam in ((default, 2.0), (plain, 0.0), (weak, 0.5)):
        got = learner.adapt(xs[0], ys[0], steps=7)
        ref = _gd(model, xs[0], ys[0], 0.1, 7, lam)
        num = sum(((got[n] - ref[n]) ** 2).sum() for n in ref) ** 0.5
        den = sum((ref[n] ** 2).sum() for n in ref) ** 0.5
        assert float(num / den) < 1e-14, lam
    # the three solutions differ: the proximal term acts
    a0, a2 = plain.adapt(xs[0], ys[0], steps=7), default.adapt(xs[0], ys[0], steps=7)
    assert max(float((a0[n] - a2[n]).abs().max()) for n in a0) > 1e-3
    g_default, g_plain = default.meta_grad(xs, ys, xq, yq), plain.meta_grad(xs, ys, xq, yq)
    assert all(torch.equal(g_default[k], g_plain[k]) for k in g_default)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0"])
def test_imaml_bad_eval_lam(bad: object) -> None:
    with pytest.raises(ValueError, match=r"metagrad.IMAML: eval_lam=.* must be None \(use lam\)"):
        mg.IMAML(_mlp(), F.mse_loss, eval_lam=bad)  # type: ignore[arg-type]


def test_imaml_nan_names_task_and_step() -> None:
    xs, ys, xq, yq = _tasks()
    ys = ys.clone()
    ys[1, 0, 0] = float("inf")
    learner = mg.IMAML(_mlp(), F.mse_loss, inner_lr=0.1, inner_steps=3)
    with pytest.raises(mg.NonFiniteError) as exc:
        learner.meta_loss(xs, ys, xq, yq)
    assert exc.value.task == 1 and exc.value.step == 0
