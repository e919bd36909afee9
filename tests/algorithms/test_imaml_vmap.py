"""iMAML's batched path (all tasks in one vmap, one batched CG) against its per-task loop."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg
from metagrad.algorithms._imaml_vmap import batched_cg
from metagrad.bilevel import cg

D = torch.float64


def _tasks(T: int = 4, K: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, K, d, generator=g, dtype=D) for d in (3, 1, 3, 1))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(D)


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def _pair(**kw: object) -> tuple[mg.IMAML, mg.IMAML]:
    batched = mg.IMAML(_mlp(), F.mse_loss, **kw)  # type: ignore[arg-type]
    loop = mg.IMAML(_mlp(), F.mse_loss, **kw)  # type: ignore[arg-type]
    loop._vmap_ok = False  # the per-task loop, as on a model vmap cannot run
    return batched, loop


@pytest.mark.parametrize("inner_optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize(("cg_steps", "damping"), [(3, 0.0), (40, 0.0), (4, 0.1)])
def test_batched_equals_loop(inner_optimizer: str, cg_steps: int, damping: float) -> None:
    """Same gradient, CG iterations, CG and optimality residuals, task by task (float64)."""
    batched, loop = _pair(
        inner_lr=0.05, inner_steps=8, lam=2.0, cg_steps=cg_steps, cg_damping=damping,
        inner_optimizer=inner_optimizer,
    )  # fmt: skip
    tasks = _tasks()
    got, ref = batched.meta_grad(*tasks), loop.meta_grad(*tasks)
    assert batched._vmap_ok is True and loop._vmap_ok is False
    assert _rel(got, ref) < 1e-10
    assert [i for i, _ in batched.last_cg] == [i for i, _ in loop.last_cg]
    if cg_steps == 40:  # converged: every task stopped early at its own iteration
        assert all(i < 40 for i, _ in loop.last_cg)
    for (_, r1), (_, r2) in zip(batched.last_cg, loop.last_cg):
        assert r1 == pytest.approx(r2, rel=1e-6, abs=1e-11)  # ~1e-13 at convergence: rounding
    assert batched.last_residual == pytest.approx(loop.last_residual, rel=1e-8)
    res_b = batched.meta_result(*tasks)
    res_l = loop.meta_result(*tasks)
    assert torch.allclose(res_b.per_task, res_l.per_task, rtol=1e-12, atol=0)


def test_batched_gradient_matches_finite_differences() -> None:
    """Independent of the loop: central differences of the query loss at the inner solution
    with the proximal problem solved to 1e-12, against the batched implicit gradient."""
    model = _mlp()
    lam = 3.0
    learner = mg.IMAML(model, F.mse_loss, inner_lr=0.1, inner_steps=150, lam=lam, cg_steps=60)
    tasks = _tasks(T=3)
    got = learner.meta_grad(*tasks)
    assert learner._vmap_ok is True
    params = dict(model.named_parameters())
    names = list(params)
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def objective(flat: torch.Tensor) -> float:
        theta, o = {}, 0
        for n in names:
            k = params[n].numel()
            theta[n] = flat[o : o + k].view_as(params[n])
            o += k
        total = 0.0
        for i in range(3):
            t = learner.solve_inner(theta, {}, tasks[0][i], tasks[1][i], 150)
            total += float(F.mse_loss(learner.predict(t, tasks[2][i]), tasks[3][i]))
        return total / 3

    g = torch.cat([got[f"module.{n}"].reshape(-1) for n in names])
    idx = torch.randperm(flat0.numel(), generator=torch.Generator().manual_seed(0))[:6]
    eps = 1e-5
    fd = []
    for j in idx.tolist():
        e = torch.zeros_like(flat0)
        e[j] = eps
        fd.append((objective(flat0 + e) - objective(flat0 - e)) / (2 * eps))
    fd_t = torch.tensor(fd, dtype=D)
    assert float((g[idx] - fd_t).norm() / fd_t.norm()) < 1e-5


@pytest.mark.parametrize("loop", [False, True])
def test_closed_over_loss_weight_gets_its_implicit_gradient(loop: bool) -> None:
    """A learnable weight read by loss_fn from the enclosing scope (support and query losses)
    gets d(mean query loss at t*)/d(tau): equal on both paths, and against central differences
    of the solved proximal problem (float64)."""
    tau = torch.tensor(0.7, dtype=D, requires_grad=True)

    def loss_fn(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tau * F.mse_loss(p, t) + 0.1 * tau**2 * p.mean()

    tasks = _tasks(T=3)
    learner = mg.IMAML(_mlp(), loss_fn, inner_lr=0.05, inner_steps=400, lam=2.0, cg_steps=80)
    if loop:
        learner._vmap_ok = False
    learner.meta_loss(*tasks).backward()
    assert learner._vmap_ok is (not loop)
    assert tau.grad is not None
    got = float(tau.grad)

    def value(tv: float) -> float:
        tau.data.fill_(tv)
        with torch.no_grad():
            v = mg.IMAML(learner.module, loss_fn, inner_lr=0.05, inner_steps=2000, lam=2.0)
            out = float(v.meta_loss(*tasks))
        tau.data.fill_(0.7)
        return out

    eps = 1e-5
    fd = (value(0.7 + eps) - value(0.7 - eps)) / (2 * eps)
    assert abs(got - fd) < 1e-6 * max(1.0, abs(fd))


def test_batched_cg_is_cg_task_by_task() -> None:
    """Per task the iterates, iteration counts and residuals of metagrad.bilevel.cg; a zero
    right-hand side takes 0 iterations."""
    g = torch.Generator().manual_seed(3)
    T, n = 4, 7
    mats = []
    for i in range(T):
        m = torch.randn(n, n, generator=g, dtype=D)
        mats.append(m @ m.T + (0.1 + i) * torch.eye(n, dtype=D))
    A = torch.stack(mats)
    b = {"v": torch.randn(T, n, generator=g, dtype=D)}
    b["v"][2] = 0.0
    for steps, tol in ((3, 1e-12), (50, 1e-9)):
        out = batched_cg(lambda p: {"v": torch.einsum("tij,tj->ti", A, p["v"])}, b, steps, tol)
        for i in range(T):
            ref = cg(lambda p, i=i: {"v": A[i] @ p["v"]}, {"v": b["v"][i]}, maxiter=steps, tol=tol)
            assert torch.allclose(out.x["v"][i], ref.x["v"], rtol=1e-10, atol=1e-13)
            assert int(out.iterations[i]) == ref.iterations
            assert float(out.residual[i]) == pytest.approx(ref.residual, rel=1e-6, abs=1e-12)
        assert int(out.iterations[2]) == 0 and float(out.x["v"][2].abs().sum()) == 0.0


def test_batched_validation_loss_equals_loop() -> None:
    batched, loop = _pair(inner_lr=0.1, inner_steps=5, lam=1.0)
    tasks = _tasks()
    got = batched.meta_result(*tasks, need_grad=False)
    ref = loop.meta_result(*tasks, need_grad=False)
    assert batched._vmap_ok is True and not got.grads
    assert torch.allclose(got.per_task, ref.per_task, rtol=1e-12, atol=0)


def test_non_finite_falls_back_to_the_loop_that_names_task_and_step() -> None:
    xs, ys, xq, yq = _tasks()
    ys = ys.clone()
    ys[2, 0, 0] = float("nan")
    learner = mg.IMAML(_mlp(), F.mse_loss, inner_lr=0.1, inner_steps=3)
    with pytest.raises(mg.NonFiniteError) as exc:
        learner.meta_loss(xs, ys, xq, yq)
    assert (exc.value.task, exc.value.step) == (2, 0)
    assert learner._vmap_ok is True  # the batch ran; the loop named the task


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1).to(D)
        self.spare = nn.Parameter(torch.zeros(2, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("loop", [False, True])
def test_unused_parameter_is_refused_on_both_paths(loop: bool) -> None:
    learner = mg.IMAML(_Unused(), F.mse_loss, inner_lr=0.1, inner_steps=2)
    if loop:
        learner._vmap_ok = False
    with pytest.raises(ValueError, match=r"\['spare'\] do not reach the support loss"):
        learner.meta_grad(*_tasks())


def test_channels_last_conv_net_keeps_the_loop() -> None:
    """A conv net with BatchNorm runs channels-last per task on CPU (as MAML's default)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).to(D)  # fmt: skip
    learner = mg.IMAML(net, F.cross_entropy, inner_lr=0.1, inner_steps=2, cg_steps=2)
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(2, 3, 1, 6, 6, generator=g, dtype=D), torch.randn(2, 3, 1, 6, 6, dtype=D)
    ys = torch.arange(3).repeat(2, 1)
    learner.meta_grad(xs, ys, xq, ys)
    assert learner._vmap_ok is None


@pytest.mark.parametrize(("width", "batched"), [(8, True), (320, False)])
def test_batched_only_below_vmap_pays_sizes(
    width: int, batched: bool, count_calls: Callable[[object, str], list[int]]
) -> None:
    """Like MAML's ``auto``, iMAML batches a vmap-safe model only below ``vmap_pays``' sizes
    (320-wide: 103,041 parameters, the loop); the gradient is the loop's either way."""
    import metagrad.algorithms._imaml as IM

    calls = count_calls(IM, "solve_proximal")

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)).to(D)

    g = torch.Generator().manual_seed(2)
    xs, xq = (torch.randn(2, 3, width, generator=g, dtype=D) for _ in range(2))
    ys, yq = xs.sum(-1, keepdim=True).sin(), xq.sum(-1, keepdim=True).sin()
    kw = dict(inner_lr=0.01, inner_steps=2, lam=2.0, cg_steps=3)
    auto = mg.IMAML(make(), F.mse_loss, **kw)  # type: ignore[arg-type]
    loop = mg.IMAML(make(), F.mse_loss, **kw)  # type: ignore[arg-type]
    loop._vmap_ok = False
    got = auto.meta_grad(xs, ys, xq, yq)
    assert bool(calls) is batched
    assert _rel(got, loop.meta_grad(xs, ys, xq, yq)) < 1e-10
