r"""A Gaussian MLP policy as pure functions of a parameter dict, batched over tasks.

:math:`\pi_\theta(a \mid s) = \mathcal{N}(a;\ \mu_\theta(s),\ \mathrm{diag}(e^{2 \log\sigma}))`,
:math:`\mu_\theta` an MLP with ReLU hidden layers and a state-independent learned
:math:`\log\sigma` (the MAML paper's RL policy: two hidden layers of 100 units).

Parameters are a flat dict (``l0.weight``, ``l0.bias``, ..., ``out.weight``, ``out.bias``,
``log_std``), weights shaped ``[out, in]`` as in ``nn.Linear``. A *batched* dict carries one
more leading dimension, one set of parameters per task (``[tasks, out, in]``), and then the
observations' first dimension indexes the same tasks. MAML's per-task adapted parameters are
such a batched dict, so one call evaluates every task's policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad._typing import Params

_LOG_2PI = math.log(2 * math.pi)


def init_gaussian_mlp(
    obs_dim: int = 2,
    act_dim: int = 2,
    hidden: Sequence[int] = (100, 100),
    *,
    init_std: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Glorot-uniform weights, zero biases, ``log_std = log(init_std)`` (rllab's defaults).

    Example:
        >>> p = init_gaussian_mlp(2, 2, (100, 100))
        >>> {k: tuple(v.shape) for k, v in p.items()}["l1.weight"]
        (100, 100)
    """
    if not (isinstance(init_std, (int, float)) and init_std > 0 and math.isfinite(init_std)):
        raise ValueError(f"metagrad.rl.init_gaussian_mlp: init_std={init_std!r} must be > 0.")
    sizes = [obs_dim, *hidden, act_dim]
    if any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(
            f"metagrad.rl.init_gaussian_mlp: layer sizes {sizes} must be positive integers."
        )
    params: Params = {}
    names = [f"l{i}" for i in range(len(hidden))] + ["out"]
    for name, n_in, n_out in zip(names, sizes[:-1], sizes[1:]):
        bound = math.sqrt(6.0 / (n_in + n_out))
        w = torch.rand(n_out, n_in, generator=generator, dtype=dtype) * (2 * bound) - bound
        params[f"{name}.weight"] = w
        params[f"{name}.bias"] = torch.zeros(n_out, dtype=dtype)
    params["log_std"] = torch.full((act_dim,), math.log(init_std), dtype=dtype)
    return params


def is_batched(params: Params) -> bool:
    """Whether ``params`` holds one parameter set per task (a leading task dimension)."""
    return params["log_std"].ndim == 2


def _layers(params: Params) -> list[str]:
    hidden = sorted(
        (k[: -len(".weight")] for k in params if k.startswith("l") and k.endswith(".weight")),
        key=lambda n: int(n[1:]),
    )
    return [*hidden, "out"]


def _linear(x: Tensor, w: Tensor, b: Tensor, batched: bool) -> Tensor:
    if not batched:
        return F.linear(x, w, b)
    shape = x.shape
    flat = x.reshape(shape[0], -1, shape[-1])
    y = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))
    return y.reshape(*shape[:-1], w.shape[1])


def gaussian_mean(params: Params, obs: Tensor) -> Tensor:
    r"""The policy mean :math:`\mu_\theta(s)`; ``obs`` is ``[..., obs_dim]`` (batched params:
    ``[tasks, ..., obs_dim]``)."""
    batched = is_batched(params)
    if batched and obs.shape[0] != params["log_std"].shape[0]:
        raise ValueError(
            f"metagrad.rl.gaussian_mean: the parameters hold {params['log_std'].shape[0]} tasks "
            f"but obs has {obs.shape[0]} in its first dimension; batched parameters need "
            f"observations shaped [tasks, ..., obs_dim]."
        )
    h = obs
    names = _layers(params)
    for i, name in enumerate(names):
        h = _linear(h, params[f"{name}.weight"], params[f"{name}.bias"], batched)
        if i < len(names) - 1:
            h = torch.relu(h)
    return h


def _log_std(params: Params, like: Tensor) -> Tensor:
    """``log_std`` broadcastable against ``like`` ``[tasks, ..., act]`` for batched params."""
    ls = params["log_std"]
    if is_batched(params):  # [tasks, act] -> [tasks, 1, ..., 1, act]
        ls = ls.reshape(ls.shape[0], *([1] * (like.ndim - 2)), ls.shape[-1])
    return ls


def gaussian_log_prob(params: Params, obs: Tensor, actions: Tensor) -> Tensor:
    r""":math:`\log \pi_\theta(a \mid s)`, summed over action dimensions: shape ``obs.shape[:-1]``."""
    mean = gaussian_mean(params, obs)
    if actions.shape != mean.shape:
        raise ValueError(
            f"metagrad.rl.gaussian_log_prob: actions have shape {tuple(actions.shape)} but the "
            f"policy's means have {tuple(mean.shape)} (observations {tuple(obs.shape)})."
        )
    return normal_log_prob(mean, _log_std(params, mean), actions)


def normal_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """Diagonal-Gaussian log-density of ``actions``, summed over the last dimension."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * _LOG_2PI).sum(-1)


def gaussian_sample(params: Params, obs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Actions drawn from the policy at ``obs`` (no graph: sampling is not differentiated)."""
    with torch.no_grad():
        mean = gaussian_mean(params, obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(_log_std(params, mean)) * noise


def gaussian_kl(old_mean: Tensor, old_log_std: Tensor, params: Params, obs: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(\pi_{\mathrm{old}}(\cdot \mid s) \,\|\, \pi_\theta(\cdot \mid s))` per
    state (summed over action dimensions), differentiable in ``params``.

    ``old_mean`` is ``[..., act]`` and ``old_log_std`` broadcastable to it (both detached).
    """
    mean = gaussian_mean(params, obs)
    log_std = _log_std(params, mean)
    var_ratio = torch.exp(2 * (old_log_std - log_std))
    diff = (old_mean - mean) * torch.exp(-log_std)
    return 0.5 * (var_ratio + diff.square() - 1.0).sum(-1) + (log_std - old_log_std).sum(-1)


def expand_params(params: Params, tasks: int) -> Params:
    """One view of ``params`` per task (``[tasks, ...]``), still a function of ``params``.

    The gradient of a sum of per-task objectives with respect to these views is the stack of
    per-task gradients, which is how one backward pass adapts every task at once.
    """
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}
