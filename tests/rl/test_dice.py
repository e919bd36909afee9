"""DiCE, its baseline term and the REINFORCE surrogate: identities, closed forms, bad input."""

from __future__ import annotations

import pytest
import torch

from metagrad import nth_derivative
from metagrad.rl import (
    dice_baseline_term,
    dice_objective,
    magic_box,
    reinforce_surrogate,
    returns_to_go,
)

DT = torch.float64


def _trajectories(n: int = 6, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A tabular softmax policy theta [3 states, 2 actions] and random trajectories."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(3, 2, generator=g, dtype=DT, requires_grad=True)
    states = torch.randint(0, 3, (n, t), generator=g)
    actions = torch.randint(0, 2, (n, t), generator=g)
    rewards = torch.randn(n, t, generator=g, dtype=DT)
    baseline = torch.randn(n, t, generator=g, dtype=DT)
    return theta, states, actions, rewards, baseline


def _logp(theta: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(theta, -1)[states, actions]


def test_magic_box_value_one_and_every_derivative() -> None:
    x = torch.tensor(0.7, dtype=DT)
    for n in range(5):  # d^n/dx^n box(3 x) = 3^n, value 1
        assert float(nth_derivative(lambda t: magic_box(3 * t), x, n)) == pytest.approx(3.0**n)


def test_value_is_the_discounted_return_and_baseline_term_is_zero() -> None:
    theta, st, ac, rw, base = _trajectories()
    lp = _logp(theta, st, ac)
    disc = 0.9 ** torch.arange(5, dtype=DT)
    ret = (rw * disc).sum(-1)
    per = dice_objective(lp, rw, discount=0.9, reduction="none")
    torch.testing.assert_close(per, ret, rtol=0, atol=1e-14)
    with_b = dice_objective(lp, rw, baseline=base, discount=0.9, reduction="none")
    torch.testing.assert_close(with_b, ret, rtol=0, atol=1e-14)
    assert float(dice_baseline_term(lp, base, discount=0.9).detach()) == 0.0
    assert float(dice_objective(lp, rw, discount=0.9, reduction="sum").detach()) == pytest.approx(
        float(ret.sum())
    )


def test_first_derivative_equals_reinforce_with_causality() -> None:
    """DiCE's gradient is REINFORCE's: sum_t grad log pi_t (sum_{t'>=t} g^t' r_t' - g^t b_t)."""
    theta, st, ac, rw, base = _trajectories()
    for b in (None, base):
        lp = _logp(theta, st, ac)
        dice = dice_objective(lp, rw, baseline=b, discount=0.8)
        (gd,) = torch.autograd.grad(dice, theta, retain_graph=True)
        (gr,) = torch.autograd.grad(reinforce_surrogate(lp, rw, baseline=b, discount=0.8), theta)
        # by hand, one trajectory step at a time
        manual = torch.zeros_like(theta)
        disc = 0.8 ** torch.arange(5, dtype=DT)
        for i in range(st.shape[0]):
            for t in range(5):
                (score,) = torch.autograd.grad(_logp(theta, st[i, t], ac[i, t]), theta)
                w = (rw[i, t:] * disc[t:]).sum() - (0 if b is None else b[i, t] * disc[t])
                manual += score * w / st.shape[0]
        torch.testing.assert_close(gd, manual, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(gr, manual, rtol=1e-12, atol=1e-13)


def test_one_step_hessian_closed_form() -> None:
    """One step: hess box(log pi(a)) r = r (hess log pi + score score^T); naive drops the product."""
    theta, st, ac, rw, _ = _trajectories(n=1, t=1)
    lp_fn = lambda th: _logp(th, st, ac)[0, 0]  # noqa: E731
    score = torch.autograd.functional.jacobian(lp_fn, theta.detach()).reshape(-1)
    hess_lp = torch.autograd.functional.hessian(lp_fn, theta.detach()).reshape(6, 6)
    r = rw[0, 0]

    def hess(fn: object) -> torch.Tensor:
        f = lambda th: fn(_logp(th, st, ac), rw)  # type: ignore[operator]  # noqa: E731
        return torch.autograd.functional.hessian(f, theta.detach()).reshape(6, 6)

    torch.testing.assert_close(hess(dice_objective), r * (hess_lp + torch.outer(score, score)))
    torch.testing.assert_close(hess(reinforce_surrogate), r * hess_lp)


def test_mask_equals_truncation() -> None:
    theta, st, ac, rw, base = _trajectories(n=1, t=5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]], dtype=DT)
    padded = rw.clone()
    padded[0, 3:] = float("nan")  # padding may hold anything: it is masked out
    full = dice_objective(_logp(theta, st, ac), padded, baseline=base, discount=0.9, mask=mask)
    cut = dice_objective(
        _logp(theta, st[:, :3], ac[:, :3]), rw[:, :3], baseline=base[:, :3], discount=0.9
    )
    (g1,) = torch.autograd.grad(full, theta, create_graph=True)
    (g2,) = torch.autograd.grad(cut, theta, create_graph=True)
    torch.testing.assert_close(full, cut)
    torch.testing.assert_close(g1, g2)
    (h1,) = torch.autograd.grad(g1.sum(), theta)
    (h2,) = torch.autograd.grad(g2.sum(), theta)
    torch.testing.assert_close(h1, h2)


def test_returns_to_go() -> None:
    r = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 8.0]])
    torch.testing.assert_close(
        returns_to_go(r, 0.5), torch.tensor([[3.0, 4.0, 4.0], [2.0, 4.0, 8.0]])
    )
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(returns_to_go(r, 1.0, mask=mask)[0], torch.tensor([3.0, 2.0, 0.0]))


