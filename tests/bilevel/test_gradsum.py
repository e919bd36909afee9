"""The strategies' running gradient sums: in place where they own the sum, never a caller's tensor."""

from __future__ import annotations

import torch

import metagrad
from metagrad.bilevel._tree import GradSum, accumulate


def _grads(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(n)]


def test_sum_is_bitwise_the_out_of_place_sum_and_allocates_once() -> None:
    gs = _grads(6)
    kept = [g.clone() for g in gs]
    total = GradSum()
    ptrs = []
    for g in gs:
        accumulate(total, 0, g)
        ptrs.append(total[0].data_ptr())  # type: ignore[union-attr]
    ref = gs[0]
    for g in gs[1:]:
        ref = ref + g
    assert torch.equal(total[0], ref)  # same order, same rounding
    assert ptrs[0] == gs[0].data_ptr()  # the first gradient is kept as given
    assert len(set(ptrs[1:])) == 1 and ptrs[1] != ptrs[0]  # one new tensor, then in place
    for g, k in zip(gs, kept):
        assert torch.equal(g, k)  # no input was written to


def test_none_adds_nothing_and_a_plain_dict_stays_out_of_place() -> None:
    gs = _grads(3)
    total = GradSum()
    accumulate(total, 1, None)
    assert 1 not in total
    d: dict[int, torch.Tensor | None] = {}
    for g in gs:
        accumulate(d, 1, g)
        accumulate(total, 1, g)
    assert torch.equal(d[1], total[1])  # type: ignore[arg-type]


def test_a_gradient_with_a_graph_is_summed_out_of_place() -> None:
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    total = GradSum()
    for c in (1.0, 2.0, 3.0):
        accumulate(total, 0, c * x)
    s = total[0]
    assert s is not None and s.requires_grad
    (gx,) = torch.autograd.grad(s.sum(), x)
    assert torch.equal(gx, torch.full_like(x, 6.0))


def test_broadcast_or_promoted_sums_fall_back_to_a_new_tensor() -> None:
    total = GradSum()
    accumulate(total, 0, torch.ones(3, dtype=torch.float32))
    accumulate(total, 0, torch.ones(3, dtype=torch.float32))
    accumulate(total, 0, torch.ones(3, dtype=torch.float64))  # would not fit in place
    accumulate(total, 0, torch.ones(2, 3, dtype=torch.float64))  # broadcasts to a new shape
    s = total[0]
    assert s is not None and s.dtype == torch.float64 and s.shape == (2, 3)
    assert torch.equal(s, torch.full((2, 3), 4.0, dtype=torch.float64))


def test_loop_meta_gradient_unchanged_by_in_place_sums() -> None:
    """The loop strategy over 5 tasks equals the sum of its one-task meta-gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    xs, xq = torch.randn(5, 6, 2).double(), torch.randn(5, 6, 2).double()
    ys, yq = torch.randn(5, 6, 1).double(), torch.randn(5, 6, 1).double()
    maml = metagrad.MAML(
        model, torch.nn.functional.mse_loss, inner_lr=0.1, inner_steps=2, strategy="loop"
    )
    res = maml.meta_grad(xs, ys, xq, yq)
    parts = [
        maml.meta_grad(xs[i : i + 1], ys[i : i + 1], xq[i : i + 1], yq[i : i + 1]) for i in range(5)
    ]
    got = torch.cat([g.flatten() for g in res.values() if g is not None])
    ref = torch.cat([sum(p[k] for p in parts).flatten() / 5 for k in res])  # type: ignore[misc]
    assert (got - ref).norm() / ref.norm() < 1e-13
