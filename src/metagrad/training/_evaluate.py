r"""Few-shot evaluation: mean and 95% confidence interval over many tasks after 0..N steps.

.. math:: \bar m \pm 1.96\,\sigma / \sqrt{n}

with :math:`\sigma` the standard deviation over tasks (``numpy.std``), as the MAML reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from metagrad._errors import NonFiniteError
from metagrad.algorithms._base import Learner


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval ``1.96 * std / sqrt(n)``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_ci95: no values.")
    return float(arr.mean()), float(1.96 * arr.std() / math.sqrt(arr.size))


@dataclass
class EvalRow:
    """Query metrics after ``steps`` inner steps, averaged over tasks."""

    steps: int
    loss: float
    loss_ci95: float
    accuracy: float | None = None
    accuracy_ci95: float | None = None
    diverged: int = 0


@dataclass
class EvalResult:
    """One evaluation: its setting and a row per step count."""

    tasks: int
    shots: int
    queries: int
    metric: str
    rows: list[EvalRow] = field(default_factory=list)
    # the classes the tasks came from; results.json omits the default "test" (older files)
    split: str = "test"
    # each task's query loss per step count, in task order (not part of to_dict)
    task_losses: dict[int, list[float]] = field(default_factory=dict, repr=False, compare=False)

    def row(self, steps: int) -> EvalRow:
        for r in self.rows:
            if r.steps == steps:
                return r
        raise KeyError(f"no evaluation after {steps} steps (have {[r.steps for r in self.rows]}).")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("task_losses")
        if out["split"] == "test":
            out.pop("split")
        return out


def evaluate(
    learner: Learner,
    sampler: Any,
    *,
    tasks: int = 600,
    steps: Sequence[int] = (0, 1, 5, 10),
    batch: int = 25,
    classification: bool = False,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Adapt to each of ``tasks`` fresh tasks and score the query set after each step count.

    Args:
        learner: any metagrad learner (its :meth:`adapt` and :meth:`predict` are used).
        sampler: a task sampler (its generator advances).
        tasks: number of tasks (600 as in the MAML paper).
        steps: inner step counts to score (0 = the meta-learned initialisation).
        batch: tasks drawn per ``sampler.sample`` call.
        classification: also report accuracy (the loss is then cross-entropy).

    Returns:
        :class:`EvalResult` with mean and 95% CI of the loss (and accuracy) per step count,
        over all tasks (none is dropped). ``EvalRow.diverged`` counts the tasks whose inner
        loop diverged within that many steps: the *support* loss (the objective the inner
        loop descends) after the steps is NaN/Inf or higher than before adaptation. Such a
        step size is past the task's stability limit; a NaN/Inf makes the row's mean NaN.
        ``EvalResult.task_losses`` holds each task's query loss per step count, in task order.
    """
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks <= 0:
        raise ValueError(f"metagrad.training.evaluate: tasks={tasks!r} must be an int > 0.")
    steps = sorted({int(s) for s in steps})
    losses: dict[int, list[float]] = {s: [] for s in steps}
    accs: dict[int, list[float]] = {s: [] for s in steps}
    diverged = dict.fromkeys(steps, 0)
    was_training = learner.training
    learner.eval()
    shots = queries = 0
    try:
        done = 0
        while done < tasks:
            n = min(batch, tasks - done)
            xs, ys, xq, yq = (t.to(device) for t in sampler.sample(n))
            shots, queries = xs.shape[1], xq.shape[1]
            for i in range(n):
                init = learner.adapt(xs[i], ys[i], steps=0)
                with torch.no_grad():  # support loss before adaptation
                    start = float(learner.loss_fn(learner.predict(init, xs[i]), ys[i]))
                for s in steps:
                    try:
                        params = learner.adapt(xs[i], ys[i], steps=s)
                    except NonFiniteError:
                        # The inner loop diverged (e.g. Meta-SGD rates run past their steps):
                        # counted, and the mean becomes NaN rather than hiding the task.
                        losses[s].append(math.nan)
                        accs[s].append(math.nan)
                        diverged[s] += 1
                        continue
                    with torch.no_grad():
                        pred = learner.predict(params, xq[i])
                        losses[s].append(float(learner.loss_fn(pred, yq[i])))
                        if classification:
                            accs[s].append(float((pred.argmax(-1) == yq[i]).float().mean()))
                        fit = float(learner.loss_fn(learner.predict(params, xs[i]), ys[i]))
                        diverged[s] += s > 0 and not fit <= start  # NaN counts too
            done += n
    finally:
        learner.train(was_training)
    if classification:
        shots //= max(int(ys.max()) + 1, 1)
        queries //= max(int(ys.max()) + 1, 1)
    result = EvalResult(tasks, shots, queries, "accuracy" if classification else "mse")
    for s in steps:
        row = EvalRow(s, *mean_ci95(losses[s]), diverged=diverged[s])
        if classification:
            row.accuracy, row.accuracy_ci95 = mean_ci95(accs[s])
        result.rows.append(row)
    result.task_losses = {s: list(losses[s]) for s in steps}
    return result


def format_table(result: EvalResult, paper: dict[str, Any] | None = None) -> str:
    """A plain-text table of ``result``, with the paper's numbers beside it when given."""
    cls = result.metric == "accuracy"
    head = "query accuracy (95% CI)" if cls else "query MSE (95% CI)"
    lines = [
        f"{result.tasks} task{'s' if result.tasks != 1 else ''}, {result.shots}-shot, "
        f"{result.queries} queries" + (" per class" if cls else ""),
        f"{'steps':>5}  {head:<26}" + ("  paper" if paper else ""),
    ]
    few = result.tasks < 2  # one task has no spread: a CI of 0 would claim certainty
    for r in result.rows:
        if cls and r.accuracy is not None and r.accuracy_ci95 is not None:
            ci = "n/a" if few else f"{100 * r.accuracy_ci95:.2f}%"
            cell = f"{100 * r.accuracy:6.2f}% +- {ci}"
        else:
            cell = f"{r.loss:8.4f} +- {'n/a' if few else f'{r.loss_ci95:.4f}'}"
        ref = ""
        if paper and r.steps in paper["values"]:
            v = paper["values"][r.steps]
            ref = f"{100 * v:.1f}%" if cls else f"{v:.2f}"
            if "ci95" in paper:
                ref += f" +- {100 * paper['ci95']:.1f}%" if cls else f" +- {paper['ci95']}"
        tail = f"  ({r.diverged}/{result.tasks} tasks diverged)" if r.diverged else ""
        if r.diverged and not math.isfinite(r.loss):
            cell, tail = f"diverged in {r.diverged}/{result.tasks} tasks", ""
        lines.append(f"{r.steps:>5}  {cell:<26}" + (f"  {ref:<8}" if paper else "") + tail)
    if few:
        lines.append("(95% CI n/a: it needs at least 2 tasks)")
    return "\n".join(line.rstrip() for line in lines)
