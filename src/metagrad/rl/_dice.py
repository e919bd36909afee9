r"""Policy-gradient estimators of any order: DiCE's magic box, its baseline, plain REINFORCE.

Trajectory tensors share one layout: time is the **last** dimension, ``[..., T]``, and every
leading dimension indexes trajectories (tasks, episodes...). ``log_probs[..., t]`` is
:math:`\log \pi_\theta(a_t \mid s_t)` of the action actually taken, ``rewards[..., t]`` the
reward that followed it; ``mask`` (1 while the episode runs, 0 after it ended) and
``baseline`` (:math:`b_t`, a function of the state, not of :math:`a_t`) have the same shape.

Writing :math:`W_{\le t} = \sum_{t' \le t} \log \pi(a_{t'} \mid s_{t'})` and
:math:`\boxdot(x) = \exp(x - \bot(x))` (:math:`\bot` = stop-gradient):

.. math::

    \mathcal{L}_\boxdot = \sum_t \gamma^t \boxdot(W_{\le t})\, r_t
        + \sum_t \gamma^t \big(\boxdot(W_{< t}) - \boxdot(W_{\le t})\big)\, b_t

Its value is the discounted return, and for every order :math:`n`,
:math:`\mathbb{E}[\nabla^n \mathcal{L}_\boxdot] = \nabla^n J(\theta)` with
:math:`J = \mathbb{E} \sum_t \gamma^t r_t` (Foerster et al., 2018). The baseline term has zero
expectation at every order (given the history, :math:`\mathbb{E}_{a_t}` of any derivative of
:math:`\boxdot(\log\pi(a_t \mid s_t))` is that derivative of :math:`\sum_a \pi(a \mid s_t) = 1`),
and its factor :math:`\boxdot(W_{<t})` makes it reduce variance at second order too, not only at
first (Mao et al., 2019). The REINFORCE surrogate
:math:`\sum_t \log\pi_t\, (\sum_{t' \ge t} \gamma^{t'} r_{t'} - \gamma^t b_t)` has the same
first derivative but a biased second: it drops the score products
:math:`\nabla W \nabla W^\top` (the term ProMP and DiCE show is needed for meta-RL).

References:
    Foerster, Farquhar, Al-Shedivat, Rocktäschel, Xing, Whiteson. *DiCE: The Infinitely
    Differentiable Monte Carlo Estimator*, ICML 2018.
    Mao, Foerster, Rocktäschel, Al-Shedivat, Farquhar, Whiteson. *A Baseline for Any Order
    Gradient Estimation in Stochastic Computation Graphs*, ICML 2019.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


def magic_box(x: Tensor) -> Tensor:
    r"""DiCE's magic box :math:`\boxdot(x) = \exp(x - \bot(x))`: value 1, derivative
    :math:`\nabla \boxdot(x) = \boxdot(x)\, \nabla x`, at every order.

    Args:
        x: Any tensor (typically a sum of log-probabilities of sampled actions).

    Returns:
        A tensor of ones with ``x``'s shape whose derivatives are those of :math:`e^{x - c}`
        at :math:`c = x`.

    Example:
        >>> import torch
        >>> x = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        >>> y = magic_box(3 * x)
        >>> g, = torch.autograd.grad(y, x, create_graph=True)
        >>> h, = torch.autograd.grad(g, x)
        >>> float(y), float(g), float(h)
        (1.0, 3.0, 9.0)
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"metagrad.rl.magic_box: x must be a tensor, got {type(x).__name__}; pass the "
            f"log-probabilities as a tensor that depends on the policy parameters."
        )
    return torch.exp(x - x.detach())


# ----------------------------------------------------------------------------- validation


def _where(t: Tensor) -> str:
    """Index of the first NaN/Inf of ``t`` and how many there are, for an error message."""
    bad = ~t.detach().isfinite()
    first = tuple(int(i) for i in bad.nonzero()[0].tolist())
    value = float(t.detach()[first]) if first else float(t.detach())
    count = int(bad.sum())
    index = first[0] if len(first) == 1 else first
    more = f" ({count} non-finite entries in all)" if count > 1 else ""
    return f"{value} at index {index}{more}"


