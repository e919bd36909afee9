"""Identities the meta-gradient must satisfy, and what a meta-step may (not) touch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import (
    LOSSES,
    MODELS,
    assert_unchanged,
    rel_err,
    snapshot,
    tasks,
)
from reference import (
    RefConfig,
    adapt_task,
    batch_statistics_copy,
    leaves_of,
    msl_weights_reference,
    reference_meta_grad,
    reference_reptile,
)
from torch import nn
from torch.func import functional_call

from metagrad.algorithms import ANIL, MAML, MAMLpp, MetaSGD, Reptile

TOL = 1e-10


@pytest.mark.parametrize(
    ("kind", "strategy"), [("mlp", "loop"), ("mlp", "vmap"), ("conv_bn", "loop")]
)
def test_zero_steps_is_plain_query_gradient(kind: str, strategy: str) -> None:
    model = MODELS[kind]()
    loss_fn = LOSSES[kind]
    xs, ys, xq, yq = tasks(kind)
    got = MAML(model, loss_fn, 0.5, 0, strategy=strategy).meta_grad(xs, ys, xq, yq)
    net = batch_statistics_copy(model)
    loss = sum(loss_fn(net(xq[i]), yq[i]) for i in range(xq.shape[0])) / xq.shape[0]
    want = dict(zip(got, torch.autograd.grad(loss, list(net.parameters()))))
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize(("kind", "strategy"), [("mlp", "vmap"), ("conv_bn", "loop")])
def test_first_order_is_second_order_minus_hessian_term(kind: str, strategy: str) -> None:
    """One SGD step, per task: g2 = g1 - alpha * H_s(theta) g1 (H_s: support Hessian at theta)."""
    model, loss_fn, alpha = MODELS[kind](), LOSSES[kind], 0.3
    xs, ys, xq, yq = tasks(kind)
    net = batch_statistics_copy(model)
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach() for p in model.parameters())
    for i in range(xs.shape[0]):
        batch = (xs[i : i + 1], ys[i : i + 1], xq[i : i + 1], yq[i : i + 1])
        g2 = MAML(model, loss_fn, alpha, 1, 2, strategy=strategy).meta_grad(*batch)
        g1 = MAML(model, loss_fn, alpha, 1, 1, strategy=strategy).meta_grad(*batch)
        v = tuple(g1[f"module.{n}"] for n in names)

        def support(*ps: torch.Tensor, i: int = i) -> torch.Tensor:
            return loss_fn(functional_call(net, dict(zip(names, ps)), (xs[i],)), ys[i])

        _, hv = torch.autograd.functional.hvp(support, theta, v)
        want = {f"module.{n}": v[j] - alpha * hv[j] for j, n in enumerate(names)}
        assert rel_err(g2, want) <= TOL


@pytest.mark.parametrize(
    "make",
    [
        lambda m: MAML(m, F.mse_loss, 0.2, 2),
        lambda m: MetaSGD(m, F.mse_loss, 0.2, 1, strategy="loop"),
        lambda m: MAMLpp(m, F.mse_loss, 0.2, 2),
    ],
    ids=["maml", "metasgd", "mamlpp"],
)
def test_repeatable_and_accumulates_like_pytorch(make) -> None:
    learner = make(MODELS["mlp"]())
    batch = tasks("mlp")
    first = learner.meta_grad(*batch)
    second = learner.meta_grad(*batch)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # meta_grad never touches .grad ...
    assert all(p.grad is None for p in learner.parameters())
    # ... while backward() accumulates exactly as PyTorch does: twice -> 2x.
    learner.eval()  # keep meta_step (order annealing, loss weights) fixed across the calls
    once = learner.meta_grad(*batch)
    learner.meta_loss(*batch).backward()
    learner.meta_loss(*batch).backward()
    for k, p in learner.named_parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, 2 * once[k]), k


ALGOS = {
    "maml-o2": lambda m, f: MAML(m, f, 0.2, 2),
    "maml-o1": lambda m, f: MAML(m, f, 0.2, 2, order=1),
    "metasgd": lambda m, f: MetaSGD(m, f, 0.2, 1),
    "anil": lambda m, f: ANIL(m, f, lambda n: n.startswith(("4.", "9.")), 0.2, 2),
    "mamlpp": lambda m, f: MAMLpp(m, f, 0.2, 2),
    "reptile": lambda m, f: Reptile(m, f, 0.2, 2),
    "maml-running": lambda m, f: MAML(m, f, 0.2, 2, bn="running"),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("kind", ["mlp", "conv_bn"])
def test_user_module_unchanged(kind: str, algo: str, train: bool) -> None:
    """Parameters, buffers (BN running stats, num_batches_tracked), flags and .grad stay put."""
    model = MODELS[kind]()
    model.train(train)
    if kind == "conv_bn":
        with torch.no_grad():  # non-trivial running statistics, so any write would show
            model(torch.randn(8, 1, 8, 8, dtype=torch.float64))
        model.train(train)
    before = snapshot(model)
    learner = ALGOS[algo](model, LOSSES[kind])
    learner.train(train)
    model.train(train)
    batch = tasks(kind)
    learner.meta_loss(*batch)
    with torch.no_grad():
        learner.meta_loss(*batch)
    if hasattr(learner, "meta_grad"):
        learner.meta_grad(*batch)
    params = learner.adapt(batch[0][0], batch[1][0])
    learner.predict(params, batch[2][0])
    learner.adapt(batch[0][0], batch[1][0], differentiable=True)
    assert_unchanged(model, before)


def test_bn_running_policy_eval_reads_running_stats() -> None:
    """bn="running" in eval mode normalizes with the module's running statistics."""
    model = MODELS["conv_bn"]()
    with torch.no_grad():
        model(torch.randn(8, 1, 8, 8, dtype=torch.float64) + 1.0)
    model.eval()
    xs, ys, xq, yq = tasks("conv_bn")
    learner = MAML(model, F.cross_entropy, 0.3, 0, bn="running").eval()
    with torch.no_grad():
        value = learner.meta_loss(xs, ys, xq, yq)
        want = torch.stack([F.cross_entropy(model(xq[i]), yq[i]) for i in range(2)]).mean()
        transductive = MAML(model, F.cross_entropy, 0.3, 0).eval().meta_loss(xs, ys, xq, yq)
    assert float((value - want).abs()) <= 1e-12
    assert float((transductive - want).abs()) > 1e-6  # the policies really differ here


