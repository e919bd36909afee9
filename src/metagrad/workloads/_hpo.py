r"""Hyperparameter optimization: per-layer learning rates and weight decays by hypergradients.

The inner problem trains the MLP for ``K`` full-batch steps of SGD with momentum, layer
:math:`l` with learning rate :math:`e^{a_l}` and weight decay :math:`e^{b_l}`:

.. math::
    f(w, h) = \mathrm{CE}(w; \text{train}) + \tfrac12 \sum_l e^{b_l} \lVert W_l \rVert^2,
    \qquad
    G(h) = \mathrm{CE}(w_K(h); \text{val}),

and hypergradient descent (Adam on :math:`h = (a, b)`, log-scale so rates stay positive)
follows :math:`dG/dh` from :func:`metagrad.bilevel.hypergrad`, one training run per step. Grid
search gets the same number of training runs over one shared learning rate and weight decay.
Both keep the run with the lowest validation loss (the objective both minimize), whose test
accuracy is reported.

References:
    Maclaurin, Duvenaud, Adams. Gradient-based Hyperparameter Optimization through Reversible
    Learning. ICML 2015. Franceschi et al. Forward and Reverse Gradient-Based Hyperparameter
    Optimization. ICML 2017.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import bilevel, optim
from metagrad._typing import Params
from metagrad.workloads._data import Split
from metagrad.workloads._model import accuracy, forward, init_mlp, layer_of, n_layers
from metagrad.workloads._stepper import Stepper

_FN = "metagrad.workloads.tune_hyperparameters"
_KINDS = ("lr", "wd")


@dataclass(frozen=True)
class HPOConfig:
    """Settings of one hyperparameter-optimization run (both methods).

    Args:
        hidden: hidden layer widths of the MLP.
        inner_steps: full-batch SGD steps of one training run (``K``).
        momentum: SGD momentum of the inner optimizer (a constant).
        init_lr, init_wd: where hypergradient descent starts (every layer).
        tune: which per-layer hyperparameters hypergradient descent learns (``"lr"``, ``"wd"``).
        hyper_lr: Adam step size on the log-hyperparameters.
        max_lr: learning rates are clipped to at most this (a run that diverges is wasted).
        grid_lr, grid_wd: the grid; both methods get ``len(grid_lr) * len(grid_wd)`` runs.
        strategy: the :func:`metagrad.bilevel.hypergrad` strategy.
    """

    hidden: tuple[int, ...] = (64, 64)
    inner_steps: int = 100
    momentum: float = 0.9
    init_lr: float = 0.1
    init_wd: float = 1e-4
    tune: tuple[str, ...] = _KINDS
    hyper_lr: float = 0.1
    max_lr: float = 2.0
    grid_lr: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    grid_wd: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    strategy: str = "auto"

    @property
    def runs(self) -> int:
        """Training runs each method gets: the size of the grid."""
        return len(self.grid_lr) * len(self.grid_wd)


@dataclass
class Run:
    """One training run: its hyperparameters and the trained model's scores."""

    lr: list[float]
    wd: list[float]
    val_loss: float
    val_accuracy: float
    test_accuracy: float


@dataclass
class HPOResult:
    """Every run of one method, and the one it selects (lowest validation loss)."""

    method: str
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: (_finite(r.val_loss), -r.val_accuracy))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "best": asdict(self.best),
            "runs": [asdict(r) for r in self.runs],
        }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def check_config(config: HPOConfig, train: Split, val: Split, fn: str = _FN) -> None:
    """Raise a ValueError naming ``fn`` for settings that cannot give a hypergradient."""
    unknown = [t for t in config.tune if t not in _KINDS]
    if unknown or not config.tune:
        raise ValueError(
            f"{fn}: tune={config.tune!r} must name at least one of {_KINDS} (per-layer "
            f"learning rates and weight decays); {unknown or 'nothing'} cannot be tuned here."
        )
    if config.inner_steps < 1:
        raise ValueError(
            f"{fn}: inner_steps={config.inner_steps!r}: the learning rates and weight decays act "
            f"on the weights only through training steps, so with no step they cannot reach the "
            f"validation loss and have no hypergradient. Use inner_steps >= 1 (e.g. 100)."
        )
    if not (config.grid_lr and config.grid_wd):
        raise ValueError(
            f"{fn}: grid_lr={config.grid_lr!r}, grid_wd={config.grid_wd!r}: the grid sets the "
            f"number of training runs of both methods and must not be empty."
        )
    bad = [v for v in (config.init_lr, config.init_wd, *config.grid_lr, *config.grid_wd) if v <= 0]
    if bad:
        raise ValueError(
            f"{fn}: learning rates and weight decays must be > 0 (they are tuned on a log scale), "
            f"got {bad}; use e.g. 1e-5 instead of 0."
        )
    for name, split in (("train", train), ("val", val)):
        if len(split.y) == 0:
            raise ValueError(f"{fn}: the {name} split is empty; give it at least one example.")