def _check_inputs(
    fn: str,
    log_probs: object,
    rewards: object,
    baseline: object,
    mask: object,
    discount: object,
    reduction: object,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, float]:
    """Shapes, dtypes, finiteness and the parameter dependence of ``log_probs``, named."""
    for name, t in (("log_probs", log_probs), ("rewards", rewards)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(
                f"{fn}: {name} must be a floating-point tensor shaped [..., T] (time last), got "
                f"{kind}. Fix: pass torch tensors, e.g. torch.as_tensor(x, dtype=torch.float32)."
            )
    assert isinstance(log_probs, Tensor) and isinstance(rewards, Tensor)  # for mypy
    if log_probs.ndim == 0:
        raise ValueError(
            f"{fn}: log_probs is a 0-dim tensor; trajectories need a time dimension. Fix: "
            f"shape it [..., T] (one entry per time step; [1] for a one-step bandit)."
        )
    if rewards.shape != log_probs.shape:
        raise ValueError(
            f"{fn}: rewards has shape {tuple(rewards.shape)} but log_probs has shape "
            f"{tuple(log_probs.shape)}; they must match, [..., T] with time last (one reward per "
            f"action taken). Fix: align the two (a reward of 0 where nothing was earned; mask= "
            f"for steps after an episode ended)."
        )
    extra: list[Tensor | None] = []
    for name, t in (("baseline", baseline), ("mask", mask)):
        if t is None:
            extra.append(None)
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor or None, got {type(t).__name__}.")
        if t.shape != log_probs.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(t.shape)} but log_probs has shape "
                f"{tuple(log_probs.shape)}; {name} needs one entry per time step, same shape. "
                f"Fix: build it with the trajectories' [..., T] layout."
            )
        if name == "baseline" and t.requires_grad:
            raise ValueError(
                f"{fn}: baseline requires grad; a baseline must be a constant (a function of the "
                f"state fitted separately), or its own derivatives bias the estimator. Fix: pass "
                f"baseline.detach()."
            )
        extra.append(t.to(log_probs.dtype) if name == "mask" else t)
    base, m = extra
    valid = (m != 0) if m is not None else None
    for name, t in (("rewards", rewards), ("log_probs", log_probs), ("baseline", base)):
        if t is None:
            continue
        tv = t if valid is None else torch.where(valid, t.detach(), torch.zeros_like(t.detach()))
        if not bool(tv.detach().isfinite().all()):
            fix = {
                "rewards": "check the environment's reward function (a division by zero, a "
                "log of 0) and pad finished episodes with 0 plus mask=, not NaN",
                "log_probs": "an action with probability 0 under the policy gives -inf: clip "
                "the policy's log-std or probabilities, and use mask= for padded steps",
                "baseline": "refit the baseline (an ill-conditioned regression), or drop it",
            }[name]
            raise ValueError(f"{fn}: {name} holds a non-finite value, {_where(tv)}. Fix: {fix}.")
    if torch.is_grad_enabled() and not log_probs.requires_grad:
        raise ValueError(
            f"{fn}: log_probs does not require grad, so it does not depend on any parameter "
            f"and every derivative of the estimator would be zero. It was probably computed "
            f"under torch.no_grad() (inside the sampling loop), detached, or from a "
            f"distribution built from detached parameters. Fix: recompute "
            f"log_prob(actions) from the parameters you differentiate, outside torch.no_grad()."
        )
    if isinstance(discount, bool) or not isinstance(discount, (int, float)):
        raise TypeError(f"{fn}: discount must be a number in [0, 1], got {discount!r}.")
    if not (math.isfinite(discount) and 0.0 <= discount <= 1.0):
        raise ValueError(f"{fn}: discount={discount!r} must be in [0, 1] (1 = undiscounted).")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction={reduction!r} is not one of {list(_REDUCTIONS)} ('mean' over "
            f"trajectories, 'sum', or 'none' for one value per trajectory)."
        )
    return log_probs, rewards, base, m, float(discount)


def _discounts(like: Tensor, discount: float) -> Tensor:
    steps = torch.arange(like.shape[-1], dtype=like.dtype, device=like.device)
    return torch.full_like(steps, discount).pow(steps)


