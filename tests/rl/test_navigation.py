"""2D navigation, the Gaussian policy, the baseline, MAML-RL's meta-gradient and TRPO.

The meta-gradient is checked against an independent per-task implementation written here
(``torch.distributions.Normal``, an explicit MLP, DiCE inline, ``autograd.grad`` per task) in
float64; TRPO's Fisher-vector products against the dense Hessian of the KL
(``torch.autograd.functional.hessian``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from metagrad.rl import (
    Navigation2D,
    adapt,
    collect,
    expand_params,
    fisher_vector_product,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_mean,
    init_gaussian_mlp,
    linear_feature_baseline,
    make_batch,
    meta_objective,
    task_objectives,
    trpo_functions,
    trpo_step,
)

DT = torch.float64


def _setup(tasks: int = 3, traj: int = 4, horizon: int = 6, hidden: int = 5, steps: int = 1):
    g = torch.Generator().manual_seed(7)
    env = Navigation2D(horizon)
    params = init_gaussian_mlp(2, 2, (hidden, hidden), init_std=0.5, generator=g, dtype=DT)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}
    goals = env.sample_goals(tasks, g, dtype=DT)
    batches = collect(env, params, goals, traj, steps, 0.1, g)
    return env, params, goals, batches


# ------------------------------------------------------------------------------ environment


def test_rewards_clipping_and_shapes() -> None:
    env = Navigation2D(horizon=3)
    goals = torch.tensor([[0.3, -0.2], [0.0, 0.0]])

    def push(params: object, pos: Tensor, gen: object) -> Tensor:
        return torch.full_like(pos, 0.5)  # clipped to 0.1 per coordinate

    roll = env.rollout(init_gaussian_mlp(), goals, 2, sample=push)  # type: ignore[arg-type]
    assert roll.obs.shape == (2, 2, 3, 2) and roll.rewards.shape == (2, 2, 3)
    torch.testing.assert_close(roll.obs[0, 0, :, 0], torch.tensor([0.0, 0.1, 0.2]))
    expected = -(torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]) - goals[0]).norm(dim=-1)
    torch.testing.assert_close(roll.rewards[0, 1], expected)
    assert torch.equal(roll.actions, torch.full_like(roll.actions, 0.5))  # stored unclipped


def test_episode_ends_at_the_goal() -> None:
    env = Navigation2D(horizon=5)
    goals = torch.tensor([[0.15, 0.0]])

    def toward(params: object, pos: Tensor, gen: object) -> Tensor:
        return goals[:, None, :] - pos  # clipped: 0.1, then the remaining 0.05

    roll = env.rollout(init_gaussian_mlp(), goals, 1, sample=toward)  # type: ignore[arg-type]
    torch.testing.assert_close(roll.mask[0, 0], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    assert float(roll.rewards[0, 0, 2:].abs().sum()) == 0.0
    assert float(roll.returns()[0, 0]) == pytest.approx(-0.05, abs=1e-6)


def test_vectorized_over_tasks_equals_one_task_at_a_time() -> None:
    """Batched per-task parameters and goals: the same trajectories as task-by-task rollouts."""
    env = Navigation2D(horizon=4)
    g = torch.Generator().manual_seed(0)
    per_task = [init_gaussian_mlp(2, 2, (6, 6), generator=g, dtype=DT) for _ in range(3)]
    batched = {k: torch.stack([p[k] for p in per_task]) for k in per_task[0]}
    goals = env.sample_goals(3, g, dtype=DT)

    def mean_action(params: dict[str, Tensor], pos: Tensor, gen: object) -> Tensor:
        return gaussian_mean(params, pos)

    both = env.rollout(batched, goals, 2, sample=mean_action)  # type: ignore[arg-type]
    for i, p in enumerate(per_task):
        one = env.rollout(p, goals[i : i + 1], 2, sample=mean_action)  # type: ignore[arg-type]
        torch.testing.assert_close(both.obs[i], one.obs[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(both.rewards[i], one.rewards[0], rtol=1e-13, atol=1e-13)


def test_bad_environment_input() -> None:
    with pytest.raises(ValueError, match="horizon=0 must be an int >= 1"):
        Navigation2D(0)
    with pytest.raises(ValueError, match=r"goals must be \[tasks, 2\]"):
        Navigation2D(3).rollout(init_gaussian_mlp(), torch.zeros(2), 1)


# ------------------------------------------------------------------------------ policy


def test_log_prob_and_kl_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    p = init_gaussian_mlp(2, 2, (4, 4), init_std=0.7, generator=g, dtype=DT)
    pb = {k: torch.stack([v, v + 0.05 * torch.randn(v.shape, generator=g, dtype=DT)])
          for k, v in p.items()}  # fmt: skip
    obs = torch.randn(2, 3, 5, 2, generator=g, dtype=DT)
    act = torch.randn(2, 3, 5, 2, generator=g, dtype=DT)
    for params in (p, pb):
        mean = gaussian_mean(params, obs)
        std = params["log_std"].exp()
        std = std[:, None, None, :] if std.ndim == 2 else std
        dist = Normal(mean, std.expand_as(mean))
        torch.testing.assert_close(gaussian_log_prob(params, obs, act), dist.log_prob(act).sum(-1))
    old = Normal(gaussian_mean(p, obs), p["log_std"].exp().expand(2, 3, 5, 2))
    new = Normal(gaussian_mean(pb, obs), pb["log_std"].exp()[:, None, None, :].expand(2, 3, 5, 2))
    kl = gaussian_kl(old.mean, p["log_std"], pb, obs)
    torch.testing.assert_close(kl, kl_divergence(old, new).sum(-1))


def test_linear_baseline_recovers_a_linear_value() -> None:
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(2, 3, 8, 2, generator=g, dtype=DT)
    t = torch.arange(8, dtype=DT) / 100
    target = 1.5 * obs[..., 0] - 0.5 * obs[..., 1].square() + 3 * t + 2.0  # value to recover
    # rewards whose (undiscounted) reward-to-go is exactly ``target``
    rewards = target - torch.cat([target[..., 1:], torch.zeros(2, 3, 1, dtype=DT)], -1)
    mask = torch.ones(2, 3, 8, dtype=DT)
    b = linear_feature_baseline(obs, rewards, mask, 1.0, reg=1e-12)
    torch.testing.assert_close(b, target, rtol=1e-6, atol=1e-6)
    assert not b.requires_grad


# ------------------------------------------------------------------------------ MAML-RL


def test_normalized_advantages_and_inner_gradient_identity() -> None:
    """Per task: advantages have mean 0 and std 1 over valid steps, and the DiCE objective's
    gradient is weight * sum(score * advantage), the rllab-style normalized step."""
    _, params, _, batches = _setup()
    b = batches[0]
    m = b.rollout.mask
    count = m.sum((1, 2))
    mean = (b.advantages * m).sum((1, 2)) / count
    var = (b.advantages.square() * m).sum((1, 2)) / count
    torch.testing.assert_close(mean, torch.zeros(3, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(var, torch.ones(3, dtype=DT))
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    obj = task_objectives(expand_params(p, 3), b)
    for i in range(3):
        g1 = torch.autograd.grad(obj[i], list(p.values()), retain_graph=True)
        lp = gaussian_log_prob(p, b.rollout.obs[i], b.rollout.actions[i])
        surr = (lp * b.advantages[i] * m[i]).sum() * b.weight[i]
        g2 = torch.autograd.grad(surr, list(p.values()))
        for a, c in zip(g1, g2):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_adapt_equals_per_task_gradient_steps() -> None:
    _, params, _, batches = _setup()
    b = batches[0]
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = adapt(p, b, 0.1)
    for i in range(3):
        obj = task_objectives(p, b.select(torch.tensor([i])))[0]
        grads = torch.autograd.grad(obj, list(p.values()))
        for (k, v), gk in zip(p.items(), grads):
            torch.testing.assert_close(out[k][i], v + 0.1 * gk, rtol=1e-12, atol=1e-13)


def _mlp_mean(p: dict[str, Tensor], x: Tensor) -> Tensor:
    h = F.relu(x @ p["l0.weight"].T + p["l0.bias"])
    h = F.relu(h @ p["l1.weight"].T + p["l1.bias"])
    return h @ p["out.weight"].T + p["out.bias"]


def _reference_task_objective(p: dict[str, Tensor], b: object, i: int) -> Tensor:
    """DiCE with baseline, written out for task i of batch b (no metagrad.rl estimator)."""
    roll = b.rollout  # type: ignore[attr-defined]
    obs, act, r, m = roll.obs[i], roll.actions[i], roll.rewards[i], roll.mask[i]
    lp = Normal(_mlp_mean(p, obs), p["log_std"].exp()).log_prob(act).sum(-1) * m
    base = b.baseline[i] * m  # type: ignore[attr-defined]
    disc = b.discount ** torch.arange(r.shape[-1], dtype=DT)  # type: ignore[attr-defined]
    cum = lp.cumsum(-1)
    box = torch.exp(cum - cum.detach())
    box_prev = torch.exp((cum - lp) - (cum - lp).detach())
    per = (disc * (box * r * m + (box_prev - box) * base)).sum(-1)
    return per.mean() * b.scale[i, 0]  # type: ignore[attr-defined]


def test_meta_gradient_equals_independent_per_task_implementation() -> None:
    _, params, _, batches = _setup()
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    (-meta_objective(p, batches, 0.1)).backward()
    q = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = torch.zeros((), dtype=DT)
    for i in range(3):
        inner = _reference_task_objective(q, batches[0], i)
        grads = torch.autograd.grad(inner, list(q.values()), create_graph=True)
        adapted = {k: v + 0.1 * g for (k, v), g in zip(q.items(), grads)}
        total = total - _reference_task_objective(adapted, batches[1], i) / 3
    ref = torch.autograd.grad(total, list(q.values()))
    for (k, v), r in zip(p.items(), ref):
        assert v.grad is not None
        torch.testing.assert_close(v.grad, r, rtol=1e-10, atol=1e-12, msg=k)


def test_second_order_term_matters_and_reinforce_drops_part_of_it() -> None:
    _, params, _, batches = _setup()

    def grad(estimator: str, lr: float) -> Tensor:
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        obj = meta_objective(p, batches, lr, estimator=estimator)  # type: ignore[arg-type]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj, list(p.values()))])

    dice, naive = grad("dice", 0.1), grad("reinforce", 0.1)
    assert (dice - naive).norm() > 1e-3 * dice.norm()
    # with lr -> 0 the Hessian term vanishes and both agree with the plain gradient
    torch.testing.assert_close(grad("dice", 1e-9), grad("reinforce", 1e-9), rtol=1e-6, atol=1e-9)


def test_trpo_surrogate_gradient_and_kl_at_the_sampling_policy() -> None:
    _, params, _, batches = _setup()
    prob = trpo_functions(batches, 0.1)
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    g_surr = torch.autograd.grad(prob.surrogate(p), list(p.values()))
    g_meta = torch.autograd.grad(meta_objective(p, batches, 0.1), list(p.values()))
    for a, b in zip(g_surr, g_meta):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    kl = prob.kl(p)
    assert abs(float(kl.detach())) < 1e-12
    for gk in torch.autograd.grad(kl, list(p.values())):
        assert float(gk.abs().max()) < 1e-10


def test_fisher_vector_product_equals_dense_hessian_of_kl_through_adaptation() -> None:
    _, params, _, batches = _setup(tasks=2, traj=3, horizon=4, hidden=3)
    prob = trpo_functions(batches, 0.1)
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def unflat(vec: Tensor) -> dict[str, Tensor]:
        return {k: c.reshape(params[k].shape) for k, c in zip(names, vec.split(sizes))}

    flat = torch.cat([params[k].reshape(-1) for k in names])
    dense = torch.autograd.functional.hessian(lambda x: prob.kl(unflat(x)), flat)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(flat.shape, generator=g, dtype=DT)
    fv = fisher_vector_product(prob.kl, params)(unflat(v))
    torch.testing.assert_close(torch.cat([fv[k].reshape(-1) for k in names]), dense @ v)
    assert float(torch.linalg.eigvalsh(0.5 * (dense + dense.T)).min()) > -1e-10  # PSD
    # and a damped product adds damping * v
    fvd = fisher_vector_product(prob.kl, params, damping=0.1)(unflat(v))
    torch.testing.assert_close(torch.cat([fvd[k].reshape(-1) for k in names]), dense @ v + 0.1 * v)


def test_trpo_step_on_navigation_respects_the_trust_region() -> None:
    _, params, _, batches = _setup()
    prob = trpo_functions(batches, 0.1, fisher_tasks=torch.tensor([0, 2]))
    new, info = trpo_step(params, prob.surrogate, prob.kl, fisher_kl=prob.fisher_kl, max_kl=0.01)
    assert info.accepted and info.kl <= 0.01
    assert info.surrogate_after > info.surrogate_before
    assert float(prob.kl(new)) == pytest.approx(info.kl)
    assert info.cg_iterations >= 1 and math.isfinite(info.cg_residual)


def test_trpo_step_rejects_a_step_that_never_improves() -> None:
    p = {"w": torch.zeros(1, dtype=DT)}

    def surrogate(q: dict[str, Tensor]) -> Tensor:
        return (q["w"] - 1000 * q["w"].square()).sum()  # rises only for w < 1e-3

    def kl(q: dict[str, Tensor]) -> Tensor:
        return 0.5 * q["w"].square().sum()

    new, info = trpo_step(p, surrogate, kl, max_kl=0.01, max_backtracks=5)
    assert not info.accepted and torch.equal(new["w"], p["w"]) and info.backtracks == 5


def test_trpo_bad_arguments() -> None:
    p = {"w": torch.zeros(1, dtype=DT)}
    f = lambda q: q["w"].sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"max_kl=0\.0 must be a finite number > 0"):
        trpo_step(p, f, f, max_kl=0.0)
    with pytest.raises(ValueError, match=r"backtrack=1.5 must be in \(0, 1\)"):
        trpo_step(p, f, f, backtrack=1.5)


def test_make_batch_and_estimator_errors() -> None:
    _, params, _, batches = _setup()
    with pytest.raises(ValueError, match="estimator='dicey' is not one of"):
        task_objectives(params, batches[0], estimator="dicey")  # type: ignore[arg-type]
    b = make_batch(batches[0].rollout, params, 0.99, normalize=False)
    torch.testing.assert_close(b.scale, torch.ones(3, 1, dtype=DT))
    with pytest.raises(ValueError, match="parameters hold 3 tasks but obs has 2"):
        gaussian_mean(expand_params(params, 3), torch.zeros(2, 4, 2, dtype=DT))