def test_first_order_steps_anneals_order() -> None:
    """first_order_steps=2: the first two meta_loss().backward() are first order, then second."""
    model = MODELS["mlp"]()
    batch = tasks("mlp")
    learner = MAML(model, F.mse_loss, 0.3, 2, first_order_steps=2)
    o1 = reference_meta_grad(learner, F.mse_loss, RefConfig(0.3, 2, 1), *batch)[1]
    o2 = reference_meta_grad(learner, F.mse_loss, RefConfig(0.3, 2, 2), *batch)[1]
    assert rel_err(o1, o2) > 1e-3
    # meta_grad, no-grad and eval-mode calls do not count as meta-steps.
    assert rel_err(learner.meta_grad(*batch), o1) <= TOL
    with torch.no_grad():
        learner.meta_loss(*batch)
    learner.eval()
    learner.meta_loss(*batch)
    learner.train()
    assert int(learner.meta_step) == 0
    for want in (o1, o1, o2, o2):
        learner.zero_grad()
        learner.meta_loss(*batch).backward()
        got = {k: p.grad for k, p in learner.named_parameters()}
        assert rel_err(got, want) <= TOL
    assert int(learner.meta_step) == 4


def test_multi_step_loss_weights_anneal_with_meta_steps() -> None:
    model = MODELS["mlp"]()
    batch = tasks("mlp")
    learner = MAML(model, F.mse_loss, 0.3, 2, multi_step_loss=True, msl_anneal_steps=3)
    for step in range(5):
        cfg = RefConfig(0.3, 2, 2, weights=msl_weights_reference(2, step, 3))
        want = reference_meta_grad(learner, F.mse_loss, cfg, *batch)[1]
        learner.zero_grad()
        learner.meta_loss(*batch).backward()
        got = {k: p.grad for k, p in learner.named_parameters()}
        assert rel_err(got, want) <= TOL