def hpo_problem(config: HPOConfig, fn: str = _FN) -> bilevel.Problem:
    """The bilevel problem: train loss + per-layer decay inside, validation loss outside.

    ``h = {"log_lr": [L], "log_wd": [L]}``; ``prepare`` turns it into per-layer rates and decays
    (``exp``, one tensor per layer) once per hypergradient, not at every inner step.
    """

    def rates(h: dict[str, Tensor]) -> dict[str, tuple[Tensor, ...]]:
        return {"lr": h["log_lr"].exp().unbind(), "wd": h["log_wd"].exp().unbind()}

    def train_loss(w: Params, h: dict[str, Any], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        decay = sum(
            h["wd"][layer_of(k)] * (v**2).sum() for k, v in w.items() if k.endswith(".weight")
        )
        return F.cross_entropy(forward(w, x), y) + 0.5 * decay

    def val_loss(w: Params, h: dict[str, Any], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(forward(w, x), y)

    def lr(h: dict[str, Any], step: int, name: str) -> Tensor:
        return h["lr"][layer_of(name)]

    return bilevel.Problem(
        train_loss,
        val_loss,
        optim.SGD(lr=1.0, momentum=config.momentum),  # lr: replaced by the rule above
        config.inner_steps,
        lr=lr,
        check_finite=False,  # a diverged run is a result (a wasted run), not an error
        name=fn,
        inner_name="training loss",
        outer_name="validation loss",
        prepare=rates,
    )


def _score(w: Params | None, value: Tensor, h: dict[str, Tensor], val: Split, test: Split) -> Run:
    finite = (
        w is not None
        and bool(torch.isfinite(value))
        and all(bool(torch.isfinite(v).all()) for v in w.values())
    )
    return Run(
        lr=[float(v) for v in torch.exp(h["log_lr"].detach())],
        wd=[float(v) for v in torch.exp(h["log_wd"].detach())],
        val_loss=float(value) if finite else math.inf,
        val_accuracy=accuracy(w, val.x, val.y) if finite and w is not None else 0.0,
        test_accuracy=accuracy(w, test.x, test.y) if finite and w is not None else 0.0,
    )


def tune_hyperparameters(
    train: Split, val: Split, test: Split, config: HPOConfig = HPOConfig(), *, seed: int = 0
) -> HPOResult:
    r"""Hypergradient descent on per-layer learning rates and weight decays.

    .. math::
        h_{t+1} = \mathrm{Adam}\bigl(h_t, \nabla_h G(h_t)\bigr),\qquad
        G(h) = \mathrm{CE}_{val}(w_K(h))

    Args:
        train, val, test: the splits (inputs ``[N, D]``, labels ``[N]``).
        config: :class:`HPOConfig`; ``config.runs`` training runs (one hypergradient each).
        seed: the MLP's initialization (the same for every run).

    Returns:
        :class:`HPOResult` with every run; ``.best`` is the selected one.

    Raises:
        ValueError: settings under which the hyperparameters cannot reach the validation loss
            (``inner_steps=0``, nothing to tune), empty splits.

    Example:
        >>> import torch
        >>> from metagrad.workloads import HPOConfig, Split, tune_hyperparameters
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(60, 4, generator=g), torch.arange(60) % 3
        >>> cfg = HPOConfig(hidden=(8,), inner_steps=5, grid_lr=(0.1,), grid_wd=(1e-4, 1e-3))
        >>> res = tune_hyperparameters(Split(x, y), Split(x, y), Split(x, y), cfg)
        >>> len(res.runs)
        2
    """
    check_config(config, train, val)
    n_out = int(torch.cat([train.y, val.y]).max()) + 1
    w0 = init_mlp((train.x.shape[1], *config.hidden, n_out), seed=seed, dtype=train.x.dtype)
    L = n_layers(w0)
    pb = hpo_problem(config)
    max_log_lr = math.log(config.max_lr)
    log_lr = torch.full((L,), math.log(config.init_lr), dtype=train.x.dtype)
    log_wd = torch.full((L,), math.log(config.init_wd), dtype=train.x.dtype)
    h = {
        "log_lr": log_lr.requires_grad_("lr" in config.tune),
        "log_wd": log_wd.requires_grad_("wd" in config.tune),
    }
    tuned = {k: v for k, v in h.items() if v.requires_grad}
    opt = Stepper(optim.Adam(lr=config.hyper_lr), tuned)
    out = HPOResult("hypergradient")
    last_good = {k: v.detach().clone() for k, v in h.items()}
    for _ in range(config.runs):
        res = bilevel.hypergrad(
            pb, w0, h, (train.x, train.y), (val.x, val.y), strategy=config.strategy
        )
        run = _score(res.w, res.value, h, val, test)
        out.runs.append(run)
        grads = {k: res.grads.h[k] for k in tuned}
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        if not math.isfinite(run.val_loss) or not finite:
            # Diverged: back to the last finite point with half the step size.
            with torch.no_grad():
                for k, v in h.items():
                    v.copy_(last_good[k])
            opt.scale_lr(0.5)
            continue
        last_good = {k: v.detach().clone() for k, v in h.items()}
        opt.step(grads)
        with torch.no_grad():
            h["log_lr"].clamp_(max=max_log_lr)
    return out


def grid_search(
    train: Split, val: Split, test: Split, config: HPOConfig = HPOConfig(), *, seed: int = 0
) -> HPOResult:
    """Every (learning rate, weight decay) of the grid, shared by all layers: ``config.runs`` runs.

    Same model, initialization, inner loop and selection rule as :func:`tune_hyperparameters`.
    """
    check_config(config, train, val, fn="metagrad.workloads.grid_search")
    n_out = int(torch.cat([train.y, val.y]).max()) + 1
    w0 = init_mlp((train.x.shape[1], *config.hidden, n_out), seed=seed, dtype=train.x.dtype)
    L = n_layers(w0)
    pb = hpo_problem(config, fn="metagrad.workloads.grid_search")
    out = HPOResult("grid")
    for lr in config.grid_lr:
        for wd in config.grid_wd:
            h = {
                "log_lr": torch.full((L,), math.log(lr), dtype=train.x.dtype),
                "log_wd": torch.full((L,), math.log(wd), dtype=train.x.dtype),
            }
            res = bilevel.hypergrad(pb, w0, h, (train.x, train.y), (val.x, val.y), need_grad=False)
            out.runs.append(_score(res.w, res.value, h, val, test))
    return out
