"""The adjoint and checkpoint strategies batched over problems (``vmap`` of VJPs) are exact.

Reference: the unrolled loop over problems (float64, whole-gradient relative error), for the
MAML family (``strategy="hvp_chain"``/``"checkpoint"`` on a vmap-safe MLP) and for the bilevel
API with optimizer state (momentum, Adam), tensor hyperparameters of the optimizer, multi-step
outer weights, first order and per-step batches. Also: problems in groups give the same
result, closed-over tensors fall back to the per-problem chain (which delivers their gradient),
and a NaN is still named with its problem and step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad as mg
import metagrad.bilevel._adjoint_vmap as AV
import metagrad.bilevel._api as A
from metagrad import bilevel, optim
from metagrad._errors import NonFiniteError

D = torch.float64
P, N, DIM = 3, 12, 3


@pytest.fixture
def spy(count_calls: Callable[[object, str], list[int]]) -> list[int]:
    """Counts calls of the batched adjoint (so a test knows which path ran)."""
    return count_calls(A, "adjoint_vmapped")


def _rel_dict(a: dict[str, Tensor | None], b: dict[str, Tensor | None]) -> float:
    keys = [k for k, v in b.items() if v is not None]
    assert all(a[k] is not None for k in keys)
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in keys) ** 0.5  # type: ignore[operator]
    return num / sum(float(b[k].norm() ** 2) for k in keys) ** 0.5  # type: ignore[union-attr]


def _tasks(T: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    xs, xq = torch.randn(T, 8, 1, generator=g, dtype=D), torch.randn(T, 8, 1, generator=g, dtype=D)
    return xs, torch.sin(3 * xs), xq, torch.sin(3 * xq)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    ).to(D)


@pytest.mark.parametrize("strategy", ["hvp_chain", "checkpoint"])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("order", [2, 1])
def test_maml_batched_adjoint_equals_the_loop(
    strategy: str, steps: int, order: int, spy: list[int]
) -> None:
    model, tasks = _mlp(), _tasks()
    ref = mg.MAML(model, F.mse_loss, 0.1, steps, order=order, strategy="loop").meta_grad(*tasks)
    got = mg.MAML(model, F.mse_loss, 0.1, steps, order=order, strategy=strategy).meta_grad(*tasks)
    assert spy, "the batched adjoint did not run"
    assert _rel_dict(got, ref) < 1e-12


def test_maml_plus_plus_multi_step_loss_batched(spy: list[int]) -> None:
    model, tasks = _mlp(), _tasks()
    kw: dict[str, Any] = dict(inner_lr=0.1, inner_steps=3, multi_step_loss=True)
    ref = mg.MAMLpp(model, F.mse_loss, strategy="loop", **kw).meta_grad(*tasks)
    got = mg.MAMLpp(model, F.mse_loss, strategy="hvp_chain", **kw).meta_grad(*tasks)
    assert spy
    assert _rel_dict(got, ref) < 1e-12


def _data(seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P, N, DIM, generator=g, dtype=D)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D) + 0.3 * torch.randn(P, N, generator=g, dtype=D)
    Xv = torch.randn(P, N, DIM, generator=g, dtype=D)
    return (X, y), (Xv, Xv @ torch.tensor([1.0, -2.0, 0.5], dtype=D))


def _inner(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    r = torch.tanh(b[0] @ w["w"]) + w["b"] - b[1]
    return 0.5 * (h["ex"] * r**2).mean() + 0.5 * (h["wd"] * w["w"] ** 2).sum()


def _outer(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    return 0.5 * ((torch.tanh(b[0] @ w["w"]) + w["b"] - b[1]) ** 2).mean()


def _leaves() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    w0 = {
        "w": torch.tensor([0.1, -0.2, 0.3], dtype=D, requires_grad=True),
        "b": torch.zeros((), dtype=D, requires_grad=True),
    }
    h = {
        "ex": torch.linspace(0.8, 1.2, N, dtype=D).requires_grad_(),
        "wd": torch.full((DIM,), 0.05, dtype=D, requires_grad=True),
    }
    return w0, h


def _flat(res: bilevel.HyperGrad) -> Tensor:
    gs = [res.grads.w0["w"], res.grads.w0["b"], res.grads.h["ex"], res.grads.h["wd"]]
    gs += [res.grads.opt[k] for k in sorted(res.grads.opt)]
    return torch.cat([g.reshape(-1) for g in gs if g is not None])


CASES = {
    "sgd-momentum-lr-tensor": dict(
        optimizer=lambda: optim.SGD(lr=torch.tensor(0.1, dtype=D, requires_grad=True), momentum=0.9)
    ),
    "adam": dict(optimizer=lambda: optim.Adam(lr=torch.tensor(0.05, dtype=D, requires_grad=True))),
    "outer-weights": dict(
        optimizer=lambda: optim.SGD(lr=0.1, momentum=0.5), outer_weights=(0.2, 0.3, 0.0, 0.5, 1.0)
    ),
    # first order: h acts through the inner gradients only, so it has no gradient (None)
    "first-order": dict(optimizer=lambda: optim.SGD(lr=0.1), order=1, allow_unused_hyper=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", ["adjoint", "checkpoint"])
def test_bilevel_batched_adjoint_equals_the_unrolled_loop(
    case: str, strategy: str, spy: list[int]
) -> None:
    kw = dict(CASES[case])
    opt = kw.pop("optimizer")()
    pb = bilevel.Problem(_inner, _outer, opt, 5, **kw)
    di, do = _data(0)
    w0, h = _leaves()
    ref = bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll", batched=True)
    got = bilevel.hypergrad(pb, w0, h, di, do, strategy=strategy, batched=True, vmap_ok=True)
    assert spy
    assert got.strategy == strategy
    assert float((_flat(got) - _flat(ref)).norm() / _flat(ref).norm()) < 1e-12
    assert torch.allclose(got.per_problem, ref.per_problem, rtol=1e-13)


def test_per_step_batches_and_groups_of_problems() -> None:
    pb = bilevel.Problem(_inner, _outer, optim.SGD(lr=0.1, momentum=0.9), 3)
    batches = [_data(s)[0] for s in range(3)]
    di = bilevel.PerStep(batches)
    do = _data(7)[1]
    w0, h = _leaves()
    ref = _flat(bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll", batched=True))
    got = _flat(
        bilevel.hypergrad(pb, w0, h, di, do, strategy="adjoint", batched=True, vmap_ok=True)
    )
    assert float((got - ref).norm() / ref.norm()) < 1e-12
    flat = _flat_of(pb, w0, h)
    for group in (1, 2, P):
        res, _ = AV.adjoint_vmapped(pb, flat, di, do, every=None, check=False, group=group)
        assert float((_flat(res) - ref).norm() / ref.norm()) < 1e-12, group


def test_batch_memory_budget_decides_the_group(
    monkeypatch: pytest.MonkeyPatch, spy: list[int]
) -> None:
    """Problems whose iterates and step activations do not fit the budget two at a time run
    one at a time (per-problem chain); the group size is measured once per cache."""
    pb = bilevel.Problem(_inner, _outer, optim.SGD(lr=0.1), 3)
    di, do = _data(0)
    w0, h = _leaves()
    flat = _flat_of(pb, w0, h)
    one = AV._bank_bytes_per_problem(pb, flat, None)
    assert AV.group_size(pb, flat, di, None, budget=10**9) > P
    assert AV.group_size(pb, flat, di, None, budget=one) == 1  # activations count too
    ref = _flat(bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll", batched=True))
    monkeypatch.setattr(AV, "BATCH_BYTES", one)
    cache = bilevel.Cache()
    got = bilevel.hypergrad(
        pb, w0, h, di, do, strategy="adjoint", batched=True, vmap_ok=True, cache=cache
    )
    assert not spy  # did not batch
    assert list(cache.sizes.values()) == [1]
    assert float((_flat(got) - ref).norm() / ref.norm()) < 1e-12


def _flat_of(pb: bilevel.Problem, w0: dict[str, Tensor], h: dict[str, Tensor]) -> Any:
    from metagrad.bilevel._problem import MetaParams
    from metagrad.bilevel._tree import Flat

    return Flat(MetaParams(w0, h, pb.optimizer.hyperparams()), True)


def test_closed_over_tensor_falls_back_to_the_per_problem_chain(spy: list[int]) -> None:
    scale = torch.tensor(1.3, dtype=D, requires_grad=True)

    def inner(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return scale * _inner(w, h, b)

    pb = bilevel.Problem(inner, _outer, optim.SGD(lr=0.1), 3)
    di, do = _data(0)
    w0, h = _leaves()
    ref = bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll", batched=True)
    got = bilevel.hypergrad(pb, w0, h, di, do, strategy="adjoint", batched=True, vmap_ok=True)
    assert spy  # tried, then fell back
    assert float((_flat(got) - _flat(ref)).norm() / _flat(ref).norm()) < 1e-12
    assert len(got.foreign) == 1 and got.foreign[0][0] is scale
    assert torch.allclose(got.foreign[0][1], ref.foreign[0][1], rtol=1e-12)


def test_nan_is_named_with_problem_and_step() -> None:
    model, tasks = _mlp(), _tasks()
    xs = tasks[0].clone()
    xs[2, 3, 0] = float("nan")
    learner = mg.MAML(model, F.mse_loss, 0.1, 2, strategy="hvp_chain")
    with pytest.raises(NonFiniteError, match=r"task 2.*step 0|step 0.*task 2"):
        learner.meta_grad(xs, *tasks[1:])


@pytest.mark.parametrize("strategy", ["unroll", "adjoint", "vmap"])
def test_batched_per_step_data_is_indexed_per_problem(strategy: str) -> None:
    """Problem ``i`` trains on batch ``i`` of every step (a PerStep used to reach each problem
    whole in the per-problem loops): the batched result is the mean of the single problems."""
    pb = bilevel.Problem(_inner, _outer, optim.SGD(lr=0.1, momentum=0.9), 3)
    batches = [_data(s)[0] for s in range(3)]
    do = _data(7)[1]
    w0, h = _leaves()
    got = _flat(
        bilevel.hypergrad(pb, w0, h, bilevel.PerStep(batches), do, strategy=strategy, batched=True)
    )
    singles = []
    for i in range(P):
        di = bilevel.PerStep([tuple(t[i] for t in b) for b in batches])
        singles.append(
            _flat(bilevel.hypergrad(pb, w0, h, di, tuple(t[i] for t in do), strategy="unroll"))
        )
    want = torch.stack(singles).mean(0)
    assert float((got - want).norm() / want.norm()) < 1e-12


def test_one_task_runs_the_loop_not_vmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` on a meta-batch of one task takes the loop (vmap over one task is the same
    work plus the transforms' fixed cost); hvp_chain the per-problem chain. Same gradients."""
    import metagrad.bilevel._vmap as V

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("vmap ran for one task")

    model = _mlp()
    one = tuple(t[:1] for t in _tasks())
    ref = mg.MAML(model, F.mse_loss, 0.1, 2, strategy="loop").meta_grad(*one)
    monkeypatch.setattr(A, "vmapped", refuse)
    monkeypatch.setattr(A, "adjoint_vmapped", refuse)
    for strategy in ("auto", "hvp_chain"):
        got = mg.MAML(model, F.mse_loss, 0.1, 2, strategy=strategy).meta_grad(*one)
        assert _rel_dict(got, ref) < 1e-12, strategy
    assert V.vmapped is not refuse


