"""Bilevel workloads on real data: hyperparameter optimization, learning to reweight examples,
dataset distillation, each built on :func:`metagrad.bilevel.hypergrad`.

The data is scikit-learn's 8x8 digits (``pip install metagrad[workloads]``); every function
also takes any ``Split(x, y)`` of tensors. The runnable scripts are ``examples/hpo.py``,
``examples/reweight.py`` and ``examples/distill.py``; their results are in ``results/digits-*``.
"""

from __future__ import annotations

from metagrad.workloads._data import Digits, Split, load_digits, stratified_split, symmetric_noise
from metagrad.workloads._distill import (
    DistillConfig,
    Distilled,
    distill,
    distill_problem,
    evaluate_distilled,
    save_image_grid,
    train_on,
)
from metagrad.workloads._hpo import (
    HPOConfig,
    HPOResult,
    Run,
    grid_search,
    hpo_problem,
    tune_hyperparameters,
)
from metagrad.workloads._model import MLP, accuracy, forward, init_mlp
from metagrad.workloads._record import accuracy_row, machine, mean_ci95, quote, write_results
from metagrad.workloads._reweight import (
    ReweightConfig,
    example_weights,
    lookahead_problem,
    train_plain,
    train_reweighted,
)

__all__ = [
    "MLP",
    "Digits",
    "DistillConfig",
    "Distilled",
    "HPOConfig",
    "HPOResult",
    "ReweightConfig",
    "Run",
    "Split",
    "accuracy",
    "accuracy_row",
    "distill",
    "distill_problem",
    "evaluate_distilled",
    "example_weights",
    "forward",
    "grid_search",
    "hpo_problem",
    "init_mlp",
    "load_digits",
    "lookahead_problem",
    "machine",
    "mean_ci95",
    "quote",
    "save_image_grid",
    "stratified_split",
    "symmetric_noise",
    "train_on",
    "train_plain",
    "train_reweighted",
    "tune_hyperparameters",
    "write_results",
]
