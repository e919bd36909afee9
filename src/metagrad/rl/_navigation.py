"""The MAML paper's 2D navigation task, in torch, vectorized over tasks and trajectories.

A point robot starts at the origin; each task is a goal drawn uniformly from
``[-0.5, 0.5]^2``. The observation is the position, the action a velocity clipped to
``[-0.1, 0.1]`` per coordinate, the reward the negative distance to the goal after the move;
an episode ends after ``horizon`` (100) steps or once the robot is within 0.01 of the goal
(Finn, Abbeel, Levine, *Model-Agnostic Meta-Learning*, ICML 2017, section 5.3).

Every task and trajectory steps at once: one policy evaluation per time step for the whole
``[tasks, trajectories]`` batch; nothing here needs a simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.rl._policy import gaussian_sample

Sampler = Callable[[Params, Tensor, "torch.Generator | None"], Tensor]


@dataclass(frozen=True)
class Rollout:
    """A batch of trajectories, time in the third dimension.

    Attributes:
        obs: ``[tasks, trajectories, T, 2]`` positions where each action was taken.
        actions: ``[tasks, trajectories, T, 2]`` sampled (unclipped) actions.
        rewards: ``[tasks, trajectories, T]`` rewards (0 after the episode ended).
        mask: ``[tasks, trajectories, T]`` 1 while the episode runs, 0 after it ended.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    def returns(self) -> Tensor:
        """Undiscounted return of each trajectory, ``[tasks, trajectories]``."""
        return (self.rewards * self.mask).sum(-1)


class Navigation2D:
    """Point-robot navigation to a goal in the plane (the MAML paper's 2D navigation).

    Args:
        horizon: steps per episode (100 in the paper).
        max_action: actions are clipped to ``[-max_action, max_action]`` per coordinate.
        goal_low, goal_high: goals are uniform in ``[goal_low, goal_high]^2``.
        success_radius: the episode ends once the robot is this close to the goal.

    Example:
        >>> import torch
        >>> from metagrad.rl import Navigation2D, gaussian_sample, init_gaussian_mlp
        >>> env, g = Navigation2D(horizon=5), torch.Generator().manual_seed(0)
        >>> goals = env.sample_goals(3, g)
        >>> roll = env.rollout(init_gaussian_mlp(generator=g), goals, 4, g)
        >>> tuple(roll.rewards.shape), tuple(roll.obs.shape)
        ((3, 4, 5), (3, 4, 5, 2))
    """

    obs_dim = 2
    act_dim = 2

    def __init__(
        self,
        horizon: int = 100,
        *,
        max_action: float = 0.1,
        goal_low: float = -0.5,
        goal_high: float = 0.5,
        success_radius: float = 0.01,
    ) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"metagrad.rl.Navigation2D: horizon={horizon!r} must be an int >= 1.")
        if not max_action > 0 or not goal_low < goal_high or success_radius < 0:
            raise ValueError(
                f"metagrad.rl.Navigation2D: need max_action > 0 (got {max_action}), goal_low < "
                f"goal_high (got {goal_low}, {goal_high}) and success_radius >= 0."
            )
        self.horizon = horizon
        self.max_action = float(max_action)
        self.goal_low, self.goal_high = float(goal_low), float(goal_high)
        self.success_radius = float(success_radius)

    def sample_goals(
        self,
        tasks: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``[tasks, 2]`` goals, uniform in the square."""
        u = torch.rand(tasks, 2, generator=generator, dtype=dtype)
        return self.goal_low + (self.goal_high - self.goal_low) * u

    def step(self, pos: Tensor, action: Tensor, goals: Tensor) -> tuple[Tensor, Tensor]:
        """Next positions and rewards for ``pos``, ``action`` ``[tasks, n, 2]``, goals
        ``[tasks, 2]``."""
        nxt = pos + action.clamp(-self.max_action, self.max_action)
        reward = -(nxt - goals[:, None, :]).norm(dim=-1)
        return nxt, reward

    def rollout(
        self,
        params: Params,
        goals: Tensor,
        trajectories: int,
        generator: torch.Generator | None = None,
        *,
        sample: Sampler = gaussian_sample,
    ) -> Rollout:
        """Sample ``trajectories`` episodes per goal with policy ``params`` (shared by every
        task, or batched: one set per task).

        Sampling records no graph; compute log-probabilities of ``Rollout.actions`` afterwards
        with the parameters to differentiate (:func:`metagrad.rl.gaussian_log_prob`).
        """
        if goals.ndim != 2 or goals.shape[1] != 2:
            raise ValueError(
                f"metagrad.rl.Navigation2D.rollout: goals must be [tasks, 2], got "
                f"{tuple(goals.shape)}."
            )
        tasks, h = goals.shape[0], self.horizon
        dtype = params["log_std"].dtype
        goals = goals.to(dtype)
        pos = torch.zeros(tasks, trajectories, 2, dtype=dtype)
        alive = torch.ones(tasks, trajectories, dtype=dtype)
        obs, acts, rews, masks = [], [], [], []
        with torch.no_grad():
            for _ in range(h):
                a = sample(params, pos, generator)
                nxt, r = self.step(pos, a, goals)
                obs.append(pos)
                acts.append(a)
                rews.append(r * alive)
                masks.append(alive)
                done = (nxt - goals[:, None, :]).norm(dim=-1) < self.success_radius
                alive = alive * (~done).to(dtype)
                pos = nxt  # steps after the end are masked out, wherever the robot goes
        return Rollout(
            obs=torch.stack(obs, 2),
            actions=torch.stack(acts, 2),
            rewards=torch.stack(rews, 2),
            mask=torch.stack(masks, 2),
        )
