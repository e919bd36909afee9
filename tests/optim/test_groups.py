"""Parameter groups, state structure, purity, and the docstring examples."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from optim_cases import CASES, Case, case_id, grads_at, init_params, make_metagrad
from torch.utils._pytree import tree_flatten

import metagrad.optim as mo


def test_select_forms_and_first_match_wins() -> None:
    names = ["layer1.weight", "layer1.bias", "layer10.weight", "head.weight", "head.bias"]
    opt = mo.SGD(
        lr=1.0,
        groups=(
            mo.Group("head.bias", lr=2.0),
            mo.Group(lambda n: n.startswith("head"), lr=3.0),
            mo.Group(["layer1", "nothing"], lr=4.0),
            mo.Group("layer1.weight", lr=5.0),  # shadowed by the group before it
        ),
    )
    params = {n: torch.zeros(1, dtype=torch.float64) for n in names}
    new, _ = opt.update(
        {n: torch.ones(1, dtype=torch.float64) for n in names}, opt.init(params), params, 0
    )
    assert {n: -new[n].item() for n in names} == {
        "layer1.weight": 4.0,
        "layer1.bias": 4.0,
        "layer10.weight": 1.0,  # a prefix matches whole path components only
        "head.weight": 3.0,
        "head.bias": 2.0,
    }


def test_group_repr_and_hash() -> None:
    g = mo.Group({"b", "a"}, lr=0.1, betas=[0.8, 0.9])
    assert repr(g) == "Group(('a', 'b'), lr=0.1, betas=(0.8, 0.9))"
    assert hash(mo.Adam(groups=(g,))) == hash(
        mo.Adam(groups=(mo.Group(["a", "b"], lr=0.1, betas=(0.8, 0.9)),))
    )


def test_state_is_a_pytree_of_tensors() -> None:
    params = init_params()
    assert mo.SGD().init(params) == mo.EmptyState()
    state = mo.Adam(groups=(mo.Group("head", amsgrad=True),)).init(params)
    assert isinstance(state, mo.AdamState)
    assert sorted(state.max_exp_avg_sq) == ["head.bias", "head.weight"]
    leaves, _ = tree_flatten(state)
    assert len(leaves) == 10 and all(isinstance(t, torch.Tensor) for t in leaves)


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_update_is_pure(case: Case) -> None:
    """No input is written to (version counters unchanged); the same call twice agrees."""
    opt = make_metagrad(case)
    params = init_params()
    state = opt.init(params)
    for step in range(3):
        grads = grads_at(params)
        inputs = tree_flatten((grads, state, params))[0]
        versions = [t._version for t in inputs]
        snapshot = [t.clone() for t in inputs]
        a, _ = opt.update(grads, state, params, step)
        b, state_b = opt.update(grads, state, params, step)
        assert [t._version for t in inputs] == versions
        assert all(torch.equal(t, s) for t, s in zip(inputs, snapshot))
        assert all(torch.equal(a[k], b[k]) for k in a)
        params, state = b, state_b


MODULES = [
    "",
    "._base",
    "._sgd",
    "._adam",
    "._adamw",
    "._rmsprop",
    "._adagrad",
    "._adadelta",
    "._adamax",
    "._asgd",
    "._rprop",
    "._convert",
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module("metagrad.optim" + module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
