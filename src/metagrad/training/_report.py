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
        "environment": environment(),
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
    if result.task_losses:
        write_task_losses(p.with_name(TASK_LOSSES), result)
    return p


# Each test task's query loss per step count, next to results.json: a re-evaluation of the
# checkpoint on the first N tasks (same seed) can be checked task by task against it.
TASK_LOSSES = "test_losses.csv"


def write_task_losses(path: Path, result: EvalResult) -> Path:
    """``task,loss_<steps>...`` rows, one per test task in evaluation order (repr floats)."""
    steps = sorted(result.task_losses)
    lines = [",".join(["task", *(f"loss_{s}" for s in steps)])]
    n = len(result.task_losses[steps[0]])
    lines += [
        ",".join([str(i), *(repr(result.task_losses[s][i]) for s in steps)]) for i in range(n)
    ]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def environment() -> dict[str, Any]:
    """Machine and versions of this run: Python, torch, numpy, CPU, threads, load average."""
    import platform

    import numpy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover - Windows
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15min": load,
    }


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
