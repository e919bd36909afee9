"""Closed-over tensors get their exact gradient or a clear error; bad input is named and fixed.

A loss function (or optimizer) that closes over a tensor which requires grad used to leave that
tensor's ``.grad`` as None: the meta-gradient was computed for the learner's own parameters only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad as mg
from metagrad import bilevel, optim
from metagrad._errors import NonFiniteError

D = torch.float64


def _tasks(T: int = 3, K: int = 5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(T, K, 1, generator=g, dtype=D), torch.randn(T, K, 1, generator=g, dtype=D)
    return xs, torch.sin(xs), xq, torch.sin(xq)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(D)


def _reference_wd_grad(model: nn.Module, wd: Tensor, tasks: tuple[Tensor, ...]) -> Tensor:
    """Plain autograd: one second-order MAML step per task with an L2 term ``wd/2 ||p||^2``
    (SGD's weight decay adds ``wd * p`` to the gradient), then d(meta-loss)/d(wd)."""
    xs, ys, xq, yq = tasks
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=D)
    for i in range(xs.shape[0]):
        p = dict(params)
        pred = torch.func.functional_call(model, p, (xs[i],))
        loss = F.mse_loss(pred, ys[i]) + 0.5 * wd * sum((v**2).sum() for v in p.values())
        gs = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = {k: v - 0.1 * g for (k, v), g in zip(p.items(), gs)}
        total = total + F.mse_loss(torch.func.functional_call(model, p, (xq[i],)), yq[i])
    (g,) = torch.autograd.grad(total / xs.shape[0], [wd])
    return g


@pytest.mark.parametrize("strategy", ["auto", "loop", "hvp_chain", "checkpoint"])
def test_closed_over_weight_decay_gets_its_exact_gradient(strategy: str) -> None:
    model = _model()
    wd = torch.tensor(0.01, dtype=D, requires_grad=True)
    # the learnable coefficient is only reachable through the closure's parameters argument
    params = list(model.parameters())

    def loss_fn(pred: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(pred, y) + wd * (pred**2).mean()

    learner = mg.MAML(model, loss_fn, inner_lr=0.1, inner_steps=2, strategy=strategy)
    tasks = _tasks()
    learner.meta_loss(*tasks).backward()
    assert wd.grad is not None and float(wd.grad) != 0.0
    # independent: the same meta-loss through plain autograd
    wd2 = wd.detach().clone().requires_grad_()

    def loss_fn2(pred: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(pred, y) + wd2 * (pred**2).mean()

    ref = mg.MAML(_model(), loss_fn2, inner_lr=0.1, inner_steps=2, strategy="loop")
    xs, ys, xq, yq = tasks
    total = torch.zeros((), dtype=D)
    for i in range(xs.shape[0]):
        p = dict(ref.module.named_parameters())
        for _ in range(2):
            loss = loss_fn2(torch.func.functional_call(ref.module, p, (xs[i],)), ys[i])
            gs = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - 0.1 * g for (k, v), g in zip(p.items(), gs)}
        total = total + loss_fn2(torch.func.functional_call(ref.module, p, (xq[i],)), yq[i])
    (want,) = torch.autograd.grad(total / xs.shape[0], [wd2])
    assert abs(float(wd.grad) - float(want)) <= 1e-10 * abs(float(want))
    assert all(p.grad is not None for p in params)


def test_closed_over_tensor_in_the_inner_loss_matches_plain_autograd() -> None:
    """The issue's example: a learnable weight decay inside the support loss only."""
    model = _model()
    wd = torch.tensor(0.05, dtype=D, requires_grad=True)
    learner = mg.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1, strategy="loop")
    tasks = _tasks()
    # put wd where only autograd can find it: a closed-over tensor in a custom optimizer
    opt = optim.SGD(weight_decay=wd)
    learner2 = mg.MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=1, inner_optimizer=opt)
    learner2.meta_loss(*tasks).backward()
    assert wd.grad is not None
    got = wd.grad.clone()
    wd.grad = None
    want = _reference_wd_grad(model, wd, tasks)
    assert abs(float(got) - float(want)) <= 1e-10 * abs(float(want))
    del learner