def test_calling_twice_gives_the_same_answer() -> None:
    theta, st, ac, rw, base = _trajectories()
    grads = [
        torch.autograd.grad(dice_objective(_logp(theta, st, ac), rw, baseline=base), theta)[0]
        for _ in range(2)
    ]
    assert torch.equal(grads[0], grads[1]) and theta.grad is None


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [dice_objective, reinforce_surrogate])
def test_mismatched_shapes(fn: object) -> None:
    theta, st, ac, rw, _ = _trajectories()
    with pytest.raises(ValueError) as e:
        fn(_logp(theta, st, ac), rw[:, :4])  # type: ignore[operator]
    msg = str(e.value)
    assert msg.startswith(f"metagrad.rl.{fn.__name__}: rewards has shape (6, 4)")  # type: ignore[attr-defined]
    assert "log_probs has shape (6, 5)" in msg and "Fix:" in msg


def test_mismatched_baseline_and_mask() -> None:
    theta, st, ac, rw, base = _trajectories()
    lp = _logp(theta, st, ac)
    with pytest.raises(ValueError, match=r"baseline has shape \(6, 3\) but log_probs"):
        dice_objective(lp, rw, baseline=base[:, :3])
    with pytest.raises(ValueError, match=r"mask has shape \(5,\)"):
        dice_objective(lp, rw, mask=torch.ones(5))


def test_nan_rewards_named_with_index() -> None:
    theta, st, ac, rw, _ = _trajectories()
    rw[2, 3] = float("nan")
    with pytest.raises(ValueError) as e:
        dice_objective(_logp(theta, st, ac), rw)
    msg = str(e.value)
    assert msg.startswith("metagrad.rl.dice_objective: rewards holds a non-finite value")
    assert "nan at index (2, 3)" in msg and "Fix:" in msg and "mask=" in msg


def test_inf_log_probs_named() -> None:
    theta, st, ac, rw, _ = _trajectories()
    lp = _logp(theta, st, ac).clone()
    lp[0, 1] = -float("inf")
    with pytest.raises(ValueError, match=r"log_probs holds a non-finite value, -inf at index"):
        reinforce_surrogate(lp, rw)


def test_log_probs_that_do_not_depend_on_parameters() -> None:
    theta, st, ac, rw, _ = _trajectories()
    with torch.no_grad():
        lp = _logp(theta, st, ac)
    with pytest.raises(ValueError) as e:
        dice_objective(lp, rw)
    msg = str(e.value)
    assert "log_probs does not require grad" in msg and "torch.no_grad()" in msg
    assert "Fix: recompute" in msg
    with pytest.raises(ValueError, match="does not require grad"):
        dice_objective(_logp(theta, st, ac).detach(), rw)
    with torch.no_grad():  # a value-only evaluation is fine
        assert torch.isfinite(dice_objective(lp, rw))


def test_baseline_that_requires_grad_refused() -> None:
    theta, st, ac, rw, base = _trajectories()
    with pytest.raises(ValueError, match=r"baseline requires grad.*baseline.detach\(\)"):
        dice_objective(_logp(theta, st, ac), rw, baseline=base.requires_grad_())


def test_other_bad_arguments() -> None:
    theta, st, ac, rw, _ = _trajectories()
    lp = _logp(theta, st, ac)
    with pytest.raises(ValueError, match=r"discount=1.5 must be in \[0, 1\]"):
        dice_objective(lp, rw, discount=1.5)
    with pytest.raises(ValueError, match="reduction='avg' is not one of"):
        dice_objective(lp, rw, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor"):
        dice_objective(lp, [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="log_probs must be a floating-point tensor"):
        dice_objective(st, rw)
    with pytest.raises(ValueError, match="0-dim tensor"):
        dice_objective(lp[0, 0], rw[0, 0])
    with pytest.raises(TypeError, match="magic_box: x must be a tensor"):
        magic_box(1.0)  # type: ignore[arg-type]
