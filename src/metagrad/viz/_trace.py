"""Inner-loop traces: per task and inner step, losses, gradient norm and step size; CSV and plot."""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metagrad._typing import Params
from metagrad.algorithms._base import UnrolledLearner, check_steps
from metagrad.algorithms._task import InnerSpec, TaskHyper, TaskLoss, run_task, split, task_problem
from metagrad.bilevel._inner import AutogradBackend, GradBackend
from metagrad.bilevel._problem import Problem
from metagrad.functional._checks import check_tasks

__all__ = ["TRACE_KEYS", "inner_trace", "plot_trace", "write_trace_csv"]

TRACE_KEYS = (
    "task",
    "step",
    "support_loss",
    "query_loss",
    "grad_norm",
    "step_size",
    "update_norm",
)
"""Columns of a trace row (see :func:`inner_trace`)."""

_FN = "metagrad.viz.inner_trace"


def _mean_rate(rate: float | Tensor) -> float:
    if isinstance(rate, Tensor):
        return float(rate.detach().float().mean())
    return float(rate)


class _RecordingBackend:
    """The engine's autograd backend, keeping each step's iterate, support loss and gradient."""

    def __init__(self, inner: GradBackend) -> None:
        self.inner = inner
        self.records: list[tuple[Params, Tensor, Params]] = []

    def __call__(
        self, f: Callable[[Params], Tensor], w: Params, step: int
    ) -> tuple[Params, Tensor]:
        grads, loss = self.inner(f, w, step)
        self.records.append(({n: v.detach() for n, v in w.items()}, loss.detach(), grads))
        return grads, loss


def _support_at(
    problem: Problem, h: TaskHyper, support: tuple[Tensor, Tensor], step: int, w: Params
) -> Tensor:
    return problem.call_inner(w, h, support, step)


def _rows(
    task: int,
    records: list[tuple[Params, Tensor, Params]],
    spec: InnerSpec,
    extra: Params,
    objective: TaskLoss,
    h: TaskHyper,
    query: tuple[Tensor, Tensor],
) -> list[dict[str, Any]]:
    """One row per recorded state ``t_k`` (the last record is the adapted parameters)."""
    rows = []
    steps = len(records) - 1
    for k, (w, loss, grads) in enumerate(records):
        with torch.no_grad():
            query_loss = float(objective(w, h, query, k))
        row: dict[str, Any] = {
            "task": task,
            "step": k,
            "support_loss": float(loss),
            "query_loss": query_loss,
            "grad_norm": math.sqrt(sum(float(g.detach().pow(2).sum()) for g in grads.values())),
            "step_size": math.nan,
            "update_norm": math.nan,
        }
        if k < steps:
            rates = [_mean_rate(spec.lr_rule(extra, k, n)) for n in w]
            row["step_size"] = sum(rates) / max(len(rates), 1)
            nxt = records[k + 1][0]
            row["update_norm"] = math.sqrt(sum(float((nxt[n] - w[n]).pow(2).sum()) for n in w))
        rows.append(row)
    return rows


