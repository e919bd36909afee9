r"""The linear feature baseline of Duan et al. (2016), fitted per task.

:math:`b_t = w^\top \phi(s_t, t)` with :math:`\phi = (s, s^2, t/100, (t/100)^2, (t/100)^3, 1)`,
:math:`w` the ridge regression of the reward-to-go :math:`G_t` on :math:`\phi` over one task's
trajectories: the value estimate the MAML paper's RL experiments subtract. Its output is
detached, as :func:`metagrad.rl.dice_objective` requires of a baseline. (Fitted on the same
trajectories it is applied to, it depends slightly on their actions; that is the standard
practice. For an exactly unbiased baseline fit it on other trajectories.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from metagrad.rl._dice import returns_to_go


def _features(obs: Tensor) -> Tensor:
    o = obs.clamp(-10.0, 10.0)
    steps = obs.shape[-2]
    t = (torch.arange(steps, dtype=obs.dtype) / 100.0).reshape(*([1] * (obs.ndim - 2)), steps, 1)
    t = t.expand(*obs.shape[:-1], 1)
    return torch.cat([o, o.square(), t, t.square(), t.pow(3), torch.ones_like(t)], -1)


def linear_feature_baseline(
    obs: Tensor, rewards: Tensor, mask: Tensor, discount: float, *, reg: float = 1e-5
) -> Tensor:
    r"""Per-task linear value fit :math:`b_t` of the reward-to-go, shape of ``rewards``.

    Args:
        obs: ``[tasks, trajectories, T, obs_dim]``.
        rewards, mask: ``[tasks, trajectories, T]``.
        discount: :math:`\gamma` of the reward-to-go :math:`\sum_{t' \ge t} \gamma^{t'-t} r_{t'}`.
        reg: ridge coefficient (raised tenfold until the solve is finite, as rllab does).

    Returns:
        Detached baseline values, 0 where ``mask`` is 0.
    """
    with torch.no_grad():
        feats = _features(obs).double() * mask.double()[..., None]
        target = returns_to_go(rewards.double(), discount, mask=mask) * mask.double()
        tasks = feats.shape[0]
        x = feats.reshape(tasks, -1, feats.shape[-1])
        y = target.reshape(tasks, -1, 1)
        xtx, xty = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
        eye = torch.eye(x.shape[-1], dtype=x.dtype)
        w = None
        for k in range(5):
            w = torch.linalg.solve(xtx + reg * 10**k * eye, xty)
            if bool(w.isfinite().all()):
                break
        assert w is not None
        values = (x @ w).reshape(target.shape)
        return (values * mask.double()).to(rewards.dtype)