def test_explicit_vmap_refuses_a_closed_over_tensor_with_the_fix() -> None:
    wd = torch.tensor(0.01, dtype=D, requires_grad=True)

    def loss_fn(pred: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(pred, y) + wd * (pred**2).mean()

    learner = mg.MAML(_model(), loss_fn, inner_lr=0.1, inner_steps=1, strategy="vmap")
    with pytest.raises(ValueError, match=r"closes over a tensor that requires grad.*Pass it in h"):
        learner.meta_loss(*_tasks())


def test_bilevel_foreign_tensors_per_strategy() -> None:
    tau = torch.tensor(0.3, dtype=D, requires_grad=True)
    X = torch.randn(10, 2, dtype=D)
    y = torch.randn(10, dtype=D)

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + tau * h["lam"] * (w["w"] ** 2).sum()

    def g(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + tau * w["w"].sum()

    pb = bilevel.Problem(f, g, optim.SGD(lr=0.1), steps=4)
    w0 = {"w": torch.zeros(2, dtype=D)}
    lam = torch.tensor(0.5, dtype=D, requires_grad=True)
    ref = bilevel.hypergrad(pb, w0, {"lam": lam}, (X, y), (X, y), strategy="unroll")
    (t_ref, g_ref) = ref.foreign[0]
    assert t_ref is tau
    # plain autograd on the same unrolled loop
    w = {"w": torch.zeros(2, dtype=D, requires_grad=True)}
    for _ in range(4):
        (gw,) = torch.autograd.grad(f(w, {"lam": lam}, (X, y)), [w["w"]], create_graph=True)
        w = {"w": w["w"] - 0.1 * gw}
    (want,) = torch.autograd.grad(g(w, {"lam": lam}, (X, y)), [tau])
    assert abs(float(g_ref) - float(want)) <= 1e-12 * abs(float(want))
    for s in ("adjoint", "checkpoint"):
        res = bilevel.hypergrad(pb, w0, {"lam": lam}, (X, y), (X, y), strategy=s)
        assert res.foreign[0][0] is tau and abs(float(res.foreign[0][1]) - float(want)) < 1e-12
    for s in ("forward",):
        with pytest.raises(ValueError, match="closes over a tensor"):
            bilevel.hypergrad(pb, w0, {"lam": lam}, (X, y), (X, y), strategy=s)
    batched = (X[None].repeat(2, 1, 1), y[None].repeat(2, 1))
    with pytest.raises(ValueError, match="closes over a tensor"):
        bilevel.hypergrad(pb, w0, {"lam": lam}, batched, batched, strategy="vmap", batched=True)
    auto = bilevel.hypergrad(
        pb, w0, {"lam": lam}, batched, batched, batched=True, vmap_ok=True
    )  # auto picks vmap, finds the closure, falls back to the unrolled loop
    assert auto.strategy == "unroll" and abs(float(auto.foreign[0][1]) - float(want)) < 1e-12


def test_implicit_strategy_differentiates_closed_over_tensors() -> None:
    """A tensor closed over by the inner objective only (and one by both) gets the implicit
    gradient: against autograd through the ridge solution in closed form (float64)."""
    g_ = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 3, generator=g_, dtype=D), torch.randn(12, generator=g_, dtype=D)
    Xv, yv = torch.randn(7, 3, generator=g_, dtype=D), torch.randn(7, generator=g_, dtype=D)
    tau = torch.tensor(0.3, dtype=D, requires_grad=True)  # inner and outer
    rho = torch.tensor(1.5, dtype=D, requires_grad=True)  # inner only

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        r = b[0] @ w["w"] - b[1]
        return 0.5 * rho * (r**2).sum() + 0.5 * h["lam"] * (w["w"] ** 2).sum() + tau * w["w"].sum()

    def g(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * ((b[0] @ w["w"] - b[1]) ** 2).sum() + tau**2 * w["w"].sum()

    pb = bilevel.Problem(f, g, optim.SGD(lr=0.01), steps=4000)
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    res = bilevel.hypergrad(
        pb, {"w": torch.zeros(3, dtype=D)}, {"lam": lam}, (X, y), (Xv, yv), strategy="implicit"
    )
    # independent: w* = (rho X^T X + lam I)^{-1} (rho X^T y - tau 1), differentiated by autograd
    A = rho * X.T @ X + lam * torch.eye(3, dtype=D)
    w = torch.linalg.solve(A, rho * X.T @ y - tau * torch.ones(3, dtype=D))
    G = 0.5 * ((Xv @ w - yv) ** 2).sum() + tau**2 * w.sum()
    want = torch.autograd.grad(G, [lam, tau, rho])
    got = {id(t): gr for t, gr in res.foreign}
    assert set(got) == {id(tau), id(rho)}
    have = torch.stack([res.grads.h["lam"], got[id(tau)], got[id(rho)]])
    ref = torch.stack(list(want))
    assert float((have - ref).norm() / ref.norm()) < 1e-8


def _lin() -> tuple[bilevel.Problem, dict[str, Tensor], tuple[Tensor, Tensor]]:
    X, y = torch.randn(6, 2, dtype=D), torch.randn(6, dtype=D)

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + h["lam"] * (w["w"] ** 2).sum()

    return bilevel.Problem(f, f, optim.SGD(lr=0.1), steps=3), {"w": torch.zeros(2, dtype=D)}, (X, y)


def test_non_scalar_objectives_are_named() -> None:
    _, w0, b = _lin()
    pb = bilevel.Problem(
        lambda w, h, b: b[0] @ w["w"], lambda w, h, b: w["w"].sum(), optim.SGD(), 1
    )
    with pytest.raises(
        ValueError, match=r"inner objective must return a scalar tensor.*got \(6,\)"
    ):
        bilevel.hypergrad(pb, w0, None, b, b)
    pb = bilevel.Problem(lambda w, h, b: w["w"].sum(), lambda w, h, b: 1.0, optim.SGD(), 1)
    with pytest.raises(ValueError, match=r"outer objective must return a scalar tensor.*float"):
        bilevel.hypergrad(pb, w0, None, b, b)


def test_unused_hyperparameters_are_named_unless_allowed() -> None:
    pb, w0, b = _lin()
    h = {"lam": torch.tensor(0.1, dtype=D, requires_grad=True), "unused": torch.ones(2, dtype=D)}
    h["unused"].requires_grad_()
    for s in ("unroll", "adjoint", "vmap", "forward"):
        batched = s == "vmap"
        data = (b[0][None], b[1][None]) if batched else b
        with pytest.raises(ValueError, match=r"hyperparameters \[\"h\['unused'\]\"\] require grad"):
            bilevel.hypergrad(pb, w0, h, data, data, strategy=s, batched=batched)
    import dataclasses

    ok = bilevel.hypergrad(dataclasses.replace(pb, allow_unused_hyper=True), w0, h, b, b)
    assert ok.grads.h["unused"] is None and ok.grads.h["lam"] is not None


def test_optimizer_hyperparameter_with_the_wrong_shape() -> None:
    pb, w0, b = _lin()
    bad = dataclasses_replace(pb, optimizer=optim.SGD(lr=torch.ones(5, dtype=D)))
    with pytest.raises(ValueError, match=r"metagrad\.optim\.SGD.*lr"):
        bilevel.hypergrad(bad, w0, None, b, b)


def dataclasses_replace(pb: bilevel.Problem, **kw: object) -> bilevel.Problem:
    import dataclasses

    return dataclasses.replace(pb, **kw)  # type: ignore[arg-type]


def test_nan_at_inner_step_k_names_the_problem_and_step() -> None:
    pb, w0, (X, y) = _lin()
    Xb = torch.stack([X, X, X])
    yb = torch.stack([y, y, y])
    yb[1, 0] = float("nan")
    h = {"lam": torch.tensor(0.1, dtype=D, requires_grad=True)}
    for s in ("unroll", "adjoint", "vmap"):
        with pytest.raises(NonFiniteError, match=r"inner objective at problem 1, inner step 0"):
            bilevel.hypergrad(pb, w0, h, (Xb, yb), (Xb, yb), strategy=s, batched=True)

    def blow(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return -torch.exp(3 * w["w"]).sum()  # descent runs away and overflows after a step

    pb2 = bilevel.Problem(blow, blow, optim.SGD(lr=1.0), steps=4)
    with pytest.raises(NonFiniteError, match=r"inner step [1-3]"):
        bilevel.hypergrad(pb2, {"w": torch.ones(2, dtype=D)}, None, (X, y), (X, y))


def test_bad_problem_and_call_arguments() -> None:
    pb, w0, b = _lin()
    h = {"lam": torch.tensor(0.1, dtype=D)}
    with pytest.raises(ValueError, match="strategy='bogus' is not known"):
        bilevel.hypergrad(pb, w0, None, b, b, strategy="bogus")
    with pytest.raises(ValueError, match="truncate=k"):
        bilevel.hypergrad(pb, w0, None, b, b, strategy="truncated")
    with pytest.raises(TypeError, match="w0 must be a non-empty dict"):
        bilevel.hypergrad(pb, [torch.zeros(2)], None, b, b)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps=-1 must be an int >= 0"):
        bilevel.Problem(pb.inner, pb.outer, optim.SGD(), steps=-1)
    with pytest.raises(ValueError, match="outer_weights has 2 entries for steps=3"):
        bilevel.Problem(pb.inner, pb.outer, optim.SGD(), steps=3, outer_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="same leading problem"):
        bilevel.hypergrad(pb, w0, None, (b[0][None], b[1]), b, batched=True)
    with pytest.raises(ValueError, match="compile=True needs cache"):
        bilevel.hypergrad(
            pb,
            w0,
            h,
            (b[0][None], b[1][None]),
            (b[0][None], b[1][None]),
            strategy="vmap",
            batched=True,
            compile="aot_eager",
        )
    with pytest.raises(ValueError, match="PerStep holds 1 batches but step 1"):
        bilevel.hypergrad(pb, w0, h, bilevel.PerStep([b]), b)


def test_old_inner_optimizers_are_deprecated_and_translated() -> None:
    with pytest.warns(DeprecationWarning, match=r"metagrad\.Momentum is deprecated.*optim\.SGD"):
        old = mg.Momentum(beta=0.5, nesterov=True)
    with pytest.warns(DeprecationWarning, match=r"metagrad\.Adam is deprecated"):
        old_adam = mg.Adam(b1=0.8, b2=0.99, eps=1e-6)
    model, tasks = _model(), _tasks()
    a = mg.MAML(model, F.mse_loss, 0.1, 2, inner_optimizer=old).meta_grad(*tasks)
    b = mg.MAML(
        model, F.mse_loss, 0.1, 2, inner_optimizer=optim.SGD(momentum=0.5, nesterov=True)
    ).meta_grad(*tasks)
    assert all(torch.equal(a[k], b[k]) for k in a)  # type: ignore[arg-type]
    a = mg.MAML(model, F.mse_loss, 0.1, 2, inner_optimizer=old_adam).meta_grad(*tasks)
    b = mg.MAML(
        model,
        F.mse_loss,
        0.1,
        2,
        inner_optimizer=optim.Adam(betas=(0.8, 0.99), eps=0.0, eps_root=1e-6),
    ).meta_grad(*tasks)
    assert all(torch.equal(a[k], b[k]) for k in a)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["unroll", "adjoint", "checkpoint", "forward", "auto"])
def test_non_leaf_hyperparameter_gets_its_gradient_through_attach_only(strategy: str) -> None:
    """``h = {"lam": log_lam.exp()}``: ``log_lam`` is behind a declared tensor, not foreign.

    Reported as foreign it would get its gradient twice, and ``attach().backward()`` would fail
    on the freed ``exp`` graph. Reference: the same 4 SGD steps unrolled by hand, d/d(log_lam).
    """
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, generator=g, dtype=D)
    w0 = {"w": torch.zeros(3, dtype=D)}

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + h["lam"] * (w["w"] ** 2).sum()

    def G(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean()

    log_lam = torch.tensor(-1.0, dtype=D, requires_grad=True)
    lam = log_lam.exp()
    w = w0["w"].clone().requires_grad_()
    for _ in range(4):
        (gw,) = torch.autograd.grad(f({"w": w}, {"lam": lam}, (x, y)), [w], create_graph=True)
        w = w - 0.1 * gw
    (expected,) = torch.autograd.grad(G({"w": w}, {}, (x, y)), [log_lam])

    pb = bilevel.Problem(f, G, optim.SGD(lr=0.1), 4)
    lam = log_lam.exp()
    res = bilevel.hypergrad(pb, w0, {"lam": lam}, (x, y), (x, y), strategy=strategy)
    assert res.foreign == []
    res.attach(bilevel.MetaParams(w0, {"lam": lam}, {})).backward()
    assert log_lam.grad is not None
    assert float((log_lam.grad - expected).abs() / expected.abs()) < 1e-10


def test_reptile_refuses_a_closed_over_loss_tensor_with_the_fix() -> None:
    """Reptile's direction is not a gradient: a learnable loss weight would keep .grad None."""
    wd = torch.tensor(0.01, dtype=D, requires_grad=True)

    def loss_fn(pred: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(pred, y) + wd * (pred**2).mean()

    learner = mg.Reptile(_model(), loss_fn, inner_lr=0.1, inner_steps=2)
    with pytest.raises(ValueError, match=r"metagrad.Reptile: loss_fn closes over tensors.*Fix"):
        learner.meta_loss(*_tasks())
    with torch.no_grad():  # evaluation needs no gradient: allowed
        learner.meta_loss(*_tasks())
    plain = mg.Reptile(_model(), F.mse_loss, inner_lr=0.1, inner_steps=2)
    plain.meta_loss(*_tasks()).backward()  # no closure: the check passes
    assert all(p.grad is not None for p in plain.parameters())


@pytest.mark.parametrize("cls", [mg.Reptile, mg.IMAML])
def test_learned_optimizer_hyperparameter_is_refused_where_no_gradient_flows(cls: type) -> None:
    wd = torch.tensor(0.05, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"hyperparameters \['weight_decay'\] require grad.*Fix"):
        cls(
            _model(),
            F.mse_loss,
            inner_lr=0.1,
            inner_steps=2,
            inner_optimizer=optim.SGD(weight_decay=wd),
        )
    cls(
        _model(),
        F.mse_loss,
        inner_lr=0.1,
        inner_steps=2,
        inner_optimizer=optim.SGD(weight_decay=0.05),
    )


class _Scaled(optim.SGD):
    """SGD whose update multiplies by a closed-over tensor (not listed in hyperparams())."""

    scale: Tensor | None = None

    def update(self, grads, state, params, step, lrs=None):  # type: ignore[no-untyped-def]
        new, st = super().update(grads, state, params, step, lrs)
        return {k: v * _Scaled.scale for k, v in new.items()}, st


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("learner_cls", [mg.IMAML, mg.Reptile])
def test_update_that_closes_over_a_tensor_is_refused(learner_cls: type, loop: bool) -> None:
    """iMAML's implicit gradient and Reptile's direction theta - phi do not run through the
    inner updates: a tensor an update closes over is refused, on both paths, with the fix
    (found in the first update's output for iMAML, by a one-update probe for Reptile)."""
    _Scaled.scale = torch.tensor(1.0, dtype=D, requires_grad=True)
    learner = learner_cls(
        _model(), F.mse_loss, inner_lr=0.1, inner_steps=2, inner_optimizer=_Scaled()
    )
    if loop:
        learner._vmap_ok = False
    name = learner_cls.fn_name
    with pytest.raises(ValueError, match=rf"{name}: the inner optimizer's update depends.*Fix"):
        learner.meta_loss(*_tasks())
    with torch.no_grad():  # evaluation: nothing to differentiate, allowed
        learner.meta_loss(*_tasks())
    # the same update without the closure trains
    plain = learner_cls(
        _model(), F.mse_loss, inner_lr=0.1, inner_steps=2, inner_optimizer=optim.SGD()
    )
    plain.meta_loss(*_tasks()).backward()


class _DecayByClosure:
    """SGD followed by a decay whose rate is a closed-over tensor (not in ``hyperparams``)."""

    def __init__(self, tau: Tensor) -> None:
        self.base, self.tau = optim.SGD(lr=0.1), tau

    def init(self, params: dict[str, Tensor]) -> object:
        return self.base.init(params)

    def update(self, grads, state, params, step, lrs=None):  # type: ignore[no-untyped-def]
        new, st = self.base.update(grads, state, params, step, lrs)
        return {n: v - 0.1 * self.tau * params[n] for n, v in new.items()}, st

    def hyperparams(self) -> dict[str, Tensor]:
        return {}

    def with_hyperparams(self, values: dict[str, Tensor]) -> _DecayByClosure:
        return self


@pytest.mark.parametrize("where", ["inner-step-0", "outer", "update"])
@pytest.mark.parametrize("strategy", ["unroll", "adjoint", "checkpoint"])
def test_a_closure_at_any_step_gets_its_exact_gradient(where: str, strategy: str) -> None:
    """The search for closed-over tensors walks every step's forward graph and update, not the
    double-backward nodes between them: a tensor closed over only at the first inner step, only
    by the outer objective, or only by the optimizer's update still gets its exact gradient
    (the batched adjoint through the per-problem chain), equal to plain autograd through the
    same loop written out (float64, rel 1e-12)."""
    tau = torch.tensor(0.7, dtype=D, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(2, 12, 3, generator=g, dtype=D), torch.randn(2, 12, generator=g, dtype=D)

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor], k: int) -> Tensor:
        fit = ((torch.tanh(b[0] @ w["w"]) - b[1]) ** 2).mean() + h["lam"] * (w["w"] ** 2).sum()
        return fit + tau * w["w"].sum() ** 2 if (where == "inner-step-0" and k == 0) else fit

    def G(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor], k: int) -> Tensor:
        fit = ((torch.tanh(b[0] @ w["w"]) - b[1]) ** 2).mean()
        return fit + tau * w["w"].sum() if where == "outer" else fit

    lam = torch.tensor(0.05, dtype=D, requires_grad=True)
    total = torch.zeros((), dtype=D)
    for p in range(2):  # the same 4 steps written out, plain autograd
        w = {"w": torch.full((3,), 0.2, dtype=D, requires_grad=True)}
        for k in range(4):
            (gw,) = torch.autograd.grad(
                f(w, {"lam": lam}, (X[p], y[p]), k), [w["w"]], create_graph=True
            )
            new = w["w"] - 0.1 * gw
            w = {"w": new - 0.1 * tau * w["w"] if where == "update" else new}
        total = total + G(w, {}, (X[p], y[p]), 4) / 2
    want_tau, want_lam = (float(t) for t in torch.autograd.grad(total, [tau, lam]))

    opt = _DecayByClosure(tau) if where == "update" else optim.SGD(lr=0.1)
    pb = bilevel.Problem(f, G, opt, steps=4, stepwise=True)
    w0 = {"w": torch.full((3,), 0.2, dtype=D)}
    got = bilevel.hypergrad(
        pb, w0, {"lam": lam}, (X, y), (X, y), strategy=strategy, batched=True, vmap_ok=True
    )
    assert len(got.foreign) == 1 and got.foreign[0][0] is tau
    assert want_tau != 0.0 and abs(float(got.foreign[0][1]) - want_tau) <= 1e-12 * abs(want_tau)
    assert abs(float(got.grads.h["lam"]) - want_lam) <= 1e-12 * abs(want_lam)


@pytest.mark.parametrize("strategy", ["unroll", "adjoint", "checkpoint"])
def test_nan_at_the_last_inner_step_is_named(strategy: str) -> None:
    """The adjoint strategies' forward sweep stops at w_{K-1} (the top reverse step rebuilds the
    last step with the outer objective): a NaN in the last step's batch, or in the outer
    objective, is still reported with its step."""
    pb, w0, (X, y) = _lin()
    pb = dataclasses_replace(pb, steps=3)
    bad_y = y.clone()
    bad_y[0] = float("nan")
    h = {"lam": torch.tensor(0.1, dtype=D, requires_grad=True)}
    per_step = bilevel.PerStep([(X, y), (X, y), (X, bad_y)])
    with pytest.raises(NonFiniteError, match=r"inner objective.*inner step 2"):
        bilevel.hypergrad(pb, w0, h, per_step, (X, y), strategy=strategy)
    with pytest.raises(NonFiniteError, match=r"outer objective"):
        bilevel.hypergrad(pb, w0, h, (X, y), (X, bad_y), strategy=strategy)