def inner_trace(
    learner: UnrolledLearner,
    xs: Tensor,
    ys: Tensor,
    xq: Tensor,
    yq: Tensor,
    steps: int | None = None,
) -> list[dict[str, Any]]:
    r"""Record the learner's inner loop on each task: one row per task and state :math:`t_k`.

    The loop is the learner's own, run by the engine exactly as :meth:`learner.adapt` runs it
    (its inner optimizer, adapted parameters, learning-rate rule, per-step parameters and
    buffers, so Meta-SGD / MAML++ learned rates are reported), with a gradient backend that
    records each step; no meta-graph is kept.

    Row ``k`` (``k = 0 .. steps``) describes the parameters after ``k`` inner steps:
    ``support_loss`` and ``query_loss`` at :math:`t_k`, ``grad_norm`` :math:`\|\nabla L_s(t_k)\|`
    (over adapted parameters), ``step_size`` the rate the rule gives for step ``k`` (mean over
    parameters and elements for learned rates; ``nan`` on the last row, where no step is taken)
    and ``update_norm`` :math:`\|t_{k+1} - t_k\|` (``nan`` on the last row).

    Args:
        learner: A metagrad learner such as :class:`metagrad.algorithms.MAML`.
        xs: Support inputs ``[T, K, ...]``; ys: support targets ``[T, K, ...]``.
        xq: Query inputs ``[T, Q, ...]``; yq: query targets ``[T, Q, ...]``.
        steps: Inner steps (default: the learner's evaluation step count).

    Returns:
        ``T * (steps + 1)`` dicts with keys :data:`TRACE_KEYS`.

    Raises:
        TypeError: ``learner`` is not a metagrad learner.
        ValueError: Malformed tasks or ``steps``.

    Example:
        >>> import torch
        >>> from metagrad.algorithms import MAML
        >>> from metagrad.viz import inner_trace
        >>> learner = MAML(torch.nn.Linear(1, 1), torch.nn.functional.mse_loss, 0.1, 2)
        >>> x = torch.randn(3, 5, 1)
        >>> len(inner_trace(learner, x, 2 * x, x, 2 * x))
        9
    """
    if not isinstance(learner, UnrolledLearner):
        raise TypeError(
            f"{_FN}: learner must be a metagrad learner such as metagrad.algorithms.MAML, got "
            f"{type(learner).__name__}."
        )
    fm = learner.fmodel
    first = next(iter(fm.params().values()))
    xs, ys, xq, yq = check_tasks(_FN, xs, ys, xq, yq, first.dtype, first.device)
    steps = learner.default_eval_steps() if steps is None else check_steps(_FN, "steps", steps)
    # What learner.adapt() runs: evaluation spec, first order, detached meta-parameters.
    spec = learner.inner_spec(steps, 1, training=False)
    objective = learner.objective
    problem = task_problem(spec, objective)
    extra = {k: v.detach() for k, v in learner.extra_params().items()}
    fm.sync_modes()
    buffers = fm.buffers()
    rows: list[dict[str, Any]] = []
    for task in range(xs.shape[0]):
        theta = {k: v.detach().requires_grad_() for k, v in fm.params().items()}
        support = (xs[task], ys[task])
        backend = _RecordingBackend(AutogradBackend(problem, task, create_graph=False))
        with torch.enable_grad():
            _, final = run_task(objective, spec, backend, theta, extra, buffers, *support)
            _, h = split(spec, theta, extra, buffers)
            last = {n: final[n] for n in spec.adapt_names}
            backend(functools.partial(_support_at, problem, h, support, steps), last, steps)
        rows += _rows(task, backend.records, spec, extra, objective, h, (xq[task], yq[task]))
    return rows


def write_trace_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write trace rows (from :func:`inner_trace`) to ``path`` as CSV with a header line.

    Returns:
        The written path.
    """
    out = Path(path)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(TRACE_KEYS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return out


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "metagrad.viz.plot_trace needs matplotlib: pip install metagrad[viz] "
            "(or pip install matplotlib)."
        ) from None
    return plt


def plot_trace(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Plot adaptation curves: support and query loss, gradient norm and step size per step.

    Thin lines are tasks, the thick line their mean. Needs matplotlib (``metagrad[viz]``).

    Args:
        rows: From :func:`inner_trace`.
        path: Output image (PNG, SVG or PDF by suffix).
        title: Figure title.

    Returns:
        The written path.

    Raises:
        ImportError: matplotlib is missing (says how to install it).
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("metagrad.viz.plot_trace: rows is empty; pass inner_trace(...)'s result.")
    plt = _pyplot()
    panels = [
        ("support_loss", "support loss", True),
        ("query_loss", "query loss", True),
        ("grad_norm", "inner gradient norm", True),
        ("step_size", "step size (lr)", False),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    tasks = sorted({int(r["task"]) for r in rows})
    for ax, (key, label, log) in zip(axes, panels):
        per_step: dict[int, list[float]] = {}
        for i, t in enumerate(tasks):
            pts = [(int(r["step"]), float(r[key])) for r in rows if int(r["task"]) == t]
            pts = [(s, v) for s, v in pts if math.isfinite(v)]
            for s, v in pts:
                per_step.setdefault(s, []).append(v)
            ax.plot(
                [s for s, _ in pts], [v for _, v in pts], color="#9db7d5", lw=0.8,
                label=f"each task ({len(tasks)})" if i == 0 else None,
            )  # fmt: skip
        steps = sorted(per_step)
        ax.plot(
            steps, [sum(per_step[s]) / len(per_step[s]) for s in steps], color="#1f4e8c", lw=2,
            label="mean over tasks",
        )  # fmt: skip
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("inner step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if log and all(v > 0 for vs in per_step.values() for v in vs):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
