"""Hypothesis properties on random smooth functions of random trees (float64)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from metagrad._tree import tree_flatten_vector, tree_vdot
from metagrad.derivatives import hessian, hvp

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
trees = st.one_of(
    shapes.map(lambda s: {"": s}),  # "" marks a bare tensor
    st.dictionaries(st.sampled_from(["w", "b", "gain"]), shapes, min_size=1, max_size=3),
)
Problem = tuple[Callable[[Tensor | dict[str, Tensor]], Tensor], Tensor | dict[str, Tensor]]


def make_problem(spec: dict[str, tuple[int, ...]], seed: int) -> Problem:
    """A random smooth, non-separable scalar function of a random tree, and a point."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=F64)

    x: Tensor | dict[str, Tensor] = (
        rand(spec[""]) if "" in spec else {k: rand(s) for k, s in spec.items()}
    )
    n = tree_flatten_vector(x).numel()
    w, c = rand((4, n)), rand((n,))

    def f(t: Tensor | dict[str, Tensor]) -> Tensor:
        z = tree_flatten_vector(t)
        return torch.tanh(w @ z).pow(2).sum() + (c * z**3).sum() + torch.sin(z.prod())

    return f, x


def like(x: Tensor | dict[str, Tensor], seed: int) -> Tensor | dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if isinstance(x, Tensor):
        return torch.randn(x.shape, generator=gen, dtype=F64)
    return {k: torch.randn(t.shape, generator=gen, dtype=F64) for k, t in x.items()}


def dense_matrix(h: object, x: Tensor | dict[str, Tensor]) -> Tensor:
    """Flatten a tensor or nested-dict Hessian into an (n, n) matrix."""
    if isinstance(h, Tensor):
        assert isinstance(x, Tensor)
        return h.reshape(x.numel(), x.numel())
    assert isinstance(h, dict) and isinstance(x, dict)
    rows = [torch.cat([h[a][b].reshape(x[a].numel(), x[b].numel()) for b in x], dim=1) for a in x]
    return torch.cat(rows, dim=0)


@SETTINGS
@given(spec=trees, seed=st.integers(0, 2**31 - 1))
def test_hvp_is_symmetric_bilinear_and_modes_agree(
    spec: dict[str, tuple[int, ...]], seed: int
) -> None:
    f, x = make_problem(spec, seed)
    u, v = like(x, seed + 1), like(x, seed + 2)
    hv_rev = hvp(f, x, v, mode="rev")
    hv_fwd = hvp(f, x, v, mode="fwd")
    hu = hvp(f, x, u, mode="rev")
    torch.testing.assert_close(tree_flatten_vector(hv_rev), tree_flatten_vector(hv_fwd))
    torch.testing.assert_close(tree_vdot(u, hv_rev), tree_vdot(v, hu))


@SETTINGS
@given(spec=trees, seed=st.integers(0, 2**31 - 1))
def test_dense_hessian_is_symmetric_and_consistent_with_hvp(
    spec: dict[str, tuple[int, ...]], seed: int
) -> None:
    f, x = make_problem(spec, seed)
    mat = dense_matrix(hessian(f, x), x)
    torch.testing.assert_close(mat, mat.T)
    v = like(x, seed + 3)
    torch.testing.assert_close(mat @ tree_flatten_vector(v), tree_flatten_vector(hvp(f, x, v)))
