"""Every metagrad optimizer produces torch.optim's iterates, step by step, in float64."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from optim_cases import (
    CASES,
    Case,
    case_id,
    grads_at,
    init_params,
    make_metagrad,
    make_torch,
    rel_err,
)

import metagrad.optim as mo

STEPS = 20
TOL = 1e-12


@pytest.fixture(autouse=True)
def _float64_default() -> Iterator[None]:
    # torch.optim keeps some scalar state (ASGD's eta and mu) in the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _run_against_torch(opt: mo.Optimizer, torch_opt: torch.optim.Optimizer, tensors: dict) -> float:
    """Step both with the same gradients; return the worst relative error over the steps."""
    params = init_params()
    state = opt.init(params)
    worst = 0.0
    for step in range(STEPS):
        grads = grads_at({k: t.detach() for k, t in tensors.items()})
        for k, t in tensors.items():
            t.grad = grads[k].clone()
        torch_opt.step()
        params, state = opt.update(grads, state, params, step)
        for k, t in tensors.items():
            err = rel_err(params[k], t.detach())
            assert err <= TOL, f"step {step}, {k}: relative error {err:.3g}"
            worst = max(worst, err)
    return worst


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_torch_optim(case: Case) -> None:
    """20 steps: the same iterates as the torch.optim class fed the same gradients."""
    tensors = {k: torch.nn.Parameter(v) for k, v in init_params().items()}
    _run_against_torch(make_metagrad(case), make_torch(case, tensors), tensors)


# Every class, each with two param groups that differ in several hyperparameters and flags.
GROUP_CASES = [c for c in CASES if c[2] is not None]


@pytest.mark.parametrize("case", GROUP_CASES, ids=case_id)
def test_from_torch_matches_torch_optim(case: Case) -> None:
    """from_torch(torch_opt) follows that same torch optimizer, param groups included."""
    tensors = {k: torch.nn.Parameter(v) for k, v in init_params().items()}
    torch_opt = make_torch(case, tensors)
    opt = mo.from_torch(torch_opt, tensors)
    assert type(opt).__name__ == case[0]
    _run_against_torch(opt, torch_opt, tensors)


def test_from_torch_adam_decoupled_is_adamw() -> None:
    """torch.optim.Adam(decoupled_weight_decay=True) converts to AdamW, with equal iterates."""
    tensors = {k: torch.nn.Parameter(v) for k, v in init_params().items()}
    torch_opt = torch.optim.Adam(
        list(tensors.values()), lr=0.05, weight_decay=0.3, decoupled_weight_decay=True
    )
    opt = mo.from_torch(torch_opt, tensors)
    assert isinstance(opt, mo.AdamW)
    _run_against_torch(opt, torch_opt, tensors)