@pytest.mark.parametrize(
    ("width", "rows", "batched"),
    [
        (16, 8, True),  # small tasks: vmap
        (320, 2, False),  # 103k adapted parameters per task (>= 1e5): the loop
        (100, 500, False),  # 10k parameters x 1,000 examples (>= 1e7): the loop
    ],
)
def test_auto_batches_only_small_tasks(
    width: int, rows: int, batched: bool, count_calls: Callable[[object, str], list[int]]
) -> None:
    """``auto`` (and hvp_chain's batching over tasks) vmaps a vmap-safe model only below
    ``vmap_pays``' sizes; above them it runs the per-task loop (BENCHMARKS.md: vmap measured
    1.1-1.9x the loop there). Same meta-gradient either way."""
    import metagrad.algorithms._task as TK

    calls = {name: count_calls(A, name) for name in ("vmapped", "adjoint_vmapped")}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)).to(D)
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(2, rows, width, generator=g, dtype=D) for _ in range(2))
    ys, yq = xs.sum(-1, keepdim=True).sin(), xq.sum(-1, keepdim=True).sin()
    p = sum(t.numel() for t in model.parameters())
    assert TK.vmap_pays(dict(model.named_parameters()), xs, xq) is batched, p
    ref = mg.MAML(model, F.mse_loss, 0.01, 2, strategy="loop").meta_grad(xs, ys, xq, yq)
    for strategy, engine in (("auto", "vmapped"), ("hvp_chain", "adjoint_vmapped")):
        calls[engine].clear()
        got = mg.MAML(model, F.mse_loss, 0.01, 2, strategy=strategy).meta_grad(xs, ys, xq, yq)
        assert bool(calls[engine]) is batched, strategy
        assert _rel_dict(got, ref) < 1e-12, strategy


