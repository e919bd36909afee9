"""compile=...: the compiled vmapped meta-gradient equals the eager one; misuse is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad as mg

D = torch.float64


def _setup() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).to(D)
    g = torch.Generator().manual_seed(1)
    return model, tuple(torch.randn(4, 5, 1, generator=g, dtype=D) for _ in range(4))


def _check(backend: bool | str) -> None:
    model, tasks = _setup()
    eager = mg.MAML(model, F.mse_loss, 0.1, 2, strategy="vmap").meta_grad(*tasks)
    learner = mg.MAML(model, F.mse_loss, 0.1, 2, strategy="vmap", compile=backend)
    for _ in range(2):  # second call hits the cache
        got = learner.meta_grad(*tasks)
        for k in eager:
            assert torch.allclose(got[k], eager[k], rtol=1e-10, atol=1e-14), k  # type: ignore[arg-type]
    assert len(learner.cache.compiled) == 1
    loss = learner.meta_loss(*tasks)
    loss.backward()
    assert torch.allclose(model[0].weight.grad, eager["module.0.weight"], rtol=1e-10)  # type: ignore[arg-type]


def test_compile_aot_eager_matches_eager() -> None:
    _check("aot_eager")


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    _check(True)


def test_compile_needs_vmap() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="compile=True needs the vmap strategy"):
        mg.MAML(model, F.mse_loss, compile=True)
    with pytest.raises(TypeError, match=r"compile=1\.5"):
        mg.MAML(nn.Linear(2, 1), F.mse_loss, compile=1.5)  # type: ignore[arg-type]


def test_mamlpp_annealed_multi_step_weights_compile_once() -> None:
    """The multi-step-loss weights change every meta-step; they enter the compiled function as a
    tensor, so a 100-step MAML++ run compiles once (a counting backend sees every compile)."""
    compiles = []

    def counting_backend(gm: torch.fx.GraphModule, inputs: object) -> object:
        compiles.append(gm)
        return gm.forward

    model, tasks = _setup()
    learner = mg.MAMLpp(
        model,
        F.mse_loss,
        inner_lr=0.1,
        inner_steps=3,
        first_order_steps=0,
        msl_anneal_steps=100,
        strategy="vmap",
        compile=counting_backend,
    )
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    weights = set()
    for _ in range(100):
        opt.zero_grad()
        learner.meta_loss(*tasks).backward()
        opt.step()
        weights.add(learner.inner_spec(3, 2, training=True).step_weights)
    assert len(weights) >= 90  # the weights changed (almost) every step before the floor
    assert len(learner.cache.compiled) == 1
    assert len(compiles) == 1


@pytest.mark.parametrize("make", ["maml", "mamlpp"])
def test_the_compiled_meta_step_is_one_graph_without_breaks(make: str) -> None:
    """A graph break (e.g. a ContextVar read in the model call) silently runs the rest eagerly:
    the compiled path is then no faster than eager. The whole meta-step must be one graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, inputs: object) -> object:
        graphs.append(gm)
        return gm.forward

    model, tasks = _setup()
    if make == "maml":
        learner: mg.MAML = mg.MAML(model, F.mse_loss, 0.1, 2, compile=counting_backend)
    else:
        learner = mg.MAMLpp(
            model, F.mse_loss, inner_lr=0.1, inner_steps=2, compile=counting_backend
        )
    learner.meta_loss(*tasks).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(graphs) == 1
