r"""MAML for reinforcement learning: policy-gradient inner steps, exact second order through them.

One task's adaptation is a policy-gradient ascent step on trajectories sampled from the
current policy,

.. math::

    \theta'_i = \theta + \alpha\, \nabla_\theta \hat J^{\boxdot}_i(\theta),

where :math:`\hat J^{\boxdot}_i` is the DiCE objective (:func:`metagrad.rl.dice_objective`) of
task :math:`i`'s trajectories with a per-task linear baseline. Because DiCE's derivatives are
unbiased at every order, differentiating :math:`\theta'_i` with ``create_graph=True`` gives an
unbiased estimate of :math:`I + \alpha \nabla^2 J_i(\theta)`, the Jacobian the MAML
meta-gradient :math:`(I + \alpha \nabla^2 J_i)\, \nabla J_i(\theta'_i)` needs; the plain
REINFORCE surrogate (``estimator="reinforce"``) drops the score-product part of that Hessian,
as the original MAML-RL implementation did. Every task adapts in one backward pass: the
objectives are summed over per-task views of :math:`\theta`
(:func:`metagrad.rl.expand_params`), whose gradients are the per-task gradients.

Advantages are normalized per task (mean 0, standard deviation 1 over the task's valid steps)
and averaged over time steps, as in the MAML paper's rllab code, so the paper's step size
:math:`\alpha = 0.1` applies. In DiCE form this is a constant baseline (the mean) and a
per-task rescaling of the step size (1 / (std x steps)); both are treated as constants, so the
second-order term stays exact for the rescaled step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.rl._baseline import linear_feature_baseline
from metagrad.rl._dice import dice_objective, reinforce_surrogate, returns_to_go
from metagrad.rl._navigation import Navigation2D, Rollout
from metagrad.rl._policy import (
    expand_params,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_mean,
    is_batched,
    normal_log_prob,
)

Estimator = Literal["dice", "reinforce"]
_ESTIMATORS = ("dice", "reinforce")


@dataclass(frozen=True)
class PGBatch:
    r"""One task batch's trajectories with everything a policy-gradient step needs, fixed.

    Attributes:
        rollout: the trajectories (``[tasks, trajectories, T, ...]``).
        baseline: the per-task linear baseline :math:`b_t` (detached), plus the normalizing
            shift folded in (``b_t + mean / gamma^t``).
        scale: ``[tasks, 1]``: 1 / (std of the advantages x mean episode length); 1 without
            normalization.
        advantages: ``[tasks, trajectories, T]`` advantages in DiCE units,
            :math:`\gamma^t (G_t - b_t)`, normalized to :math:`(\cdot - \mu) / \sigma`.
        weight: ``[tasks]`` such that ``weight * sum(grad log_probs * advantages)`` is the
            gradient of the task's objective (1 / valid steps, or 1 / trajectories).
        log_probs: ``[tasks, trajectories, T]`` log-probabilities under the sampling policy.
        old_mean, old_log_std: the sampling policy's distribution at ``rollout.obs``.
        discount: :math:`\gamma`.
    """

    rollout: Rollout
    baseline: Tensor
    scale: Tensor
    advantages: Tensor
    weight: Tensor
    log_probs: Tensor
    old_mean: Tensor
    old_log_std: Tensor
    discount: float

    def select(self, tasks: Tensor) -> PGBatch:
        """The same batch restricted to the tasks at indices ``tasks``."""
        r = self.rollout
        roll = Rollout(r.obs[tasks], r.actions[tasks], r.rewards[tasks], r.mask[tasks])
        ls = self.old_log_std
        return PGBatch(
            roll, self.baseline[tasks], self.scale[tasks], self.advantages[tasks],
            self.weight[tasks], self.log_probs[tasks], self.old_mean[tasks],
            ls[tasks] if ls.ndim == 4 else ls, self.discount,
        )  # fmt: skip


def make_batch(
    rollout: Rollout, params: Params, discount: float, *, normalize: bool = True
) -> PGBatch:
    """Fit the baseline and the normalization of ``rollout`` (sampled with ``params``)."""
    r, m = rollout.rewards, rollout.mask
    with torch.no_grad():
        base = linear_feature_baseline(rollout.obs, r, m, discount)
        steps = torch.arange(r.shape[-1], dtype=r.dtype)
        disc = torch.full_like(steps, discount).pow(steps)
        adv = (returns_to_go(r, discount, mask=m) - base) * disc * m  # DiCE units
        count = m.sum((1, 2)).clamp_min(1.0)
        if normalize:
            mean = adv.sum((1, 2)) / count
            var = ((adv - mean[:, None, None]) * m).square().sum((1, 2)) / count
            std = var.sqrt().clamp_min(1e-8)
            per_step = count / (m.shape[1])  # mean episode length: average over time steps
            scale = 1.0 / (std * per_step)
            base = (base + mean[:, None, None] / disc) * m
            adv = (adv - mean[:, None, None]) / std[:, None, None] * m
            weight = 1.0 / count
        else:
            scale = torch.ones(r.shape[0], dtype=r.dtype)
            weight = torch.full_like(scale, 1.0 / m.shape[1])
        old_mean = gaussian_mean(params, rollout.obs)
        ls = params["log_std"]
        old_log_std = ls.reshape(ls.shape[0], 1, 1, -1) if is_batched(params) else ls
        logp = normal_log_prob(old_mean, old_log_std, rollout.actions)
    return PGBatch(
        rollout, base, scale[:, None], adv, weight, logp, old_mean, old_log_std, discount
    )


def _check_estimator(fn: str, estimator: str) -> None:
    if estimator not in _ESTIMATORS:
        raise ValueError(
            f"{fn}: estimator={estimator!r} is not one of {list(_ESTIMATORS)} ('dice': exact "
            f"second order; 'reinforce': the plain surrogate, biased Hessian)."
        )


def task_objectives(params: Params, batch: PGBatch, *, estimator: Estimator = "dice") -> Tensor:
    """Per-task policy-gradient objective of ``batch`` at ``params`` (``[tasks]``, maximize).

    With ``estimator="dice"`` its derivatives of every order are unbiased (for the
    normalized, rescaled objective); ``"reinforce"`` only at first order.
    """
    _check_estimator("metagrad.rl.task_objectives", estimator)
    roll = batch.rollout
    logp = gaussian_log_prob(params, roll.obs, roll.actions)
    fn = dice_objective if estimator == "dice" else reinforce_surrogate
    per = fn(
        logp, roll.rewards, baseline=batch.baseline, discount=batch.discount, mask=roll.mask,
        reduction="none",
    )  # fmt: skip
    return per.mean(1) * batch.scale[:, 0]


def adapt(
    params: Params,
    batch: PGBatch,
    lr: float | Tensor,
    *,
    estimator: Estimator = "dice",
    create_graph: bool = True,
) -> Params:
    r"""One policy-gradient step per task: :math:`\theta'_i = \theta_i + \alpha \nabla \hat J_i`.

    Args:
        params: shared parameters (a view per task is taken) or batched ones (one per task).
        batch: the tasks' trajectories (:func:`make_batch`).
        lr: step size :math:`\alpha`.
        estimator: ``"dice"`` (exact second order) or ``"reinforce"``.
        create_graph: keep the graph through the gradient (meta-training); ``False`` gives
            detached adapted parameters (evaluation, data collection).

    Returns:
        Batched adapted parameters, ``[tasks, ...]`` per key.
    """
    tasks = batch.rollout.rewards.shape[0]
    # Parameters outside any graph (evaluation, a line-search candidate): nothing to keep.
    create_graph = create_graph and any(v.requires_grad for v in params.values())
    with torch.enable_grad():
        if not create_graph:
            params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        p = params if is_batched(params) else expand_params(params, tasks)
        obj = task_objectives(p, batch, estimator=estimator).sum()
        grads = torch.autograd.grad(obj, list(p.values()), create_graph=create_graph)
    out = {k: v + lr * g for (k, v), g in zip(p.items(), grads)}
    return out if create_graph else {k: v.detach() for k, v in out.items()}


def adapted(
    params: Params,
    batches: list[PGBatch],
    lr: float | Tensor,
    *,
    estimator: Estimator = "dice",
    create_graph: bool = True,
) -> Params:
    """``params`` after one :func:`adapt` step per batch in ``batches`` (none: ``params``)."""
    p = params
    for b in batches:
        p = adapt(p, b, lr, estimator=estimator, create_graph=create_graph)
    return p


def collect(
    env: Navigation2D,
    params: Params,
    goals: Tensor,
    trajectories: int,
    steps: int,
    lr: float,
    generator: torch.Generator | None,
    *,
    discount: float = 0.99,
    estimator: Estimator = "dice",
    normalize: bool = True,
) -> list[PGBatch]:
    """Sample, adapt, sample again: ``steps + 1`` batches, batch ``k`` drawn from the policy
    after ``k`` adaptation steps (batch 0 from ``params`` itself). No graph is kept."""
    p = {k: v.detach() for k, v in params.items()}
    out = []
    for k in range(steps + 1):
        roll = env.rollout(p, goals, trajectories, generator)
        out.append(make_batch(roll, p, discount, normalize=normalize))
        if k < steps:
            p = adapt(p, out[-1], lr, estimator=estimator, create_graph=False)
    return out


def meta_objective(
    params: Params,
    batches: list[PGBatch],
    lr: float | Tensor,
    *,
    estimator: Estimator = "dice",
) -> Tensor:
    """Mean over tasks of the post-adaptation DiCE objective (maximize): adapt on
    ``batches[:-1]`` with ``create_graph=True``, evaluate on ``batches[-1]``.

    ``-meta_objective(...).backward()`` delivers the MAML-RL meta-gradient with the exact
    second-order term (``estimator="dice"``).
    """
    p = adapted(params, batches[:-1], lr, estimator=estimator, create_graph=True)
    return task_objectives(p, batches[-1], estimator="dice").mean()


@dataclass(frozen=True)
class TRPOProblem:
    """TRPO's three functions of the meta-parameters (see :func:`trpo_functions`)."""

    surrogate: Callable[[Params], Tensor]
    kl: Callable[[Params], Tensor]
    fisher_kl: Callable[[Params], Tensor]


