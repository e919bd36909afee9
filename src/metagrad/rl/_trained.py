"""The trained policies of a ``metagrad train navigation`` run, as :func:`metagrad.load` returns
them: the parameters, test-time adaptation and the evaluation ``metagrad eval`` prints."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.rl._maml import adapted, collect
from metagrad.rl._navigation import Navigation2D, Rollout
from metagrad.rl._policy import expand_params, gaussian_mean, gaussian_sample

if TYPE_CHECKING:  # the trainer (and metagrad.training) is imported when a run is loaded
    from metagrad.rl._train import NavigationConfig, NavigationTrainer


class NavigationPolicy:
    """The policies a navigation run trained: MAML's, the pretrained baseline, the initialization.

    Policies are the Gaussian MLPs of :mod:`metagrad.rl` as plain parameter dicts (``l0.weight``,
    ``l0.bias``, ..., ``out.bias``, ``log_std``; detached, on the CPU), so :func:`metagrad.rl.gaussian_mean`,
    :func:`~metagrad.rl.gaussian_sample`, :func:`~metagrad.rl.collect` and
    :func:`~metagrad.rl.adapt` take them directly. Get one with ``metagrad.load(run_folder)``.

    Attributes:
        params: MAML's meta-learned parameters (the policy to adapt to a new goal).
        pretrained: the pretrained baseline's (``None`` when the run trained none).
        init: the random initialization both were trained from.
        config: the run's :class:`~metagrad.rl._train.NavigationConfig`.
        env: the task family (:class:`~metagrad.rl.Navigation2D` with the run's horizon).
        iteration: MAML meta-iterations trained.

    Example:
        >>> import metagrad, torch
        >>> policy = metagrad.load("results/navigation")  # doctest: +SKIP
        >>> goals = torch.tensor([[0.3, -0.2]])  # doctest: +SKIP
        >>> fast = policy.adapt(goals, steps=1)  # doctest: +SKIP
        >>> policy.rollout(goals, 10, params=fast).returns().mean()  # doctest: +SKIP
        >>> policy.evaluate(tasks=40)["rows"]["maml"]  # doctest: +SKIP
    """

    def __init__(self, trainer: NavigationTrainer) -> None:
        self._trainer = trainer
        self.config: NavigationConfig = trainer.cfg
        self.env: Navigation2D = trainer.env
        self.iteration: int = trainer.phases["maml"].iteration
        policies = trainer.policies()  # detached views of the trainer's tensors
        self.params: Params = policies["maml"]
        self.pretrained: Params | None = policies.get("pretrained")
        self.init: Params = policies["random"]

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike[str] | dict[str, Any]
    ) -> NavigationPolicy:
        """The policies of a navigation run folder, checkpoint file or loaded checkpoint."""
        from metagrad.rl._train import NavigationTrainer

        return cls(NavigationTrainer.from_checkpoint(checkpoint, restore_rng=False))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"NavigationPolicy(maml-{c.outer}, {self.iteration} meta-iterations, hidden "
            f"{c.hidden}x{c.hidden}, horizon {c.horizon}, inner_lr {c.inner_lr})"
        )

    def policies(self) -> dict[str, Params]:
        """``{"maml": ..., "pretrained": ... (if trained), "random": ...}``."""
        out = {"maml": self.params}
        if self.pretrained is not None:
            out["pretrained"] = self.pretrained
        out["random"] = self.init
        return out

    def act(
        self,
        obs: Tensor,
        *,
        params: Params | None = None,
        generator: torch.Generator | None = None,
        deterministic: bool = False,
    ) -> Tensor:
        """Actions at positions ``obs`` (``[..., 2]``): sampled, or the mean with
        ``deterministic=True``. ``params`` defaults to MAML's; pass :meth:`adapt`'s result
        (``[tasks, ...]``) with ``obs`` of shape ``[tasks, ..., 2]``."""
        p = self.params if params is None else params
        if deterministic:
            with torch.no_grad():
                return gaussian_mean(p, obs)
        return gaussian_sample(p, obs, generator)

    def adapt(
        self,
        goals: Tensor,
        steps: int = 1,
        *,
        trajectories: int | None = None,
        params: Params | None = None,
        generator: torch.Generator | None = None,
    ) -> Params:
        """The policy after ``steps`` policy-gradient steps on each goal, as in evaluation.

        Each step samples ``trajectories`` (default: the run's ``eval_trajectories``) from the
        current policy and takes one DiCE policy-gradient step of the run's ``inner_lr``.

        Args:
            goals: ``[tasks, 2]`` goal positions.
            steps: adaptation steps (0: the policy itself, one copy per goal).
            trajectories: trajectories per goal and step.
            params: the policy to adapt (default: MAML's).
            generator: random numbers of the sampled trajectories.

        Returns:
            Detached parameters, ``[tasks, ...]`` per key (one policy per goal).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"NavigationPolicy.adapt: steps={steps!r} must be an int >= 0.")
        cfg = self.config
        p = self.params if params is None else params
        if steps == 0:
            return {k: v.clone() for k, v in expand_params(p, goals.shape[0]).items()}
        n = cfg.eval_trajectories if trajectories is None else trajectories
        batches = collect(self.env, p, goals, n, steps - 1, cfg.inner_lr, generator,
                          discount=cfg.discount)  # fmt: skip
        return adapted(p, batches, cfg.inner_lr, create_graph=False)

    def rollout(
        self,
        goals: Tensor,
        trajectories: int,
        *,
        params: Params | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """``trajectories`` episodes per goal (``[tasks, 2]``) with ``params`` (default MAML's;
        batched ones from :meth:`adapt` have one policy per goal)."""
        return self.env.rollout(self.params if params is None else params, goals, trajectories,
                                generator)  # fmt: skip

    def evaluate(
        self,
        *,
        tasks: int | None = None,
        test_steps: list[int] | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """The run's evaluation, as ``metagrad eval`` computes and prints it.

        Average return of every policy after each number of adaptation steps on the same
        held-out goals (``rows``, per policy) and the paired differences MAML minus each
        baseline (``differences``); see :meth:`NavigationTrainer.evaluate`.

        Args:
            tasks: held-out goals (default: the run's ``eval_tasks``; ``metagrad eval --tasks``).
            test_steps: adaptation step counts (default: the run's; ``--test-steps``).
            seed: seed of the held-out goals (default: the run's; ``--seed``).
        """
        from metagrad.rl._train import validate

        trainer = copy.copy(self._trainer)  # same policies, its own evaluation settings
        changes: dict[str, Any] = {}
        if tasks is not None:
            changes["eval_tasks"] = tasks
        if test_steps is not None:
            changes["test_steps"] = list(test_steps)
        trainer.cfg = validate(dataclasses.replace(self._trainer.cfg, **changes))
        return trainer.evaluate(seed=seed)
