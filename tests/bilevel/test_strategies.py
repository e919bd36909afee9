"""Every strategy of ``metagrad.bilevel.hypergrad`` against closed forms, an independent unrolled
loop, finite differences and each other (float64).

The problem: a linear model trained on weighted squared errors with per-parameter weight decay,
validated on another split. Hyperparameters of every kind: per-example weights and per-parameter
weight decay in ``h``, the training inputs themselves (as in dataset distillation), and the
optimizer's learning rate and weight decay as tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from metagrad import bilevel, optim

D = torch.float64
N, F, NV = 12, 3, 8


def data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, F, generator=g, dtype=D)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D) + 0.3 * torch.randn(N, generator=g, dtype=D)
    Xv = torch.randn(NV, F, generator=g, dtype=D)
    yv = Xv @ torch.tensor([1.0, -2.0, 0.5], dtype=D)
    return X, y, Xv, yv


def inner(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    X = b[0] + h["dX"]  # the training inputs are learnable (dataset distillation)
    r = X @ w["w"] + w["b"] - b[1]
    return 0.5 * (h["ex"] * r**2).mean() + 0.5 * (h["wd"] * w["w"] ** 2).sum()


def outer(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    r = b[0] @ w["w"] + w["b"] - b[1]
    return 0.5 * (r**2).mean()


def leaves() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    w0 = {
        "w": (0.1 * torch.randn(F, generator=g, dtype=D)).requires_grad_(),
        "b": torch.zeros((), dtype=D, requires_grad=True),
    }
    h = {
        "ex": (1 + 0.2 * torch.rand(N, generator=g, dtype=D)).requires_grad_(),
        "wd": torch.full((F,), 0.05, dtype=D, requires_grad=True),
        "dX": torch.zeros(N, F, dtype=D, requires_grad=True),
    }
    return w0, h


OPTIMIZERS: dict[str, Callable[[], optim.Optimizer]] = {
    "sgd-nesterov": lambda: optim.SGD(
        lr=torch.tensor(0.1, dtype=D, requires_grad=True), momentum=0.8, nesterov=True
    ),
    "adam": lambda: optim.Adam(lr=torch.tensor(0.05, dtype=D, requires_grad=True)),
    "adamw": lambda: optim.AdamW(
        lr=torch.tensor(0.05, dtype=D, requires_grad=True),
        weight_decay=torch.tensor(0.1, dtype=D, requires_grad=True),
    ),
    "rmsprop-centered": lambda: optim.RMSprop(
        lr=torch.tensor(0.01, dtype=D, requires_grad=True), centered=True, momentum=0.5
    ),
    "adagrad": lambda: optim.Adagrad(lr=torch.tensor(0.1, dtype=D, requires_grad=True)),
}


def flat_grads(res: bilevel.HyperGrad) -> Tensor:
    gs = [res.grads.w0[k] for k in ("w", "b")] + [res.grads.h[k] for k in ("ex", "wd", "dX")]
    gs += [res.grads.opt[k] for k in sorted(res.grads.opt)]
    return torch.cat([g.reshape(-1) for g in gs])


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def problem(opt: optim.Optimizer, steps: int = 6) -> bilevel.Problem:
    return bilevel.Problem(inner, outer, opt, steps=steps)


def reference(opt: optim.Optimizer, steps: int, cut: int = 0) -> list[Tensor]:
    """Independent unrolled loop: plain autograd, no metagrad engine code.

    The first ``cut`` steps run without a graph (the truncated reference).
    """
    X, y, Xv, yv = data()
    w0, h = leaves()
    hyper = opt.hyperparams()
    o = opt.with_hyperparams(hyper)
    w = {k: v for k, v in w0.items()}
    state = o.init({k: v.detach() for k, v in w.items()})
    for k in range(steps):
        if k <= cut and cut > 0:  # w_cut is a constant: a fresh leaf
            w = {n: v.detach().requires_grad_() for n, v in w.items()}
        loss = inner(w, h, (X, y))
        gs = torch.autograd.grad(loss, list(w.values()), create_graph=k >= cut)
        w, state = o.update(dict(zip(w, gs)), state, w, k)
        if k < cut:
            w = {n: v.detach() for n, v in w.items()}
            state = torch.utils._pytree.tree_map(lambda t: t.detach(), state)
    G = outer(w, h, (Xv, yv))
    wrt = [w0["w"], w0["b"], h["ex"], h["wd"], h["dX"], *(hyper[k] for k in sorted(hyper))]
    out = torch.autograd.grad(G, wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, out)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_exact_strategies_equal_the_independent_unrolled_loop(name: str) -> None:
    opt = OPTIMIZERS[name]()
    X, y, Xv, yv = data()
    ref = torch.cat([g.reshape(-1) for g in reference(opt, 6)])
    w0, h = leaves()
    for strategy in ("unroll", "adjoint", "checkpoint", "forward"):
        res = bilevel.hypergrad(problem(opt), w0, h, (X, y), (Xv, yv), strategy=strategy)
        assert res.strategy == strategy
        assert rel(flat_grads(res), ref) < 1e-10, strategy


@pytest.mark.parametrize(
    ("steps", "weights"),
    [(1, None), (2, None), (4, (0.5, 0.0, 1.0, 0.0)), (5, (0.0, 0.0, 0.0, 0.0, 2.0))],
)
def test_adjoint_top_step_with_and_without_a_last_outer_weight(
    steps: int, weights: tuple[float, ...] | None
) -> None:
    """The adjoint strategies' sweep stops at w_{K-1} where c_K != 0 (the top reverse step
    rebuilds the last step with the outer objective) and runs to w_K where c_K = 0: both equal
    the unrolled loop, value included, with a stateful optimizer and every hyperparameter."""
    opt = OPTIMIZERS["adam"]()
    X, y, Xv, yv = data()
    w0, h = leaves()
    pb = bilevel.Problem(inner, outer, opt, steps=steps, outer_weights=weights)
    ref = bilevel.hypergrad(pb, w0, h, (X, y), (Xv, yv), strategy="unroll")
    for strategy in ("adjoint", "checkpoint"):
        res = bilevel.hypergrad(pb, w0, h, (X, y), (Xv, yv), strategy=strategy)
        assert rel(flat_grads(res), flat_grads(ref)) < 1e-10, strategy
        assert abs(float(res.value - ref.value)) <= 1e-12 * abs(float(ref.value)), strategy


@pytest.mark.parametrize("name", ["sgd-nesterov", "adam"])
def test_vmap_over_problems_equals_the_loop_over_problems(name: str) -> None:
    opt = OPTIMIZERS[name]()
    X, y, Xv, yv = data()
    X2, y2, Xv2, yv2 = data(seed=3)
    batch_in = (torch.stack([X, X2]), torch.stack([y, y2]))
    batch_out = (torch.stack([Xv, Xv2]), torch.stack([yv, yv2]))
    w0, h = leaves()
    pb = problem(opt)
    loop = bilevel.hypergrad(pb, w0, h, batch_in, batch_out, strategy="unroll", batched=True)
    vm = bilevel.hypergrad(pb, w0, h, batch_in, batch_out, strategy="vmap", batched=True)
    assert rel(flat_grads(vm), flat_grads(loop)) < 1e-10
    # the batched mean is the mean of the two single problems
    one = bilevel.hypergrad(pb, w0, h, (X, y), (Xv, yv))
    two = bilevel.hypergrad(pb, w0, h, (X2, y2), (Xv2, yv2))
    assert rel(flat_grads(loop), (flat_grads(one) + flat_grads(two)) / 2) < 1e-12
    assert torch.allclose(loop.per_problem, torch.stack([one.value, two.value]), rtol=1e-14)


def test_truncated_equals_the_reference_truncated_the_same_way() -> None:
    opt = OPTIMIZERS["sgd-nesterov"]()
    X, y, Xv, yv = data()
    w0, h = leaves()
    res = bilevel.hypergrad(
        problem(opt, 8), w0, h, (X, y), (Xv, yv), strategy="truncated", truncate=3
    )
    ref = reference(opt, 8, cut=5)
    got = torch.cat([g.reshape(-1) for g in [torch.zeros(F, dtype=D), torch.zeros((), dtype=D)]])
    assert res.grads.w0["w"] is None and res.grads.w0["b"] is None  # cut off from w0
    got = torch.cat([got, flat_grads_hyper(res)])
    want = torch.cat([g.reshape(-1) for g in ref])
    assert rel(got, want) < 1e-10
    full = bilevel.hypergrad(problem(opt, 8), w0, h, (X, y), (Xv, yv))
    assert rel(flat_grads_hyper(res), flat_grads_hyper(full)) > 1e-3  # an honest bias


def flat_grads_hyper(res: bilevel.HyperGrad) -> Tensor:
    gs = [res.grads.h[k] for k in ("ex", "wd", "dX")]
    gs += [res.grads.opt[k] for k in sorted(res.grads.opt)]
    return torch.cat([g.reshape(-1) for g in gs])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_finite_differences_in_random_directions(name: str) -> None:
    opt = OPTIMIZERS[name]()
    X, y, Xv, yv = data()
    w0, h = leaves()
    res = bilevel.hypergrad(problem(opt), w0, h, (X, y), (Xv, yv), strategy="adjoint")
    tensors = [w0["w"], w0["b"], h["ex"], h["wd"], h["dX"]]
    tensors += [opt.hyperparams()[k] for k in sorted(opt.hyperparams())]
    g = flat_grads(res)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        d = torch.randn(g.numel(), generator=gen, dtype=D)
        d /= d.norm()

        def value(eps: float, d: Tensor = d) -> float:
            off, moved = 0, []
            with torch.no_grad():
                for t in tensors:
                    n = t.numel()
                    moved.append(t + eps * d[off : off + n].view_as(t))
                    off += n
            w = {"w": moved[0], "b": moved[1]}
            hh = {"ex": moved[2], "wd": moved[3], "dX": moved[4]}
            o = opt.with_hyperparams(dict(zip(sorted(opt.hyperparams()), moved[5:])))
            with torch.no_grad():
                r = bilevel.hypergrad(problem(o), w, hh, (X, y), (Xv, yv), need_grad=False)
            return float(r.value)

        e = 1e-5
        fd = (value(e) - value(-e)) / (2 * e)
        an = float(g @ d)
        assert abs(fd - an) <= 1e-6 * max(abs(fd), abs(an))


def _one_step_direction(opt: optim.Optimizer, g: Tensor, w0: Tensor) -> Tensor:
    """-d w_1 / d lr after one step from a zero state, written out per optimizer."""
    if isinstance(opt, optim.SGD):
        return g + opt.momentum * g if opt.nesterov else g
    if isinstance(opt, optim.AdamW):  # m_hat = g, v_hat = g^2; decoupled decay
        return g / (g.abs() + opt.eps) + opt.weight_decay * w0
    if isinstance(opt, optim.Adam):
        return g / (g.abs() + opt.eps)
    if isinstance(opt, optim.RMSprop):  # square_avg = (1 - alpha) g^2, centered: minus mean^2
        sq = (1 - opt.alpha) * g * g
        if opt.centered:
            sq = sq - ((1 - opt.alpha) * g) ** 2
        return g / (sq.sqrt() + opt.eps)
    assert isinstance(opt, optim.Adagrad)
    return g / (g.abs() + opt.eps)


CLOSED = {
    "sgd": lambda lr: optim.SGD(lr=lr),
    "sgd-nesterov": lambda lr: optim.SGD(lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optim.Adam(lr=lr),
    "adamw": lambda lr: optim.AdamW(lr=lr, weight_decay=0.1),
    "rmsprop": lambda lr: optim.RMSprop(lr=lr),
    "rmsprop-centered": lambda lr: optim.RMSprop(lr=lr, centered=True),
    "adagrad": lambda lr: optim.Adagrad(lr=lr),
}


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_one_step_learning_rate_hypergradient_closed_form(name: str) -> None:
    """G = g(w_1), w_1 = w_0 - lr d(g_train): dG/dlr = -grad g(w_1) . d (SGD: -g_val . g_train)."""
    X, y, Xv, yv = data()
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    opt = CLOSED[name](lr)
    w0 = {"w": torch.tensor([0.3, -0.2, 0.1], dtype=D), "b": torch.tensor(0.2, dtype=D)}

    def f(w: dict[str, Tensor], h: object, b: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * ((b[0] @ w["w"] + w["b"] - b[1]) ** 2).mean()

    res = bilevel.hypergrad(bilevel.Problem(f, f, opt, steps=1), w0, None, (X, y), (Xv, yv))
    # closed form, by hand: the gradients of the linear least squares
    r = X @ w0["w"] + w0["b"] - y
    g_train = {"w": X.T @ r / N, "b": r.mean()}
    d = {k: _one_step_direction(opt, g_train[k], w0[k]) for k in w0}
    w1 = {k: w0[k] - 0.1 * d[k] for k in w0}
    rv = Xv @ w1["w"] + w1["b"] - yv
    g_val = {"w": Xv.T @ rv / NV, "b": rv.mean()}
    want = -sum((g_val[k] * d[k]).sum() for k in w0)
    assert abs(float(res.grads.opt["lr"]) - float(want)) <= 1e-12 * abs(float(want))
    if name == "sgd":
        assert torch.isclose(want, -sum((g_val[k] * g_train[k]).sum() for k in w0))


def _ridge() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    X, y, Xv, yv = data()
    lam = torch.tensor(0.7, dtype=D)
    A = X.T @ X + lam * torch.eye(F, dtype=D)
    w = torch.linalg.solve(A, X.T @ y)
    r = Xv @ w - yv
    # g = 0.5 ||Xv w - yv||^2; dw/dlam = -A^{-1} w
    exact = -(r @ Xv) @ torch.linalg.solve(A, w)
    return X, y, Xv, yv, lam, exact


def _ridge_problem(steps: int) -> bilevel.Problem:
    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * ((b[0] @ w["w"] - b[1]) ** 2).sum() + 0.5 * h["lam"] * (w["w"] ** 2).sum()

    def g(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * ((b[0] @ w["w"] - b[1]) ** 2).sum()

    return bilevel.Problem(f, g, optim.SGD(lr=0.02), steps=steps)


def test_ridge_implicit_strategy_matches_the_closed_form() -> None:
    X, y, Xv, yv, lam0, exact = _ridge()
    lam = lam0.clone().requires_grad_()
    w0 = {"w": torch.zeros(F, dtype=D)}
    res = bilevel.hypergrad(
        _ridge_problem(3000), w0, {"lam": lam}, (X, y), (Xv, yv), strategy="implicit"
    )
    assert abs(float(res.grads.h["lam"]) - float(exact)) <= 1e-8 * abs(float(exact))
    assert res.grads.w0["w"] is None  # a solved problem does not depend on its start


def test_unrolled_gradient_descent_converges_to_the_ridge_hypergradient() -> None:
    X, y, Xv, yv, lam0, exact = _ridge()
    lam = lam0.clone().requires_grad_()
    w0 = {"w": torch.zeros(F, dtype=D)}
    errs = []
    for K in (10, 100, 1000):
        res = bilevel.hypergrad(
            _ridge_problem(K), w0, {"lam": lam}, (X, y), (Xv, yv), strategy="adjoint"
        )
        errs.append(abs(float(res.grads.h["lam"]) - float(exact)) / abs(float(exact)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_implicit_warns_when_the_inner_problem_is_not_solved() -> None:
    X, y, Xv, yv, lam0, _ = _ridge()
    lam = lam0.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match=r"residual .* > residual_tol"):
        bilevel.hypergrad(
            _ridge_problem(3),
            {"w": torch.zeros(F, dtype=D)},
            {"lam": lam},
            (X, y),
            (Xv, yv),
            strategy="implicit",
        )


def test_attach_delivers_every_gradient_to_dot_grad() -> None:
    opt = OPTIMIZERS["adam"]()
    X, y, Xv, yv = data()
    w0, h = leaves()
    res = bilevel.hypergrad(problem(opt), w0, h, (X, y), (Xv, yv))
    loss = res.attach(bilevel.MetaParams(w0, h, opt.hyperparams()))
    loss.backward()
    assert torch.equal(h["dX"].grad, res.grads.h["dX"])  # type: ignore[arg-type]
    assert torch.equal(opt.hyperparams()["lr"].grad, res.grads.opt["lr"])  # type: ignore[arg-type]
    assert torch.equal(w0["w"].grad, res.grads.w0["w"])  # type: ignore[arg-type]


def test_checkpoint_stride_keeps_every_iterate_only_where_segments_save_nothing() -> None:
    """Stride m = ceil(sqrt K) holds at most K // m + 1 + m iterates; where that is >= K the
    strategy keeps them all (stride 1, no recompute, the same bound)."""
    from metagrad.bilevel._api import _checkpoint_every

    def stride(K: int) -> int:
        return _checkpoint_every(problem(optim.SGD(lr=0.1), steps=K))

    assert [stride(K) for K in (1, 2, 5, 6)] == [1, 1, 1, 1]
    assert [stride(K) for K in (7, 10, 16, 17, 100)] == [3, 4, 4, 5, 10]
    for K in range(1, 200):
        m = stride(K)
        assert m == 1 or K // m + 1 + m < K


@pytest.mark.parametrize("name", ["sgd-nesterov", "adam"])
def test_checkpoint_segments_recomputed_equal_the_independent_loop(
    name: str, monkeypatch: pytest.MonkeyPatch, count_calls: Callable[[object, str], list[int]]
) -> None:
    """K = 10 (stride 4): the checkpoint strategy rebuilds segments, per problem and batched
    over problems, and still equals the independent unrolled loop (float64)."""
    import metagrad.bilevel._adjoint as ADJ

    rebuilt: list[int] = []
    real = ADJ.Iterates.get

    def get(self: ADJ.Iterates, k: int) -> object:
        if k not in self.slot:
            rebuilt.append(k)
        return real(self, k)

    monkeypatch.setattr(ADJ.Iterates, "get", get)
    import metagrad.bilevel._api as API

    batched_calls = count_calls(API, "adjoint_vmapped")
    opt = OPTIMIZERS[name]()
    X, y, Xv, yv = data()
    ref = torch.cat([g.reshape(-1) for g in reference(opt, 10)])
    w0, h = leaves()
    res = bilevel.hypergrad(problem(opt, 10), w0, h, (X, y), (Xv, yv), strategy="checkpoint")
    assert res.strategy == "checkpoint" and rebuilt
    assert rel(flat_grads(res), ref) < 1e-10
    # batched over two problems (the vmapped adjoint): the mean of the two single problems
    X2, y2, Xv2, yv2 = data(seed=3)
    two = bilevel.hypergrad(problem(opt, 10), w0, h, (X2, y2), (Xv2, yv2), strategy="unroll")
    rebuilt.clear()
    batched = bilevel.hypergrad(
        problem(opt, 10),
        w0,
        h,
        (torch.stack([X, X2]), torch.stack([y, y2])),
        (torch.stack([Xv, Xv2]), torch.stack([yv, yv2])),
        strategy="checkpoint",
        batched=True,
        vmap_ok=True,
    )
    assert rebuilt and batched_calls and batched.strategy == "checkpoint"
    assert rel(flat_grads(batched), (ref + flat_grads(two)) / 2) < 1e-10
