"""Bad input fails early with a message naming the optimizer, the value and the fix."""

from __future__ import annotations

import re

import pytest
import torch
from optim_cases import OPTIMIZERS, grads_at, init_params

import metagrad.optim as mo


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_negative_lr(name: str) -> None:
    with pytest.raises(
        ValueError, match=rf"metagrad\.optim\.{name}: lr=-0\.1 is out of range; it must be >= 0"
    ):
        getattr(mo, name)(lr=-0.1)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax"])
def test_negative_eps(name: str) -> None:
    with pytest.raises(ValueError, match=rf"metagrad\.optim\.{name}: eps=-1e-08 is out of range"):
        getattr(mo, name)(eps=-1e-8)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adamax"])
@pytest.mark.parametrize(
    "betas, label", [((1.0, 0.999), r"betas\[0\]=1\.0"), ((0.9, -0.1), r"betas\[1\]=-0\.1")]
)
def test_betas_outside_unit_interval(name: str, betas: tuple[float, float], label: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"metagrad\.optim\.{name}: {label} is out of range; it must be in \[0, 1\)",
    ):
        getattr(mo, name)(betas=betas)


def test_group_values_are_validated_too() -> None:
    with pytest.raises(
        ValueError, match=r"metagrad\.optim\.SGD: lr=-1\.0 in groups\[0\] \(select='head'\)"
    ):
        mo.SGD(groups=(mo.Group("head", lr=-1.0),))


def test_unknown_group_hyperparameter_lists_valid_ones() -> None:
    msg = r"metagrad\.optim\.Adam: groups\[0\] \(select='layer1'\) sets 'momentum', which Adam does not have; valid hyperparameters: lr, betas, eps, weight_decay, eps_root, amsgrad, maximize"
    with pytest.raises(ValueError, match=msg):
        mo.Adam(groups=(mo.Group("layer1", momentum=0.9),))


def test_wrong_hyperparameter_shape_names_everything() -> None:
    """Checked at the first update: optimizer, hyperparameter, parameter, shapes, the fix."""
    opt = mo.Adam(weight_decay=torch.ones(4, dtype=torch.float64))
    params = init_params()
    state = mo.Adam().init(params)  # a valid state: the update itself must check
    msg = (
        r"metagrad\.optim\.Adam: hyperparameter weight_decay has shape \(4,\), which does not "
        r"broadcast to parameter 'layer1\.weight' of shape \(5, 3\); give a number, a 0-d tensor "
        r"or a tensor broadcastable to \(5, 3\) .*Group\('layer1\.weight', weight_decay=\.\.\.\)"
    )
    with pytest.raises(ValueError, match=msg):
        opt.update(grads_at(params), state, params, 0)
    with pytest.raises(ValueError, match=msg):  # init resolves the same values
        opt.init(params)


def test_wrong_lr_shape_from_lrs() -> None:
    params = init_params()
    lrs = {k: torch.full((2, 2), 0.1, dtype=torch.float64) for k in params}
    with pytest.raises(
        ValueError, match=r"metagrad\.optim\.SGD: hyperparameter lr \(from lrs\) has shape \(2, 2\)"
    ):
        mo.SGD().update(grads_at(params), mo.EmptyState(), params, 0, lrs)


def test_lrs_missing_a_parameter() -> None:
    params = init_params()
    with pytest.raises(
        ValueError,
        match=r"metagrad\.optim\.SGD\.update: lrs has no learning rate for parameter 'layer1\.bias'",
    ):
        mo.SGD().update(grads_at(params), mo.EmptyState(), params, 0, {"layer1.weight": 0.1})


def test_grads_missing_a_parameter() -> None:
    params = init_params()
    grads = grads_at(params)
    del grads["head.bias"]
    with pytest.raises(
        ValueError, match=r"grads has no entry \(or None\) for parameter\(s\) \['head\.bias'\]"
    ):
        mo.SGD().update(grads, mo.EmptyState(), params, 0)
    grads["head.bias"] = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"torch\.zeros_like\(p\) for an unused one"):
        mo.SGD().update(grads, mo.EmptyState(), params, 0)