def trpo_functions(
    batches: list[PGBatch],
    lr: float,
    *,
    estimator: Estimator = "dice",
    fisher_tasks: Tensor | None = None,
) -> TRPOProblem:
    r"""TRPO's surrogate and KL as functions of the meta-parameters, through adaptation.

    ``surrogate(theta)``: mean over tasks of
    :math:`\frac{1}{n} \sum_t \frac{\pi_{\theta'}(a_t \mid s_t)}{\pi_{\mathrm{old}}(a_t \mid s_t)} \hat A_t`
    on the post-adaptation trajectories (its gradient at the sampling parameters equals that of
    :func:`meta_objective`); ``kl(theta)``: mean over tasks and visited states of
    :math:`\mathrm{KL}(\pi_{\mathrm{old}} \| \pi_{\theta'})`, whose Hessian at the sampling
    parameters is the Fisher matrix pulled back through the adaptation step (a third-order
    derivative of the policy). ``fisher_kl`` is the same KL on the tasks ``fisher_tasks`` only
    (all by default): TRPO implementations estimate the Fisher on a subsample to save time;
    the trust region itself is checked on every task by ``kl``.
    """
    memo: list[tuple[Params, Params]] = []

    def policy(theta: Params) -> Params:
        # The line search calls surrogate(c) then kl(c) on the same graph-free dict: adapt
        # once. (A dict with a graph is never reused: a backward pass may have freed it.)
        if memo and memo[0][0] is theta:
            return memo[0][1]
        p = adapted(theta, batches[:-1], lr, estimator=estimator, create_graph=True)
        if not any(v.requires_grad for v in theta.values()):
            memo[:] = [(theta, p)]
        return p

    def make_kl(sub: list[PGBatch], cache: bool) -> Callable[[Params], Tensor]:
        outer = sub[-1]
        roll, m = outer.rollout, outer.rollout.mask
        count = m.sum((1, 2)).clamp_min(1.0)

        def kl(theta: Params) -> Tensor:
            p = (
                policy(theta)
                if cache
                else adapted(theta, sub[:-1], lr, estimator=estimator, create_graph=True)
            )
            d = gaussian_kl(outer.old_mean, outer.old_log_std, p, roll.obs)
            return ((d * m).sum((1, 2)) / count).mean()

        return kl

    outer = batches[-1]
    roll, m = outer.rollout, outer.rollout.mask

    def surrogate(theta: Params) -> Tensor:
        logp = gaussian_log_prob(policy(theta), roll.obs, roll.actions)
        ratio = torch.exp(logp - outer.log_probs)
        return ((ratio * outer.advantages * m).sum((1, 2)) * outer.weight).mean()

    sub = batches if fisher_tasks is None else [b.select(fisher_tasks) for b in batches]
    return TRPOProblem(surrogate, make_kl(batches, True), make_kl(sub, False))
