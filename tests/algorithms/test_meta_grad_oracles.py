"""Every algorithm and option against two oracles, in float64.

(a) ``learner.meta_grad`` equals the independent unrolled reference (``reference.py``) to a
relative error of 1e-10; (b) wherever it is the exact gradient of ``meta_loss`` (second order,
or no inner step), it matches central finite differences of the meta-loss value in random
directions to 1e-6. The MLP runs under both strategies ("loop" and "vmap"); models with
normalization or recurrent layers run under "loop" (what "auto" picks for them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from meta_helpers import LOSSES, MODELS, fd_directional, fd_rel_errors, rel_err, tasks
from reference import RefConfig, msl_weights_reference, reference_meta_grad
from torch import nn

from metagrad.algorithms import ANIL, MAML, MAMLpp, MetaSGD
from metagrad.algorithms._task import STRATEGIES
from metagrad.functional import Adam, Momentum

REF_TOL = 1e-10
FD_TOL = 1e-6

Maker = Callable[[nn.Module, Callable, str], nn.Module]


@dataclass
class Case:
    id: str
    model: str
    make: Maker  # (model, loss_fn, strategy) -> learner
    cfg: RefConfig
    mode: str = "train"
    meta_step: int = 0
    frozen: tuple[str, ...] = ()
    strategies: tuple[str, ...] = field(default=("loop",))
    # Adam's m/sqrt(v+eps) is sharply curved where inner gradients are small: the central
    # difference's h^2 truncation error needs a smaller step there (measured: 7.5e-6 at 1e-5,
    # 7.4e-8 at 1e-6 on the BatchNorm convnet; clean h^2 convergence).
    fd_h: float = 1e-5

    @property
    def exact(self) -> bool:
        """True when meta_grad is the exact gradient of meta_loss (finite differences apply)."""
        return self.cfg.order == 2 or self.cfg.steps == 0


BOTH = ("loop", "vmap")
HEAD = ("4.weight", "4.bias")  # last Linear of the MLP
BN_PARAMS = ("1.weight", "1.bias", "5.weight", "5.bias")
LN_PARAMS = ("1.weight", "1.bias")


def maml(**kw: object) -> Maker:
    return lambda m, f, s: MAML(m, f, strategy=s, **kw)  # type: ignore[arg-type]


CASES = [
    # -- MAML, MLP -------------------------------------------------------------------------
    Case("maml-o2-s1", "mlp", maml(inner_lr=0.3), RefConfig(0.3, 1, 2), strategies=BOTH),
    Case("maml-o1-s1", "mlp", maml(inner_lr=0.3, order=1), RefConfig(0.3, 1, 1), strategies=BOTH),
    Case("maml-o2-s0", "mlp", maml(inner_steps=0), RefConfig(0.01, 0, 2), strategies=BOTH),
    Case(
        "maml-o2-s3",
        "mlp",
        maml(inner_lr=0.2, inner_steps=3),
        RefConfig(0.2, 3, 2),
        strategies=BOTH,
    ),
    Case(
        "maml-o1-s3",
        "mlp",
        maml(inner_lr=0.2, inner_steps=3, order=1),
        RefConfig(0.2, 3, 1),
        strategies=BOTH,
    ),
    Case(
        "maml-eval-steps",
        "mlp",
        maml(inner_lr=0.2, inner_steps=1, eval_steps=3),
        RefConfig(0.2, 3, 2),
        mode="eval",
        strategies=BOTH,
    ),
    Case(
        "maml-frozen-first-layer",
        "mlp",
        maml(inner_lr=0.2, inner_steps=2),
        RefConfig(0.2, 2, 2),
        frozen=("0.weight", "0.bias"),
        strategies=BOTH,
    ),
    # -- learned inner rates ----------------------------------------------------------------
    Case(
        "metasgd-o2-s2",
        "mlp",
        lambda m, f, s: MetaSGD(m, f, 0.2, 2, strategy=s),
        RefConfig(0.2, 2, 2, lr_mode="per_param"),
        strategies=BOTH,
    ),
    Case(
        "metasgd-o1-s2",
        "mlp",
        lambda m, f, s: MetaSGD(m, f, 0.2, 2, order=1, strategy=s),
        RefConfig(0.2, 2, 1, lr_mode="per_param"),
        strategies=BOTH,
    ),
    Case(
        "lslr-o2-train3-of-4",
        "mlp",
        maml(inner_lr=0.2, inner_steps=3, eval_steps=4, learn_inner_lr="per_step"),
        RefConfig(0.2, 3, 2, lr_mode="per_step"),
        strategies=BOTH,
    ),
    Case(
        "lslr-o2-eval4",
        "mlp",
        maml(inner_lr=0.2, inner_steps=3, eval_steps=4, learn_inner_lr="per_step"),
        RefConfig(0.2, 4, 2, lr_mode="per_step"),
        mode="eval",
        strategies=BOTH,
    ),
    Case(
        "lslr-momentum-o2-s2",
        "mlp",
        maml(inner_lr=0.1, inner_steps=2, learn_inner_lr="per_step", inner_optimizer="momentum"),
        RefConfig(0.1, 2, 2, lr_mode="per_step", optimizer="momentum"),
        strategies=BOTH,
    ),
    # -- ANIL -------------------------------------------------------------------------------
    Case(
        "anil-prefix-o2-s2",
        "mlp",
        lambda m, f, s: ANIL(m, f, "4", 0.3, 2, strategy=s),
        RefConfig(0.3, 2, 2, adapt=HEAD),
        strategies=BOTH,
    ),
    Case(
        "anil-list-o2-s2",
        "mlp",
        lambda m, f, s: ANIL(m, f, ["2", "4.bias"], 0.3, 2, strategy=s),
        RefConfig(0.3, 2, 2, adapt=("2.weight", "2.bias", "4.bias")),
        strategies=BOTH,
    ),
    Case(
        "anil-predicate-o1-s2",
        "mlp",
        lambda m, f, s: ANIL(m, f, lambda n: n.endswith("weight"), 0.3, 2, order=1, strategy=s),
        RefConfig(0.3, 2, 1, adapt=("0.weight", "2.weight", "4.weight")),
        strategies=BOTH,
    ),
    Case(
        "metasgd-anil-adam-o2-s2",
        "mlp",
        lambda m, f, s: MetaSGD(m, f, 0.05, 2, adapt="4", inner_optimizer="adam", strategy=s),
        RefConfig(0.05, 2, 2, lr_mode="per_param", adapt=HEAD, optimizer="adam"),
        strategies=BOTH,
    ),
    # -- inner optimizers -------------------------------------------------------------------
    Case(
        "momentum-o2-s3",
        "mlp",
        maml(inner_lr=0.1, inner_steps=3, inner_optimizer="momentum"),
        RefConfig(0.1, 3, 2, optimizer="momentum"),
        strategies=BOTH,
    ),
    Case(
        "momentum-o1-s2",
        "mlp",
        maml(inner_lr=0.1, inner_steps=2, order=1, inner_optimizer="momentum"),
        RefConfig(0.1, 2, 1, optimizer="momentum"),
        strategies=BOTH,
    ),
    Case(
        "nesterov-o2-s3",
        "mlp",
        maml(inner_lr=0.1, inner_steps=3, inner_optimizer=Momentum(beta=0.5, nesterov=True)),
        RefConfig(0.1, 3, 2, optimizer="momentum", beta=0.5, nesterov=True),
        strategies=BOTH,
    ),
    Case(
        "adam-o2-s3",
        "mlp",
        maml(inner_lr=0.05, inner_steps=3, inner_optimizer="adam"),
        RefConfig(0.05, 3, 2, optimizer="adam"),
        strategies=BOTH,
    ),
    Case(
        "adam-o1-s2",
        "mlp",
        maml(inner_lr=0.05, inner_steps=2, order=1, inner_optimizer="adam"),
        RefConfig(0.05, 2, 1, optimizer="adam"),
        strategies=BOTH,
    ),
    Case(
        "adam-custom-o2-s3",
        "mlp",
        maml(inner_lr=0.05, inner_steps=3, inner_optimizer=Adam(b1=0.8, b2=0.9, eps=1e-3)),
        RefConfig(0.05, 3, 2, optimizer="adam", b1=0.8, b2=0.9, eps=1e-3),
        strategies=BOTH,
    ),
    # -- multi-step loss and MAML++ ---------------------------------------------------------
    Case(
        "msl-o2-s3-step0",
        "mlp",
        maml(inner_lr=0.2, inner_steps=3, multi_step_loss=True),
        RefConfig(0.2, 3, 2, weights=msl_weights_reference(3, 0, 1000)),
        strategies=BOTH,
    ),
    Case(
        "msl-o2-s3-step300",
        "mlp",
        maml(inner_lr=0.2, inner_steps=3, multi_step_loss=True, msl_anneal_steps=500),
        RefConfig(0.2, 3, 2, weights=msl_weights_reference(3, 300, 500)),
        meta_step=300,
        strategies=BOTH,
    ),
    Case(
        "msl-eval-is-final-step",
        "mlp",
        maml(inner_lr=0.2, inner_steps=3, multi_step_loss=True),
        RefConfig(0.2, 3, 2),
        mode="eval",
        strategies=BOTH,
    ),
    Case(
        "mamlpp-first-order-phase",
        "mlp",
        lambda m, f, s: MAMLpp(m, f, 0.2, 3, strategy=s),
        RefConfig(0.2, 3, 1, lr_mode="per_step", weights=msl_weights_reference(3, 0, 1000)),
        strategies=BOTH,
    ),
    Case(
        "mamlpp-second-order-phase",
        "mlp",
        lambda m, f, s: MAMLpp(m, f, 0.2, 3, strategy=s),
        RefConfig(0.2, 3, 2, lr_mode="per_step", weights=msl_weights_reference(3, 60, 1000)),
        meta_step=60,
        strategies=BOTH,
    ),
    # -- conv + BatchNorm (transductive) ----------------------------------------------------
    Case("bn-maml-o2-s2", "conv_bn", maml(inner_lr=0.3, inner_steps=2), RefConfig(0.3, 2, 2)),
    Case(
        "bn-maml-o1-s2",
        "conv_bn",
        maml(inner_lr=0.3, inner_steps=2, order=1),
        RefConfig(0.3, 2, 1),
    ),
    Case(
        "bn-maml-o2-eval",
        "conv_bn",
        maml(inner_lr=0.3, inner_steps=1, eval_steps=2),
        RefConfig(0.3, 2, 2),
        mode="eval",
    ),
    Case(
        "bn-running-policy-train",
        "conv_bn",
        maml(inner_lr=0.3, inner_steps=2, bn="running"),
        RefConfig(0.3, 2, 2),
    ),
    Case(
        "bn-metasgd-o2-s1",
        "conv_bn",
        lambda m, f, s: MetaSGD(m, f, 0.3, 1, strategy=s),
        RefConfig(0.3, 1, 2, lr_mode="per_param"),
    ),
    Case(
        "bn-anil-o2-s2",
        "conv_bn",
        lambda m, f, s: ANIL(m, f, "9", 0.3, 2, strategy=s),
        RefConfig(0.3, 2, 2, adapt=("9.weight", "9.bias")),
    ),
    Case(
        "bn-adam-o2-s2",
        "conv_bn",
        maml(inner_lr=0.05, inner_steps=2, inner_optimizer="adam"),
        RefConfig(0.05, 2, 2, optimizer="adam"),
        fd_h=1e-6,
    ),
    Case(
        "bn-per-step-bn-o2-s2",
        "conv_bn",
        maml(inner_lr=0.3, inner_steps=2, eval_steps=3, per_step_bn=True),
        RefConfig(0.3, 2, 2, norm_params=BN_PARAMS),
    ),
    Case(
        "bn-per-step-bn-eval3",
        "conv_bn",
        maml(inner_lr=0.3, inner_steps=2, eval_steps=3, per_step_bn=True),
        RefConfig(0.3, 3, 2, norm_params=BN_PARAMS),
        mode="eval",
    ),
    Case(
        "bn-mamlpp-o2-s2",
        "conv_bn",
        lambda m, f, s: MAMLpp(m, f, 0.3, 2, strategy=s),
        RefConfig(
            0.3,
            2,
            2,
            lr_mode="per_step",
            weights=msl_weights_reference(2, 100, 1000),
            norm_params=BN_PARAMS,
        ),
        meta_step=100,
    ),
    # -- LayerNorm, GroupNorm, GRU ----------------------------------------------------------
    Case("ln-maml-o2-s2", "mlp_ln", maml(inner_lr=0.2, inner_steps=2), RefConfig(0.2, 2, 2)),
    Case(
        "ln-per-step-bn-o2-s2",
        "mlp_ln",
        maml(inner_lr=0.2, inner_steps=2, per_step_bn=True),
        RefConfig(0.2, 2, 2, norm_params=LN_PARAMS),
    ),
    Case("gn-maml-o2-s2", "conv_gn", maml(inner_lr=0.3, inner_steps=2), RefConfig(0.3, 2, 2)),
    Case(
        "gn-per-step-bn-o2-s2",
        "conv_gn",
        maml(inner_lr=0.3, inner_steps=2, per_step_bn=True),
        RefConfig(0.3, 2, 2, norm_params=BN_PARAMS),
    ),
    Case("gru-maml-o2-s2", "gru", maml(inner_lr=0.3, inner_steps=2), RefConfig(0.3, 2, 2)),
    Case("gru-maml-o1-s2", "gru", maml(inner_lr=0.3, inner_steps=2, order=1), RefConfig(0.3, 2, 1)),
    Case(
        "gru-metasgd-o2-s1",
        "gru",
        lambda m, f, s: MetaSGD(m, f, 0.3, 1, strategy=s),
        RefConfig(0.3, 1, 2, lr_mode="per_param"),
    ),
]

PARAMS = [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in c.strategies]
# The per-task Hessian-vector-product chain strategy, where the engine has it: reference only.
EXTRA = ("hvp_chain",) if "hvp_chain" in STRATEGIES else ()
REF_PARAMS = PARAMS + [pytest.param(c, s, id=f"{c.id}-{s}") for c in CASES for s in EXTRA]


def build(case: Case, strategy: str) -> tuple[nn.Module, tuple]:
    """The learner for ``case`` with randomized learned tensors, and a meta-batch."""
    model = MODELS[case.model]()
    for name, p in model.named_parameters():
        if name in case.frozen:
            p.requires_grad_(False)
    learner = case.make(model, LOSSES[case.model], strategy)
    learner.train(case.mode == "train")
    with torch.no_grad():
        learner.meta_step.fill_(case.meta_step)
        # Distinct values per element / step so that index mix-ups cannot cancel out.
        for p in learner.inner_lrs.values():
            p.mul_(0.5 + torch.rand_like(p))
        for p in learner.step_norm.values():
            p.add_(0.2 * torch.randn_like(p))
    return learner, tasks(case.model)


@pytest.mark.parametrize(("case", "strategy"), REF_PARAMS)
def test_meta_grad_matches_reference(case: Case, strategy: str) -> None:
    learner, batch = build(case, strategy)
    got = learner.meta_grad(*batch)
    loss, want = reference_meta_grad(learner, LOSSES[case.model], case.cfg, *batch)
    err = rel_err(got, want)
    print(f"ORACLE reference {case.id}-{strategy} {err:.3e}")
    assert err <= REF_TOL
    with torch.no_grad():
        value = learner.meta_loss(*batch)
    assert float((value - loss).abs()) <= REF_TOL * float(loss.abs())
    # meta_grad reports exactly the learner's meta-parameters (frozen ones excluded).
    assert set(got) == {k for k, p in learner.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("case", "strategy"),
    [p for p in PARAMS if p.values[0].exact],  # type: ignore[union-attr]
)
def test_meta_grad_matches_finite_differences(case: Case, strategy: str) -> None:
    learner, batch = build(case, strategy)
    got = learner.meta_grad(*batch)
    errs = fd_rel_errors(learner, got, batch, n_dirs=2, h=case.fd_h)
    print(f"ORACLE fd {case.id}-{strategy} {max(errs):.3e}")
    assert max(errs) <= FD_TOL


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.cfg.lr_mode is not None and c.exact and c.model != "conv_bn"],
    ids=lambda c: c.id,
)
def test_learned_rates_match_elementwise_finite_differences(case: Case) -> None:
    """gradcheck-style: one coordinate of the learned rates at a time.

    Single entries of the rate gradient can be ~1e-5 while the loss is O(1), so the step is
    1e-4 (roundoff ~1e-12/h dominates below that) and the error is relative to the larger of
    the entry and 1% of the largest entry of the rates' gradient (gradcheck's atol + rtol idea).
    """
    learner, batch = build(case, "loop")
    got = learner.meta_grad(*batch)
    rate_grads = [got[f"inner_lrs.{name}"] for name in learner.inner_lrs]
    scale = 1e-2 * max(float(g.abs().max()) for g in rate_grads if g is not None)
    worst = 0.0
    for name, rate in learner.inner_lrs.items():
        g = got[f"inner_lrs.{name}"]
        assert g is not None
        for j in torch.randperm(rate.numel())[:2].tolist():
            e = torch.zeros(rate.numel(), dtype=rate.dtype)
            e[j] = 1.0
            numeric = fd_directional(
                lambda: learner.meta_loss(*batch), [rate], [e.reshape(rate.shape)], h=1e-4
            )
            analytic = float(g.reshape(-1)[j])
            err = abs(numeric - analytic) / max(abs(numeric), abs(analytic), scale)
            worst = max(worst, err)
    print(f"ORACLE fd-rates {case.id} {worst:.3e}")
    assert worst <= FD_TOL


@pytest.mark.parametrize("case", [c for c in CASES if "vmap" in c.strategies], ids=lambda c: c.id)
def test_loop_and_vmap_agree(case: Case) -> None:
    torch.manual_seed(1)
    learner_loop, batch = build(case, "loop")
    torch.manual_seed(1)
    learner_vmap, _ = build(case, "vmap")
    err = rel_err(learner_vmap.meta_grad(*batch), learner_loop.meta_grad(*batch))
    print(f"ORACLE loop-vs-vmap {case.id} {err:.3e}")
    assert err <= REF_TOL


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.id in ("gn-maml-o2-s2", "bn-maml-o1-s2")], ids=lambda c: c.id
)
def test_forced_vmap_on_norm_layers_agrees_where_exact(case: Case) -> None:
    """GroupNorm (any order) and BatchNorm at first order: forced vmap matches the reference."""
    learner, batch = build(case, "vmap")
    _, want = reference_meta_grad(learner, LOSSES[case.model], case.cfg, *batch)
    assert rel_err(learner.meta_grad(*batch), want) <= REF_TOL


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.id in ("bn-maml-o2-s2", "ln-maml-o2-s2")], ids=lambda c: c.id
)
def test_forced_vmap_on_batch_and_layer_norm_second_order_is_refused(case: Case) -> None:
    """The batched double backward of BatchNorm/LayerNorm is wrong (rel. err 1e-3..4e-2 measured,
    cf. pytorch/functorch#534): an explicit strategy='vmap' at order 2 must be refused, not run."""
    with pytest.raises(ValueError, match="strategy='vmap' with order=2 gives WRONG"):
        build(case, "vmap")


def test_forced_vmap_is_refused_by_the_functional_layer_too() -> None:
    """Order annealing can switch a learner to order 2 later: the engine re-checks every call."""
    from metagrad.algorithms._task import meta_gradient

    case = next(c for c in CASES if c.id == "bn-maml-o2-s2")
    learner, batch = build(case, "loop")
    spec = learner.inner_spec(learner.inner_steps, 2, training=True)
    with pytest.raises(ValueError, match="WRONG meta-gradients"):
        meta_gradient(
            learner.objective,
            spec,
            learner.fmodel.params(),
            {},
            batch,
            strategy="vmap",
        )