def test_bad_step() -> None:
    params = init_params()
    with pytest.raises(ValueError, match=r"step=-1 must be >= 0"):
        mo.SGD().update(grads_at(params), mo.EmptyState(), params, -1)
    with pytest.raises(TypeError, match=r"step=1\.5 must be a Python int"):
        mo.SGD().update(grads_at(params), mo.EmptyState(), params, 1.5)  # type: ignore[arg-type]


def test_state_from_another_optimizer() -> None:
    params = init_params()
    with pytest.raises(
        ValueError,
        match=r"metagrad\.optim\.Adam\.update: the state \(EmptyState\) has no exp_avg\['layer1\.weight'\]; build it with the same optimizer's init",
    ):
        mo.Adam().update(grads_at(params), mo.EmptyState(), params, 0)


def test_nesterov_needs_momentum_and_no_dampening() -> None:
    with pytest.raises(
        ValueError,
        match=r"metagrad\.optim\.SGD: nesterov=True needs momentum > 0 and dampening == 0",
    ):
        mo.SGD(nesterov=True)
    with pytest.raises(ValueError, match=r"nesterov=True in groups\[0\] .*needs momentum > 0"):
        mo.SGD(
            momentum=0.9,
            dampening=0.1,
            groups=(mo.Group("head", nesterov=True, dampening=0.0, momentum=0.0),),
        )


def test_rprop_ranges() -> None:
    with pytest.raises(
        ValueError,
        match=r"metagrad\.optim\.Rprop: etas\[0\]=1\.5 is out of range; it must be in \(0, 1\)",
    ):
        mo.Rprop(etas=(1.5, 2.0))
    with pytest.raises(ValueError, match=r"etas\[1\]=0\.9 is out of range; it must be > 1"):
        mo.Rprop(etas=(0.5, 0.9))
    with pytest.raises(
        ValueError, match=r"step_sizes=\(1\.0, 0\.1\) must be \(min, max\) with min <= max"
    ):
        mo.Rprop(step_sizes=(1.0, 0.1))


def test_bad_types() -> None:
    with pytest.raises(
        TypeError, match=r"metagrad\.optim\.SGD: lr='0\.1' must be a number or a tensor"
    ):
        mo.SGD(lr="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"metagrad\.optim\.Adam: betas=0\.9 must be a pair"):
        mo.Adam(betas=0.9)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"metagrad\.optim\.Adam: amsgrad=1 must be True or False"):
        mo.Adam(amsgrad=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"metagrad\.optim\.Group: select=3 is not supported"):
        mo.Group(3, lr=0.1)
    with pytest.raises(TypeError, match=r"groups=.* must be a tuple of metagrad\.optim\.Group"):
        mo.SGD(groups=({"params": "head", "lr": 0.1},))  # type: ignore[arg-type]


def test_with_hyperparams_unknown_key() -> None:
    opt = mo.SGD(lr=0.1, groups=(mo.Group("head", lr=0.2),))
    msg = r"metagrad\.optim\.SGD\.with_hyperparams: unknown key 'betas\.0'; valid keys: lr, momentum, dampening, weight_decay, groups\.0\.lr"
    with pytest.raises(ValueError, match=msg):
        opt.with_hyperparams({"betas.0": torch.tensor(0.9)})
    with pytest.raises(ValueError, match=r"unknown key 'groups\.0\.momentum'"):
        opt.with_hyperparams({"groups.0.momentum": torch.tensor(0.9)})


def test_from_torch_unsupported_class_lists_supported() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    msg = re.escape(
        "metagrad.optim.from_torch: torch.optim.nadam.NAdam is not supported; supported classes: torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD"
    )
    with pytest.raises(TypeError, match=msg):
        mo.from_torch(torch.optim.NAdam([w]), {"w": w})


def test_from_torch_names_must_cover_the_optimizer() -> None:
    w, v = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    with pytest.raises(
        ValueError,
        match=r"param_groups\[0\] holds a tensor of shape \(3,\) that is not in named_params",
    ):
        mo.from_torch(torch.optim.SGD([w, v]), {"w": w})
    with pytest.raises(
        ValueError, match=r"named_params has parameters the torch optimizer does not hold: \['v'\]"
    ):
        mo.from_torch(torch.optim.SGD([w]), {"w": w, "v": v})
