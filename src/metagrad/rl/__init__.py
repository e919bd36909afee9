"""Meta-reinforcement learning: policy-gradient estimators of any order and MAML-RL.

* Estimators (``[..., T]`` trajectory tensors, time last): :func:`magic_box`,
  :func:`dice_objective` (unbiased derivatives of every order, with the all-order baseline
  term), :func:`dice_baseline_term`, :func:`reinforce_surrogate` (the plain surrogate: right
  gradient, biased Hessian), :func:`returns_to_go`.
* The MAML paper's 2D navigation: :class:`Navigation2D` (torch, vectorized over tasks and
  trajectories), a Gaussian MLP policy as pure functions (:func:`init_gaussian_mlp`,
  :func:`gaussian_log_prob`, ...), :func:`linear_feature_baseline`.
* MAML-RL: :func:`collect`, :func:`adapt`, :func:`meta_objective` (exact second order through
  the policy-gradient step), :func:`trpo_functions` and :func:`trpo_step` (Fisher-vector
  products by :func:`metagrad.hvp`, solved by :func:`metagrad.bilevel.cg`).

``metagrad train navigation`` runs the paper's experiment (``metagrad.rl._train``, its CLI in
``metagrad.rl._cli``); ``metagrad.load(run_folder)`` gives its trained policies back as a
:class:`NavigationPolicy` (adapt to new goals, roll out, evaluate as ``metagrad eval`` does).
"""

from __future__ import annotations

from metagrad.rl._baseline import linear_feature_baseline
from metagrad.rl._dice import (
    dice_baseline_term,
    dice_objective,
    magic_box,
    reinforce_surrogate,
    returns_to_go,
)
from metagrad.rl._maml import (
    PGBatch,
    TRPOProblem,
    adapt,
    adapted,
    collect,
    make_batch,
    meta_objective,
    task_objectives,
    trpo_functions,
)
from metagrad.rl._navigation import Navigation2D, Rollout
from metagrad.rl._policy import (
    expand_params,
    gaussian_kl,
    gaussian_log_prob,
    gaussian_mean,
    gaussian_sample,
    init_gaussian_mlp,
    is_batched,
)
from metagrad.rl._trained import NavigationPolicy
from metagrad.rl._trpo import TRPOInfo, fisher_vector_product, trpo_step

__all__ = [
    "Navigation2D",
    "NavigationPolicy",
    "PGBatch",
    "Rollout",
    "TRPOInfo",
    "TRPOProblem",
    "adapt",
    "adapted",
    "collect",
    "dice_baseline_term",
    "dice_objective",
    "expand_params",
    "fisher_vector_product",
    "gaussian_kl",
    "gaussian_log_prob",
    "gaussian_mean",
    "gaussian_sample",
    "init_gaussian_mlp",
    "is_batched",
    "linear_feature_baseline",
    "magic_box",
    "make_batch",
    "meta_objective",
    "reinforce_surrogate",
    "returns_to_go",
    "task_objectives",
    "trpo_functions",
    "trpo_step",
]
