"""Hooks for experiment trackers (Weights & Biases, MLflow, ...); TensorBoard is built in.

Subclass :class:`Callback`, override what you need and pass instances to
``Trainer(..., callbacks=[...])``. Every hook is a no-op by default.

Example:
    >>> from metagrad.training import Callback, Trainer, preset
    >>> class Rows(Callback):
    ...     def __init__(self):
    ...         self.rows = []
    ...
    ...     def on_log(self, trainer, row):
    ...         self.rows.append(row)
    >>> rows = Rows()
    >>> cfg = preset("sinusoid").replace(iterations=2, meta_batch=2, log_every=1, val_tasks=2)
    >>> Trainer(cfg, progress=False, callbacks=[rows]).train()
    2
    >>> [r["iteration"] for r in rows.rows]
    [1, 2]
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Receives the trainer's log rows, validations and the end of training."""

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        """One ``metrics.csv`` row (a copy): ``iteration``, ``train_loss``, ``val_loss``...

        Keys absent from the row were not measured at this iteration; values may be None.
        """

    def on_validation(self, trainer: Any, result: Any) -> None:
        """The :class:`~metagrad.training.EvalResult` of one validation."""

    def on_train_end(self, trainer: Any) -> None:
        """Training reached its last iteration (not called when it stops by Ctrl-C or error)."""
