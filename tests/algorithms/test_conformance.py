"""Conformance: every learner trains with a torch optimizer and keeps the same contract.

Three Adam steps on ``learner.parameters()``; parameters move, nothing is NaN, every ``.grad``
has its parameter's shape, ``adapt``/``predict`` give the right shapes, ``state_dict`` round
trips, and the user's module is changed only by the optimizer (buffers and flags intact).
"""

from __future__ import annotations

import pytest
import torch
from meta_helpers import LOSSES, MODELS, rel_err, tasks

from metagrad.algorithms import ANIL, MAML, MAMLpp, MetaSGD, Reptile

ALGOS = {
    "maml-o1": lambda m, f, s: MAML(m, f, 0.1, 2, order=1, strategy=s),
    "maml-o2": lambda m, f, s: MAML(m, f, 0.1, 2, strategy=s),
    "metasgd": lambda m, f, s: MetaSGD(m, f, 0.1, 2, strategy=s),
    "anil": lambda m, f, s: ANIL(m, f, lambda n: n.startswith(("4.", "9.")), 0.1, 2, strategy=s),
    "mamlpp": lambda m, f, s: MAMLpp(m, f, 0.1, 2, first_order_steps=1, strategy=s),
    "reptile": lambda m, f, s: Reptile(m, f, 0.1, 2),
}
CASES = [
    pytest.param(a, k, s, id=f"{a}-{k}-{s}")
    for a in ALGOS
    for k, strategies in (("mlp", ("loop", "auto")), ("conv_bn", ("auto",)))
    for s in strategies
]


def buffers_and_flags(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return (
        {k: b.clone() for k, b in model.named_buffers()},
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize(("algo", "kind", "strategy"), CASES)
def test_conformance(algo: str, kind: str, strategy: str) -> None:
    model, loss_fn = MODELS[kind](), LOSSES[kind]
    learner = ALGOS[algo](model, loss_fn, strategy)
    xs, ys, xq, yq = tasks(kind)
    start = {k: p.detach().clone() for k, p in learner.named_parameters()}
    buffers, flags = buffers_and_flags(model)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    # With per-step normalization weights the module's own norm affine parameters are replaced
    # by learner.step_norm copies at every step, so they get no gradient (by design).
    replaced = {
        f"module.{m}.{n}"
        for m, mod in model.named_modules()
        if getattr(learner, "per_step_bn", False) and isinstance(mod, torch.nn.BatchNorm2d)
        for n, _ in mod.named_parameters()
    }
    losses = []
    nonzero: set[str] = set()
    for it in range(3):
        opt.zero_grad()
        loss = learner.meta_loss(xs, ys, xq, yq)
        assert loss.dim() == 0 and loss.requires_grad
        loss.backward()
        for k, p in learner.named_parameters():
            if k in replaced:
                assert p.grad is None, k
                continue
            if p.grad is None:
                # MAML++'s first-order phase: step-0 norm weights only shape the support pass,
                # whose gradient is a constant at first order. Second order reaches them.
                assert it == 0 and k.startswith("step_norm.s0__"), k
                continue
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype, k
            assert bool(p.grad.isfinite().all()), k
            if float(p.grad.abs().max()) > 1e-10:
                nonzero.add(k)
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    # A conv bias in front of BatchNorm has a zero gradient up to roundoff (and so has its
    # Meta-SGD rate); everything else must receive a gradient and move.
    assert len(nonzero) >= len(start) - len(replaced) - 4
    for k, p in learner.named_parameters():
        assert bool(p.isfinite().all()), k
        if k in nonzero:
            assert not torch.equal(p.detach(), start[k]), f"{k} did not move"
    # Only the optimizer touched the module: buffers and train/eval flags are intact.
    after_buffers, after_flags = buffers_and_flags(model)
    assert after_flags == flags
    assert all(torch.equal(buffers[k], after_buffers[k]) for k in buffers)

    params = learner.adapt(xs[0], ys[0])
    assert set(params) >= {k for k, p in model.named_parameters() if p.requires_grad}
    assert all(params[k].shape == p.shape for k, p in model.named_parameters() if k in params)
    out = learner.predict(params, xq[0])
    assert out.shape == model(xq[0]).shape

    # state_dict round trip: a fresh learner loads it and computes the same thing.
    clone = ALGOS[algo](MODELS[kind](), loss_fn, strategy)
    clone.load_state_dict(learner.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(clone.state_dict().values(), learner.state_dict().values())
    )
    if hasattr(learner, "meta_grad"):
        assert rel_err(clone.meta_grad(xs, ys, xq, yq), learner.meta_grad(xs, ys, xq, yq)) == 0.0
    else:
        clone.meta_loss(xs, ys, xq, yq).backward()
        opt.zero_grad()
        learner.meta_loss(xs, ys, xq, yq).backward()
        got = {k: p.grad for k, p in clone.named_parameters()}
        want = {k: p.grad for k, p in learner.named_parameters()}
        assert rel_err(got, want) == 0.0
