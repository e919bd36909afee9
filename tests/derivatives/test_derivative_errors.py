"""Bad input: every error names the public function, the value received and the fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from metagrad.derivatives import (
    HVPMode,
    grad_norm_penalty,
    hessian,
    hvp,
    jacobian,
    nth_derivative,
)

F64 = torch.float64


def square_sum(t: Any) -> Tensor:
    leaves = [t] if isinstance(t, Tensor) else list(t.values())
    return torch.stack([(leaf**2).sum() for leaf in leaves]).sum()


# ---------------------------------------------------------------- nth_derivative


@pytest.mark.parametrize(
    ("n", "exc", "pattern"),
    [
        (-1, ValueError, r"metagrad\.nth_derivative: n must be >= 0, got n=-1; n=0 returns f\(x\)"),
        (
            1.5,
            TypeError,
            r"metagrad\.nth_derivative: n must be a non-negative int, got a float .*n=2",
        ),
        (True, TypeError, r"metagrad\.nth_derivative: n must be a non-negative int, got a bool"),
    ],
)
def test_nth_derivative_bad_order(n: Any, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        nth_derivative(square_sum, torch.tensor(1.0, dtype=F64), n)


def test_nth_derivative_bad_x() -> None:
    with pytest.raises(
        TypeError, match=r"metagrad\.nth_derivative: x must be .*got a float .*torch.tensor"
    ):
        nth_derivative(square_sum, 2.0, 1)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"metagrad\.nth_derivative: x must be a floating-point tensor, got a torch.int64.*\.double\(\)",
    ):
        nth_derivative(square_sum, torch.tensor(2), 1)
    with pytest.raises(
        ValueError,
        match=r"metagrad\.nth_derivative: x must have exactly one element, got .*shape \(3,\).*hvp, hessian or jacobian",
    ):
        nth_derivative(square_sum, torch.ones(3, dtype=F64), 1)


def test_nth_derivative_non_scalar_output() -> None:
    with pytest.raises(
        ValueError,
        match=r"metagrad\.nth_derivative: f must return a scalar .*shape \(2,\).*\.sum\(\)",
    ):
        nth_derivative(lambda t: t * torch.ones(2, dtype=F64), torch.tensor(1.0, dtype=F64), 1)


# ---------------------------------------------------------------- hvp

X = {"a": torch.ones(2, dtype=F64), "b": torch.ones(3, dtype=F64)}


@pytest.mark.parametrize(
    ("x", "v", "exc", "pattern"),
    [
        (
            [torch.ones(2)],
            [torch.ones(2)],
            TypeError,
            r"metagrad\.hvp: x must be a tensor or a dict .*got a list.*named_parameters",
        ),
        (
            torch.ones(2, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32),
            TypeError,
            r"metagrad\.hvp: x must be a floating-point tensor, got a torch.int32",
        ),
        ({}, {}, ValueError, r"metagrad\.hvp: x is an empty dict"),
        (
            {"a": torch.ones(2, dtype=torch.long)},
            {"a": torch.ones(2)},
            TypeError,
            r"metagrad\.hvp: x\['a'\] must be a floating-point tensor, got a torch.int64",
        ),
        (
            X,
            {"a": torch.ones(2, dtype=F64)},
            ValueError,
            r"metagrad\.hvp: v has keys \['a'\] but x has keys \['a', 'b'\]; give v exactly the keys",
        ),
        (
            X,
            {"a": torch.ones(2, dtype=F64), "b": torch.ones(4, dtype=F64)},
            ValueError,
            r"metagrad\.hvp: v\['b'\] has shape \(4,\) but x\['b'\] has shape \(3,\)",
        ),
        (
            X,
            {"a": torch.ones(2), "b": torch.ones(3, dtype=F64)},
            TypeError,
            r"metagrad\.hvp: v\['a'\] has dtype torch.float32 .*torch.float64.*\.to\(torch.float64\)",
        ),
        (torch.ones(2, dtype=F64), X, TypeError, r"metagrad\.hvp: x is a Tensor but v is a dict"),
    ],
)
def test_hvp_bad_trees(x: Any, v: Any, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        hvp(square_sum, x, v)


def test_hvp_bad_mode() -> None:
    t = torch.ones(2, dtype=F64)
    with pytest.raises(
        ValueError, match=r"metagrad\.hvp: mode must be one of \['rev', 'fwd'\], got 'reverse'"
    ):
        hvp(square_sum, t, t, mode="reverse")  # type: ignore[call-overload]


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_hvp_bad_outputs(mode: HVPMode) -> None:
    t = torch.ones(2, dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"metagrad\.hvp: f must return a scalar \(one-element\) tensor, got .*shape \(2,\).*\.mean\(\)",
    ):
        hvp(lambda s: s**2, t, t, mode=mode)
    with pytest.raises(
        TypeError, match=r"metagrad\.hvp: f must return a scalar tensor, got a float .*\.item\(\)"
    ):
        hvp(lambda s: 1.0, t, t, mode=mode)
    with pytest.raises(
        TypeError,
        match=r"metagrad\.hvp: with has_aux=True, f must return a pair \(output, aux\).*has_aux=False",
    ):
        hvp(square_sum, t, t, mode=mode, has_aux=True)


def test_hvp_unused_tensor_input() -> None:
    c = torch.tensor(2.0, dtype=F64, requires_grad=True)
    t = torch.ones(2, dtype=F64)
    with pytest.raises(
        ValueError, match=r"metagrad\.hvp: x does not reach f's output.*allow_unused=True"
    ):
        hvp(lambda s: c**2, t, t)


# ---------------------------------------------------------------- hessian / jacobian


def test_hessian_and_jacobian_bad_input() -> None:
    t = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match=r"metagrad\.hessian: f must return a scalar"):
        hessian(lambda s: s**2, t)
    with pytest.raises(
        TypeError, match=r"metagrad\.hessian: x must be a tensor or a dict .*got a tuple"
    ):
        hessian(square_sum, (t,))  # type: ignore[call-overload]
    with pytest.raises(
        TypeError,
        match=r"metagrad\.jacobian: f\(x\) must be a tensor or a dict name -> tensor, got a list",
    ):
        jacobian(lambda s: [s], t)
    with pytest.raises(
        TypeError,
        match=r"metagrad\.jacobian: f\(x\) must be a floating-point tensor, got a torch.int64",
    ):
        jacobian(lambda s: s.long(), t)
    with pytest.raises(
        ValueError, match=r"metagrad\.jacobian: x does not reach f's output.*allow_unused=True"
    ):
        jacobian(lambda s: torch.zeros(3, dtype=F64), t)


# ---------------------------------------------------------------- grad_norm_penalty


def test_grad_norm_penalty_bad_input() -> None:
    t = torch.ones(2, dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"metagrad\.grad_norm_penalty: p must be >= 1 \(a norm\), got p=0.5; use p=2",
    ):
        grad_norm_penalty(square_sum, t, p=0.5)
    with pytest.raises(
        TypeError,
        match=r"metagrad\.grad_norm_penalty: p must be a real number >= 1 or math.inf, got a str",
    ):
        grad_norm_penalty(square_sum, t, p="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"metagrad\.grad_norm_penalty: f must return a scalar"):
        grad_norm_penalty(lambda s: s, t)
    with pytest.raises(
        ValueError, match=r"metagrad\.grad_norm_penalty: parameter\(s\) \['b'\] do not reach"
    ):
        grad_norm_penalty(lambda d: (d["a"] ** 2).sum(), X)
    assert grad_norm_penalty(lambda d: (d["a"] ** 2).sum(), X, allow_unused=True).item() == 8.0