@pytest.mark.parametrize("learner", ["metasgd", "mamlpp", "maml-adam", "maml-momentum"])
@pytest.mark.parametrize("strategy", ["hvp_chain", "checkpoint"])
def test_learned_rates_and_stateful_inner_optimizers_batched(
    learner: str, strategy: str, spy: list[int]
) -> None:
    """Per-weight rates (vmapped update), per-layer per-step rates and Adam/momentum (the
    update applied to the batched leaves directly) give the loop's gradient, rates included."""
    model, tasks = _mlp(), _tasks()

    def make(s: str) -> mg.Learner:
        if learner == "metasgd":
            return mg.MetaSGD(model, F.mse_loss, 0.1, 3, strategy=s)
        if learner == "mamlpp":
            return mg.MAMLpp(model, F.mse_loss, 0.1, 3, strategy=s)
        opt = learner.split("-")[1]
        return mg.MAML(model, F.mse_loss, 0.05, 3, strategy=s, inner_optimizer=opt)

    ref = make("loop").meta_grad(*tasks)
    got = make(strategy).meta_grad(*tasks)
    assert spy, "the batched adjoint did not run"
    assert len(got) == len(ref) and _rel_dict(got, ref) < 1e-11


@pytest.mark.parametrize(
    "opt",
    [
        optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        optim.Adam(lr=torch.tensor(0.05, dtype=D), weight_decay=0.1),
        optim.AdamW(lr=0.05, betas=(0.8, 0.9)),
        optim.SGD(lr=torch.full((2,), 0.1, dtype=D)),  # shaped: vmapped
        optim.Adagrad(lr=0.1),  # not in the elementwise list: vmapped
    ],
    ids=["sgd-nesterov", "adam-tensor-lr", "adamw", "sgd-shaped-lr", "adagrad"],
)
def test_batched_update_equals_vmap_of_the_update(opt: optim.Optimizer) -> None:
    from metagrad.bilevel._adjoint_vmap import batched_update

    g = torch.Generator().manual_seed(0)
    w = {
        "a": torch.randn(4, 3, 2, generator=g, dtype=D),
        "b": torch.randn(4, 2, generator=g, dtype=D),
    }
    state = torch.func.vmap(opt.init)(w)
    for k in range(3):
        grads = {n: torch.randn(v.shape, generator=g, dtype=D) for n, v in w.items()}
        ref = torch.func.vmap(lambda x, gr, st, k=k: opt.update(gr, st, x, k, None))(
            w, grads, state
        )
        got = batched_update(opt, grads, state, w, k, None)
        for x, y in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)):
            assert torch.allclose(x, y, rtol=1e-14, atol=0)
        w, state = got
    lrs = {"a": torch.tensor(0.2, dtype=D), "b": 0.3}
    grads = {n: torch.ones_like(v) for n, v in w.items()}
    ref = torch.func.vmap(lambda x, gr, st: opt.update(gr, st, x, 3, lrs))(w, grads, state)
    got = batched_update(opt, grads, state, w, 3, lrs)
    for x, y in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)):
        assert torch.allclose(x, y, rtol=1e-14, atol=0)
