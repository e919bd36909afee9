"""What a finished run leaves behind: ``results.json``, plots, the table beside the paper."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import metagrad
from metagrad.tasks import SinusoidTasks, derive_seed
from metagrad.training._config import PAPER, TrainConfig
from metagrad.training._evaluate import EvalResult

_log = logging.getLogger("metagrad")


def paper_reference(cfg: TrainConfig, result: EvalResult | None = None) -> dict[str, Any] | None:
    """The MAML paper's numbers for the same setting, or None."""
    shots = result.shots if result is not None else (cfg.eval_shots or cfg.shots)
    if cfg.task == "sinusoid" and shots == PAPER["sinusoid"]["shots"]:
        return PAPER["sinusoid"]
    if cfg.task == "omniglot" and shots == 1 and cfg.n_way in (5, 20):
        return PAPER[f"omniglot-{cfg.n_way}w1s"]
    return None


def write_results(
    path: str | os.PathLike[str],
    cfg: TrainConfig,
    result: EvalResult,
    *,
    iteration: int,
    train_time_s: float | None,
    eval_time_s: float,
    config_changes: list[dict[str, Any]] | None = None,
) -> Path:
    """``results.json``: settings, the final evaluation table, timings and the paper's numbers.

    ``config_changes``: settings changed on resume (``--allow-config-change``), with the
    iteration each took effect; stored only when there were any.
    """
    out = {
        "metagrad_version": metagrad.__version__,
        "algorithm": cfg.algorithm,
        "task": cfg.task,
        "iterations": iteration,
        "train_time_s": train_time_s,
        "eval_time_s": eval_time_s,
        "test": result.to_dict(),
        "paper": paper_reference(cfg, result),
        "config": cfg.to_dict(),
    }
    if config_changes:
        out["config_changes"] = config_changes
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)
    return p


def make_plots(trainer: Any, folder: Path) -> list[Path]:
    """Learning curves and (sinusoid) the Figure 2 fits; the files written.

    Raises ImportError without matplotlib. Any other failure of one plot is a warning (logger
    ``"metagrad"``) naming the plot: a finished, saved run never fails over a picture.
    """
    from metagrad.training._plots import _pyplot

    _pyplot()  # ImportError (which extra to install) before anything else
    made = []
    for name, draw in (("learning_curves.png", _curves), ("sinusoid_fits.png", _fits)):
        try:
            path = draw(trainer, folder, folder / name)
        except Exception as err:  # a picture must not undo a saved run
            _log.warning("%s skipped: %s: %s", name, type(err).__name__, " ".join(str(err).split()))
            continue
        if path is not None:
            made.append(path)
    return made


def _curves(trainer: Any, folder: Path, out: Path) -> Path | None:
    from metagrad.training._plots import plot_learning_curves

    if not (folder / "metrics.csv").exists():
        return None
    log = trainer.cfg.task == "sinusoid"
    return plot_learning_curves(folder / "metrics.csv", out, log_scale=log)


def _fits(trainer: Any, folder: Path, out: Path) -> Path | None:
    from metagrad.training._plots import plot_sinusoid_fits

    if trainer.cfg.task == "sinusoid":
        shots = trainer.cfg.eval_shots or trainer.cfg.shots
        tasks = SinusoidTasks(shots, seed=derive_seed(trainer.cfg.seed, 4))
        # Figure 2 shows 1 and 10 steps; never more steps than the run is evaluated with
        # (Meta-SGD's learned rates are tuned for its training steps and can diverge beyond).
        top = max(trainer.cfg.test_steps)
        steps = sorted({s for s in (1, 10) if s <= top} | ({top} if top > 0 else set()))
        return plot_sinusoid_fits(trainer.learner, tasks, out, steps=steps)
    return None