def _reduce(per_trajectory: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_trajectory
    return per_trajectory.sum() if reduction == "sum" else per_trajectory.mean()


def _masked(t: Tensor, m: Tensor | None) -> Tensor:
    # Multiplying (not indexing) keeps shapes; padded log-probs must not be NaN (checked).
    return t if m is None else torch.where(m != 0, t, torch.zeros_like(t))


# ----------------------------------------------------------------------------- estimators


def returns_to_go(rewards: Tensor, discount: float = 1.0, *, mask: Tensor | None = None) -> Tensor:
    r"""Discounted reward-to-go :math:`G_t = \sum_{t' \ge t} \gamma^{t' - t} r_{t'}` along the
    last dimension (steps with ``mask == 0`` count as reward 0).

    Example:
        >>> import torch
        >>> returns_to_go(torch.tensor([1.0, 2.0, 4.0]), 0.5)
        tensor([3., 4., 4.])
    """
    if not isinstance(rewards, Tensor) or rewards.ndim == 0:
        raise ValueError(
            "metagrad.rl.returns_to_go: rewards must be a tensor shaped [..., T] (time last)."
        )
    r = _masked(rewards, mask)
    out = torch.empty_like(r)
    acc = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[..., t] + discount * acc
        out[..., t] = acc
    return out


def dice_objective(
    log_probs: Tensor,
    rewards: Tensor,
    *,
    baseline: Tensor | None = None,
    discount: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""DiCE objective: the discounted return whose derivatives of every order are unbiased.

    .. math::

        \mathcal{L}_\boxdot = \sum_t \gamma^t \boxdot(W_{\le t})\, r_t
            + \sum_t \gamma^t \big(\boxdot(W_{< t}) - \boxdot(W_{\le t})\big)\, b_t,
        \qquad W_{\le t} = \sum_{t' \le t} \log \pi_\theta(a_{t'} \mid s_{t'})

    The value equals the discounted return of each trajectory; differentiate it ``n`` times
    (``torch.autograd.grad(..., create_graph=True)``, :func:`metagrad.hessian`, a MAML inner
    step) and the average over sampled trajectories converges to
    :math:`\nabla^n \mathbb{E}[\sum_t \gamma^t r_t]`. Rewards that depend on the parameters
    directly (reparameterized costs) are differentiated too.

    Args:
        log_probs: ``[..., T]`` log-probabilities of the sampled actions, computed from the
            parameters to differentiate.
        rewards: ``[..., T]`` rewards (constants, or differentiable costs).
        baseline: ``[..., T]`` detached :math:`b_t` (e.g. a value estimate of :math:`s_t`) for
            the all-order-unbiased baseline term of Mao et al. (2019); ``None`` for none.
        discount: :math:`\gamma \in [0, 1]`.
        mask: ``[..., T]``, nonzero while the episode runs; masked steps contribute neither a
            reward, a baseline nor a stochastic node.
        reduction: ``"mean"`` over trajectories (default), ``"sum"``, or ``"none"`` (shape
            ``[...]``, e.g. one value per task and episode).

    Returns:
        The objective (to be **maximized**), reduced as asked.

    Raises:
        TypeError: non-tensor or non-floating inputs.
        ValueError: shapes that differ, NaN/Inf in ``rewards``, ``log_probs`` or ``baseline``
            (the index is named), ``log_probs`` that do not require grad (with grad mode on),
            a baseline that requires grad, a discount outside [0, 1], an unknown reduction.

    Example:
        >>> import torch
        >>> theta = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        >>> logp = torch.log_softmax(torch.stack([theta, -theta]), 0)  # two-armed bandit
        >>> actions, rewards = torch.tensor([0, 1, 0, 0]), torch.tensor([1.0, 0.0, 1.0, 1.0])
        >>> obj = dice_objective(logp[actions][:, None], rewards.double()[:, None])
        >>> float(obj), float(torch.autograd.grad(obj, theta)[0])  # 4 samples; exact dJ/dtheta: 0.5
        (0.75, 0.75)

    References:
        Foerster et al., *DiCE*, ICML 2018; Mao et al., *A Baseline for Any Order Gradient
        Estimation in Stochastic Computation Graphs*, ICML 2019.
    """
    fn = "metagrad.rl.dice_objective"
    logp, r, b, m, gamma = _check_inputs(
        fn, log_probs, rewards, baseline, mask, discount, reduction
    )
    logp, r = _masked(logp, m), _masked(r, m)
    disc = _discounts(logp, gamma)
    cum = logp.cumsum(-1)
    per = (magic_box(cum) * r * disc).sum(-1)
    if b is not None:
        per = per + _baseline_term(logp, cum, _masked(b, m), disc)
    return _reduce(per, reduction)


def _baseline_term(logp: Tensor, cum: Tensor, b: Tensor, disc: Tensor) -> Tensor:
    # (1 - box(w_t)) box(W_<t) = box(W_<t) - box(W_<=t): value 0, zero mean at every order.
    return ((magic_box(cum - logp) - magic_box(cum)) * b * disc).sum(-1)


def dice_baseline_term(
    log_probs: Tensor,
    baseline: Tensor,
    *,
    discount: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""The baseline term alone:
    :math:`\sum_t \gamma^t (1 - \boxdot(\log\pi_t))\, \boxdot(W_{<t})\, b_t`.

    Its value is 0 and the expectation of each of its derivatives is 0, so adding it to any
    DiCE objective leaves every order unbiased while cancelling variance (Mao et al., 2019).
    :func:`dice_objective` with ``baseline=`` adds exactly this.

    Args:
        log_probs, baseline, discount, mask, reduction: as in :func:`dice_objective`.

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.25]], requires_grad=True))
        >>> float(dice_baseline_term(lp, torch.tensor([[1.0, 2.0]])))
        0.0
    """
    fn = "metagrad.rl.dice_baseline_term"
    if not isinstance(baseline, Tensor):
        raise TypeError(f"{fn}: baseline must be a tensor shaped like log_probs, got "
                        f"{type(baseline).__name__}.")  # fmt: skip
    logp, _, b, m, gamma = _check_inputs(
        fn, log_probs, torch.zeros_like(log_probs), baseline, mask, discount, reduction
    )
    assert b is not None
    logp = _masked(logp, m)
    return _reduce(
        _baseline_term(logp, logp.cumsum(-1), _masked(b, m), _discounts(logp, gamma)), reduction
    )


def reinforce_surrogate(
    log_probs: Tensor,
    rewards: Tensor,
    *,
    baseline: Tensor | None = None,
    discount: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""The plain REINFORCE surrogate, for comparison: right first derivative, wrong second.

    .. math::

        \mathcal{L}_{\mathrm{PG}} = \sum_t \log \pi_\theta(a_t \mid s_t)
            \Big(\sum_{t' \ge t} \gamma^{t'} r_{t'} - \gamma^t b_t\Big)

    with the returns treated as constants. :math:`\mathbb{E}[\nabla \mathcal{L}_{\mathrm{PG}}]
    = \nabla J`, but :math:`\nabla^2 \mathcal{L}_{\mathrm{PG}} = \sum_t \nabla^2 \log\pi_t\,
    (\dots)` misses the products of score functions, so its Hessian is biased: a MAML inner
    step on it gives a wrong meta-gradient (DiCE, ProMP). Its value is not the return.

    Args:
        log_probs, rewards, baseline, discount, mask, reduction: as in :func:`dice_objective`.

    Returns:
        The surrogate (to be maximized), reduced as asked.

    Raises:
        TypeError, ValueError: as :func:`dice_objective`.

    Example:
        >>> import torch
        >>> theta = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        >>> logp = torch.log_softmax(torch.stack([theta, -theta]), 0)
        >>> actions, rewards = torch.tensor([0, 1, 0, 0]), torch.tensor([1.0, 0.0, 1.0, 1.0])
        >>> s = reinforce_surrogate(logp[actions][:, None], rewards.double()[:, None])
        >>> float(torch.autograd.grad(s, theta)[0])  # same first derivative as DiCE
        0.75
    """
    fn = "metagrad.rl.reinforce_surrogate"
    logp, r, b, m, gamma = _check_inputs(
        fn, log_probs, rewards, baseline, mask, discount, reduction
    )
    logp = _masked(logp, m)
    disc = _discounts(logp, gamma)
    weights = returns_to_go(r.detach() * disc, 1.0, mask=m)
    if b is not None:
        weights = weights - _masked(b, m) * disc
    return _reduce((logp * weights).sum(-1), reduction)
