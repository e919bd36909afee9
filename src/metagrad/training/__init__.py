"""Meta-training and evaluation: configs and presets, the trainer, checkpoints, plots.

* :class:`TrainConfig`, :func:`preset` (``sinusoid``, ``sinusoid-quick``, ``sinusoid-multistep``,
  ``omniglot-5w1s``, ``omniglot-20w1s``, ``folder``), :func:`read_config_file`.
* :class:`Trainer`: Adam meta-optimizer, cosine schedule, clipping, validation, ``metrics.csv``,
  atomic checkpoints with exact resume; :class:`Callback` hooks for experiment trackers; :meth:`Trainer.from_checkpoint` for evaluation.
* :func:`evaluate` / :func:`mean_ci95`: mean and 95% CI over test tasks after 0..N steps.
* :func:`plot_sinusoid_fits`, :func:`plot_learning_curves` (need ``metagrad[viz]``).

The CLI glue (``metagrad train`` / ``metagrad eval``) is in ``metagrad.training._cli``.
"""

from __future__ import annotations

from metagrad.training._callbacks import Callback
from metagrad.training._checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metagrad.training._config import (
    ALGORITHMS,
    PAPER,
    PRESETS,
    ConfigError,
    TrainConfig,
    preset,
    read_config_file,
)
from metagrad.training._evaluate import EvalResult, EvalRow, evaluate, format_table, mean_ci95
from metagrad.training._plots import plot_learning_curves, plot_sinusoid_fits
from metagrad.training._trainer import Trainer

__all__ = [
    "ALGORITHMS",
    "PAPER",
    "PRESETS",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "EvalResult",
    "EvalRow",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "format_table",
    "load_checkpoint",
    "mean_ci95",
    "plot_learning_curves",
    "plot_sinusoid_fits",
    "preset",
    "read_config_file",
    "save_checkpoint",
]
