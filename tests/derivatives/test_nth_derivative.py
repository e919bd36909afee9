"""nth_derivative: seed 003's polynomial, exact zeros past the degree, graphs on request."""

from __future__ import annotations

import math

import pytest
import torch

from metagrad.derivatives import nth_derivative

F64 = torch.float64


def cubic(t: torch.Tensor) -> torch.Tensor:
    return 2 * t**3


@pytest.mark.parametrize(
    ("n", "expected"), [(0, -16.0), (1, 24.0), (2, -24.0), (3, 12.0), (4, 0.0), (5, 0.0), (7, 0.0)]
)
def test_seed003_cubic_at_minus_two(n: int, expected: float) -> None:
    x = torch.tensor(-2.0, dtype=F64)
    out = nth_derivative(cubic, x, n)
    assert out.shape == ()
    assert out.dtype == F64
    assert out.item() == expected
    assert not out.requires_grad


def test_matches_closed_form_of_smooth_function() -> None:
    # d^n/dx^n exp(2x) sin(x) against sympy-free closed forms for n = 0..3.
    x0 = 0.7
    x = torch.tensor(x0, dtype=F64)
    e, s, c = math.exp(2 * x0), math.sin(x0), math.cos(x0)
    closed = [e * s, e * (2 * s + c), e * (3 * s + 4 * c), e * (2 * s + 11 * c)]
    for n, want in enumerate(closed):
        got = nth_derivative(lambda t: torch.exp(2 * t) * torch.sin(t), x, n)
        assert got.item() == pytest.approx(want, rel=1e-12)


def test_one_element_tensor_and_unused_input_give_scalar_zero() -> None:
    x = torch.tensor([1.5], dtype=F64)
    assert nth_derivative(lambda t: (t**2).sum(), x, 1).item() == 3.0
    assert nth_derivative(lambda t: (t**2).sum(), x, 1).shape == ()
    # f ignores x entirely: every derivative is exactly zero, not an error.
    const = torch.tensor(3.0, dtype=F64)
    assert nth_derivative(lambda t: const, x, 2).item() == 0.0


def test_create_graph_allows_differentiating_the_derivative() -> None:
    x = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    d2 = nth_derivative(cubic, x, 2, create_graph=True)  # 12 x
    assert d2.requires_grad
    (d3,) = torch.autograd.grad(d2, x)
    assert d3.item() == 12.0
    assert x.grad is None


def test_graph_reaches_tensors_f_closes_over() -> None:
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    x = torch.tensor(2.0, dtype=F64)
    d1 = nth_derivative(lambda t: a * t**3, x, 1, create_graph=True)  # 3 a x^2
    (da,) = torch.autograd.grad(d1, a)
    assert da.item() == 12.0
    assert a.grad is None


def test_never_touches_dot_grad_and_is_repeatable() -> None:
    x = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    first = [nth_derivative(cubic, x, n).item() for n in range(5)]
    second = [nth_derivative(cubic, x, n).item() for n in range(5)]
    assert first == second == [-16.0, 24.0, -24.0, 12.0, 0.0]
    assert x.grad is None


def test_works_under_no_grad() -> None:
    with torch.no_grad():
        assert nth_derivative(cubic, torch.tensor(-2.0, dtype=F64), 2).item() == -24.0