def test_adapt_matches_reference_and_clips_step_rates() -> None:
    """adapt(steps=6) with 4 learned per-step rates uses the last rate for steps 4 and 5."""
    model = MODELS["mlp"]()
    xs, ys, _, _ = tasks("mlp")
    learner = MAML(model, F.mse_loss, 0.2, 3, eval_steps=4, learn_inner_lr="per_step")
    with torch.no_grad():
        for p in learner.inner_lrs.values():
            p.mul_(0.5 + torch.rand_like(p))
    cfg = RefConfig(0.2, 4, 2, lr_mode="per_step")
    net = batch_statistics_copy(model)
    for steps in (None, 6):
        got = learner.adapt(xs[0], ys[0], steps=steps)
        want, _ = adapt_task(net, F.mse_loss, cfg, leaves_of(learner, cfg), xs[0], ys[0], steps)
        assert rel_err(got, {k: v.detach() for k, v in want.items()}) <= TOL
        assert all(not v.requires_grad for v in got.values())


def test_adapt_differentiable_gradient_matches_reference() -> None:
    model = MODELS["mlp"]()
    xs, ys, xq, _ = tasks("mlp")
    learner = MetaSGD(model, F.mse_loss, 0.2, 2)
    cfg = RefConfig(0.2, 2, 2, lr_mode="per_param")
    adapted = learner.adapt(xs[0], ys[0], differentiable=True)
    out = learner.predict(adapted, xq[0]).pow(2).sum()
    named = dict(learner.named_parameters())
    got = dict(zip(named, torch.autograd.grad(out, list(named.values()))))
    leaves = leaves_of(learner, cfg)
    net = batch_statistics_copy(model)
    ref, _ = adapt_task(net, F.mse_loss, cfg, leaves, xs[0], ys[0])
    ref_out = functional_call(net, ref, (xq[0],)).pow(2).sum()
    ln = leaves.named()
    want = dict(zip(ln, torch.autograd.grad(ref_out, list(ln.values()))))
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "conv_bn", "gru"])
def test_reptile_matches_reference(kind: str) -> None:
    model, loss_fn = MODELS[kind](), LOSSES[kind]
    batch = tasks(kind)
    learner = Reptile(model, loss_fn, 0.1, 3)
    loss = learner.meta_loss(*batch)
    loss.backward()
    want_loss, want_dir = reference_reptile(model, loss_fn, 0.1, 3, *batch)
    got = {k: p.grad for k, p in model.named_parameters()}
    assert rel_err(got, want_dir) <= TOL
    assert float((loss.detach() - want_loss).abs()) <= TOL * float(want_loss)


def test_frozen_parameters_get_no_gradient_and_are_not_adapted() -> None:
    model = MODELS["mlp"]()
    model[0].requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    batch = tasks("mlp")
    for learner in (MAML(model, F.mse_loss, 0.3, 2), Reptile(model, F.mse_loss, 0.3, 2)):
        learner.meta_loss(*batch).backward()
        assert model[0].weight.grad is None and model[0].bias.grad is None
        assert model[2].weight.grad is not None
        adapted = learner.adapt(batch[0][0], batch[1][0])
        if "0.weight" in adapted:
            assert torch.equal(adapted["0.weight"], frozen_before)
        assert learner.predict(adapted, batch[2][0]).shape == batch[3][0].shape
        model.zero_grad()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_allow_unused_leaves_parameter_unadapted(strategy: str) -> None:
    class Net(nn.Sequential):  # stock container, so "vmap" is allowed; the last layer is unused
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[2](self[1](self[0](x)))

    model = Net(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(3, 3)).double()
    batch = tasks("mlp")
    learner = MAML(model, F.mse_loss, 0.3, 2, strategy=strategy, allow_unused=True)
    got = learner.meta_grad(*batch)
    cfg = RefConfig(0.3, 2, 2, allow_unused=True)
    _, want = reference_meta_grad(learner, F.mse_loss, cfg, *batch)
    assert rel_err(got, want) <= TOL
    # No meta-gradient reaches the unused layer (the loop reports None, vmap zeros).
    assert got["module.3.weight"] is None or not got["module.3.weight"].any()
    adapted = learner.adapt(batch[0][0], batch[1][0])
    assert torch.equal(adapted["3.weight"], model[3].weight.detach())


def test_learner_copy_is_independent() -> None:
    """deepcopy of a learner (e.g. for checkpoints) computes the same meta-gradient."""
    learner = MAMLpp(MODELS["conv_bn"](), F.cross_entropy, 0.3, 2)
    batch = tasks("conv_bn")
    clone = copy.deepcopy(learner)
    assert rel_err(clone.meta_grad(*batch), learner.meta_grad(*batch)) == 0.0
