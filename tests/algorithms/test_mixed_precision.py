"""bfloat16 autocast forward passes with float32 meta-parameters, under exact second order.

Usage: ``with torch.autocast("cpu", dtype=torch.bfloat16): loss = learner.meta_loss(...)``.
Matmuls, convolutions and attention (and their backward and double backward) run in bfloat16;
parameters, adapted weights, inner gradients, losses and the meta-gradient stay float32.
Stated tolerances against the float64 meta-gradient of the same model and tasks:

* float32, no autocast: relative error <= 1e-5 (measured 4.2e-7);
* bfloat16 autocast: relative error <= 5e-2 and cosine >= 0.999 (measured 2.1e-2 / 0.9998 on
  this width-16 model; 6e-3 / 0.99999 on a width-32, 2-block ViT), at least 10x smaller than
  the second-order term itself (first vs second order differ by 46% here), so the Hessian term
  survives the reduced precision.

float16 autocast is refused while gradients are taken: without a loss scale small inner
gradients underflow.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import rel_err
from torch import Tensor, nn

import metagrad as mg
from metagrad.models import vit

F32_TOL = 1e-5
BF16_TOL, BF16_COS = 5e-2, 0.999


def _model() -> nn.Module:
    torch.manual_seed(0)
    return vit(n_way=5, image_size=16, patch=4, dim=16, depth=1, heads=2).double()


def _tasks(dtype: torch.dtype) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(2, 5, 1, 16, 16, generator=g, dtype=torch.float64)
    xq = torch.rand(2, 10, 1, 16, 16, generator=g, dtype=torch.float64)
    ys, yq = torch.arange(5).repeat(2, 1), torch.arange(5).repeat(2, 2)
    return xs.to(dtype), ys, xq.to(dtype), yq


def _as64(g: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    return {k: None if v is None else v.double() for k, v in g.items()}


def _cos(a: dict[str, Tensor | None], b: dict[str, Tensor | None]) -> float:
    u = torch.cat([a[k].reshape(-1) for k in sorted(b)])  # type: ignore[union-attr]
    v = torch.cat([b[k].reshape(-1) for k in sorted(b)])  # type: ignore[union-attr]
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("strategy", ["loop", "hvp_chain"])
def test_bf16_and_fp32_against_fp64(strategy: str) -> None:
    m64 = _model()
    m32 = copy.deepcopy(m64).float()
    exact = mg.MAML(m64, F.cross_entropy, 0.4, 1, order=2, strategy=strategy)
    want = exact.meta_grad(*_tasks(torch.float64))
    first = mg.MAML(m64, F.cross_entropy, 0.4, 1, order=1, strategy=strategy)
    hessian_term = rel_err(first.meta_grad(*_tasks(torch.float64)), want)

    learner = mg.MAML(m32, F.cross_entropy, 0.4, 1, order=2, strategy=strategy)
    g32 = learner.meta_grad(*_tasks(torch.float32))
    assert rel_err(_as64(g32), want) < F32_TOL

    with torch.autocast("cpu", dtype=torch.bfloat16):
        gbf = learner.meta_grad(*_tasks(torch.float32))
    assert all(v is not None and v.dtype == torch.float32 for v in gbf.values())
    err = rel_err(_as64(gbf), want)
    assert err < BF16_TOL and _cos(_as64(gbf), want) > BF16_COS, err
    assert hessian_term > 10 * err, (hessian_term, err)


def test_bf16_meta_step_keeps_float32_parameters() -> None:
    model = _model().float()
    learner = mg.MAML(model, F.cross_entropy, 0.4, 1, order=2)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = learner.meta_loss(*_tasks(torch.float32))
    assert loss.dtype == torch.float32  # cross_entropy runs in float32 under autocast
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = learner.adapt(_tasks(torch.float32)[0][0], _tasks(torch.float32)[1][0])
    assert all(v.dtype == torch.float32 for v in params.values())


def test_float16_autocast_is_refused_with_the_fix() -> None:
    learner = mg.MAML(_model().float(), F.cross_entropy, 0.4, 1, order=2)
    with (
        pytest.raises(ValueError, match=r"metagrad.MAML: .*float16.*loss scale.*bfloat16"),
        torch.autocast("cpu", dtype=torch.float16),
    ):
        learner.meta_loss(*_tasks(torch.float32))
    xs, ys, xq, _ = _tasks(torch.float32)
    params = learner.adapt(xs[0], ys[0])  # adaptation takes gradients: float32 (or bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # a plain forward is fine
        assert torch.isfinite(learner.predict(params, xq[0])).all()
