"""Sinusoid tasks: the MAML paper's distribution, deterministic, never touching global RNG."""

from __future__ import annotations

import math

import pytest
import torch

from metagrad.tasks import SinusoidTasks


def test_shapes_and_query_count() -> None:
    xs, ys, xq, yq = SinusoidTasks(shots=5, queries=7, seed=1).sample(3)
    assert xs.shape == ys.shape == (3, 5, 1)
    assert xq.shape == yq.shape == (3, 7, 1)
    assert xs.dtype == torch.float32
    assert SinusoidTasks(shots=4).sample(2).xq.shape == (2, 4, 1)  # queries default to shots


def test_distribution_matches_the_paper() -> None:
    tasks = SinusoidTasks(shots=10, seed=0)
    amp, phase = tasks.sample_functions(2000)
    assert 0.1 <= float(amp.min()) and float(amp.max()) <= 5.0
    assert 0.0 <= float(phase.min()) and float(phase.max()) <= math.pi
    assert abs(float(amp.mean()) - 2.55) < 0.1 and abs(float(phase.mean()) - math.pi / 2) < 0.1
    xs, _ys, xq, yq = tasks.batch_for(amp[:50], phase[:50])
    assert float(xs.min()) >= -5 and float(xs.max()) <= 5
    expected = amp[:50].view(-1, 1, 1) * torch.sin(xq.double() - phase[:50].view(-1, 1, 1))
    torch.testing.assert_close(yq.double(), expected, atol=1e-5, rtol=1e-5)


def test_deterministic_given_seed_and_independent_of_global_rng() -> None:
    state = torch.get_rng_state()
    a = SinusoidTasks(seed=3).sample(4)
    torch.manual_seed(123)  # global RNG must not matter
    b = SinusoidTasks(seed=3).sample(4)
    c = SinusoidTasks(seed=4).sample(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.xs, c.xs)
    torch.set_rng_state(state)
    SinusoidTasks(seed=3).sample(4)
    assert torch.equal(torch.get_rng_state(), state)


def test_state_dict_round_trip() -> None:
    t = SinusoidTasks(seed=0)
    t.sample(2)
    saved = t.state_dict()
    first = t.sample(3)
    t.load_state_dict(saved)
    assert torch.equal(t.sample(3).xs, first.xs)


@pytest.mark.parametrize("kwargs", [{"shots": 0}, {"shots": 5, "queries": -1}, {"shots": 2.5}])
def test_non_positive_sizes_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be an int > 0"):
        SinusoidTasks(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tasks=0"):
        SinusoidTasks().sample(0)
