"""``metagrad compare``: finished runs side by side, as one Markdown table.

Reads each run's ``results.json`` (written by ``metagrad train`` and ``metagrad eval --output``)
and prints one row per run: algorithm, meta-iterations, training wall time, the test metric
(mean and 95% CI over the run's test tasks) after each inner-step count, and the number the
algorithm's own paper reports for the same setting (:data:`metagrad.training.PAPER_NUMBERS`).
The cells are formatted exactly as the README quotes them, so a table can be pasted and the
README test ties it to the files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metagrad.training._config import ConfigError
from metagrad.training._papers import PaperNumber, paper_number, setting_name

RESULTS = "results.json"


@dataclass(frozen=True)
class RunSummary:
    """What one ``results.json`` says about a finished run.

    ``rows`` maps an inner-step count to ``(mean, ci95)`` of the test metric: accuracy as a
    fraction for classification, query MSE for regression. ``train_time_s`` is None for a run
    evaluated from a checkpoint without its training record.
    """

    name: str
    path: Path
    algorithm: str
    setting: str | None
    metric: str
    iterations: int | None
    train_time_s: float | None
    tasks: int
    rows: dict[int, tuple[float, float]]
    threads: int | None
    split: str = "test"  # whose classes the tasks came from (``metagrad eval --eval-split``)


def load_run(path: str | os.PathLike[str]) -> RunSummary:
    """The :class:`RunSummary` of a run folder or of its ``results.json``.

    Raises:
        ConfigError: the path has no ``results.json``, or the file is not one ``metagrad``
            wrote (the message names the path and what to pass instead).
    """
    p = Path(path)
    file = p / RESULTS if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(
            f"{str(path)!r} has no {RESULTS}; pass a run folder written by "
            f"`metagrad train` (or by `metagrad eval --output DIR`)."
        )
    try:
        run: dict[str, Any] = json.loads(file.read_text())
        test, cfg = run["test"], run["config"]
        metric = str(test["metric"])
        key = "accuracy" if metric == "accuracy" else "loss"
        rows = {int(r["steps"]): (float(r[key]), float(r[f"{key}_ci95"])) for r in test["rows"]}
        env = run.get("environment") or {}
        summary = RunSummary(
            name=file.parent.name, path=file, algorithm=str(run["algorithm"]),
            setting=setting_name(cfg, int(test["shots"])), metric=metric,
            iterations=run.get("iterations"), train_time_s=run.get("train_time_s"),
            tasks=int(test["tasks"]), rows=rows, threads=env.get("torch_threads"),
            split=str(test.get("split", "test")),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{str(file)!r} is not a metagrad results.json ({err!r}); pass a "
            f"run folder written by `metagrad train`."
        ) from None
    return summary


def cell(metric: str, mean: float, ci95: float) -> str:
    """One table cell as the README prints it: ``97.94% ± 0.29%`` or ``0.642 ± 0.058``."""
    if metric == "accuracy":
        return f"{100 * mean:.2f}% ± {100 * ci95:.2f}%"
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.3f} ± {ci95:.3f}"


def _paper_cell(metric: str, paper: PaperNumber | None) -> str:
    return "" if paper is None else paper.text(metric == "accuracy")


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.1f} min"


def compare_table(runs: Sequence[RunSummary], steps: Sequence[int] | None = None) -> str:
    """A Markdown table of ``runs``, one row each, columns for the inner-step counts ``steps``.

    ``steps`` defaults to every step count any run scored. A run that did not score a column's
    step count shows an empty cell. All runs must report the same metric.

    Raises:
        ConfigError: no runs, or runs with different metrics (accuracy vs MSE).
    """
    if not runs:
        raise ConfigError("no runs given; pass one or more run folders.")
    metrics = {r.metric for r in runs}
    if len(metrics) > 1:
        which = ", ".join(f"{r.name} ({r.metric})" for r in runs)
        raise ConfigError(
            f"the runs report different metrics ({which}); compare runs of "
            f"one kind of task (classification or regression) at a time."
        )
    metric = metrics.pop()
    cols = sorted({s for r in runs for s in r.rows}) if steps is None else list(steps)
    name = "accuracy" if metric == "accuracy" else "query MSE"
    head = ["run", "algorithm", "iterations", "train time", "threads"]
    head += [f"{name}, {s} step{'s' if s != 1 else ''}" for s in cols]
    head += ["its paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in runs:
        paper = paper_number(r.algorithm, r.setting)
        name = r.name if r.split == "test" else f"{r.name} ({r.split} classes)"
        cells = [name, r.algorithm, "" if r.iterations is None else f"{r.iterations:,}"]
        cells += [_minutes(r.train_time_s), "" if r.threads is None else str(r.threads)]
        cells += [cell(metric, *r.rows[s]) if s in r.rows else "" for s in cols]
        cells.append(_paper_cell(metric, paper))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
