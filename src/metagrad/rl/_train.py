"""``metagrad train navigation``: MAML-RL on the paper's 2D navigation, end to end.

One run trains two policies from the same random initialization, then evaluates three:

1. **MAML**: meta-trained (TRPO by default, or Adam) through one DiCE policy-gradient step.
2. **pretrained**: the same outer optimizer on the same task distribution with no adaptation
   (one policy trained on all tasks jointly), the paper's "pretrained" baseline.
3. **random**: the initialization itself.

Each is then adapted with 0..3 policy-gradient steps on held-out goals (the same goals and
random numbers for all three) and its average return after each step is recorded: the
MAML paper's Figure 5. The run folder is the same as for the supervised tasks: an atomic,
checksummed ``checkpoint.pt`` (previous one kept; ``--resume`` continues bit-exactly),
``metrics.csv``, ``results.json`` and plots (``learning_curves.png``,
``navigation_returns.png``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import metagrad
from metagrad._typing import Params
from metagrad.rl._maml import collect, meta_objective, trpo_functions
from metagrad.rl._navigation import Navigation2D
from metagrad.rl._policy import init_gaussian_mlp
from metagrad.rl._trpo import trpo_step
from metagrad.tasks import derive_seed
from metagrad.training._checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metagrad.training._config import ConfigError
from metagrad.training._evaluate import mean_ci95
from metagrad.training._trainer import _Sigint, prepare_output

_log = logging.getLogger("metagrad")
TASK = "navigation"
KIND = "metagrad-rl/navigation/1"
METRICS = "metrics.csv"
COLUMNS = ["phase", "iteration", "return_before", "return_after", "kl", "backtracks",
           "surrogate_gain", "elapsed_s"]  # fmt: skip
# Streams of derive_seed(cfg.seed, stream).
MODEL_STREAM, MAML_STREAM, PRETRAIN_STREAM, TEST_STREAM = 0, 1, 5, 3
POLICIES = ("maml", "pretrained", "random")
# Bookkeeping settings a resumed run may change (they change neither parameters nor metrics).
FREE_ON_RESUME = ("iterations", "pretrain_iterations", "log_every", "checkpoint_every",
                  "eval_tasks", "test_steps")  # fmt: skip


@dataclass
class NavigationConfig:
    """Everything that defines a navigation run (stored in its checkpoint).

    The defaults are the MAML paper's (section 5.3 and appendix): horizon 100, 20 trajectories
    per task for the inner step, meta-batch 20 tasks, inner step size 0.1, a 100-100 ReLU
    Gaussian policy, TRPO with KL bound 0.01, discount 0.99. ``fisher_tasks`` (the tasks the
    TRPO Fisher matrix is estimated on) and the iteration counts are this project's scale-downs
    for a 2-core CPU.
    """

    task: str = TASK
    seed: int = 0
    iterations: int = 100
    pretrain_iterations: int | None = None  # None: as many as MAML; 0: no pretrained baseline
    meta_batch: int = 20
    trajectories: int = 20
    horizon: int = 100
    hidden: int = 100
    inner_lr: float = 0.1
    inner_steps: int = 1
    discount: float = 0.99
    estimator: str = "dice"
    outer: str = "trpo"
    meta_lr: float = 1e-3
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    fisher_tasks: int | None = 5
    test_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    eval_tasks: int = 100
    eval_trajectories: int = 20
    log_every: int = 1
    checkpoint_every: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def pretrain_total(self) -> int:
        return self.iterations if self.pretrain_iterations is None else self.pretrain_iterations


_INT_FIELDS = ("seed", "iterations", "meta_batch", "trajectories", "horizon", "hidden",
               "inner_steps", "cg_iters", "eval_tasks", "eval_trajectories", "log_every",
               "checkpoint_every")  # fmt: skip
_FLOAT_FIELDS = ("inner_lr", "discount", "meta_lr", "max_kl", "cg_damping")


def validate(cfg: NavigationConfig) -> NavigationConfig:
    """Every field checked; :class:`ConfigError` names the field, the value and the fix."""
    if cfg.task != TASK:
        raise ConfigError(
            f"navigation: task={cfg.task!r}; this trainer runs task='navigation' only."
        )
    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        lo = 0 if name in ("seed", "inner_steps") else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"navigation: {name}={v!r} must be an int >= {lo}.")
    for name in ("pretrain_iterations", "fisher_tasks"):
        v = getattr(cfg, name)
        lo = 0 if name == "pretrain_iterations" else 1
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ConfigError(f"navigation: {name}={v!r} must be an int >= {lo} or null.")
    for name in _FLOAT_FIELDS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"navigation: {name}={v!r} must be a finite number >= 0.")
    if not 0 < cfg.discount <= 1:
        raise ConfigError(f"navigation: discount={cfg.discount!r} must be in (0, 1].")
    if cfg.outer not in ("trpo", "adam"):
        raise ConfigError(f"navigation: outer={cfg.outer!r}: choose 'trpo' (paper) or 'adam'.")
    if cfg.estimator not in ("dice", "reinforce"):
        raise ConfigError(
            f"navigation: estimator={cfg.estimator!r}: choose 'dice' (exact second order) or "
            f"'reinforce' (the plain surrogate, biased Hessian)."
        )
    if cfg.outer == "trpo" and not cfg.max_kl > 0:
        raise ConfigError("navigation: max_kl must be > 0 for TRPO.")
    if cfg.outer == "adam" and not cfg.meta_lr > 0:
        raise ConfigError("navigation: meta_lr must be > 0 for Adam.")
    steps = cfg.test_steps
    if (
        not isinstance(steps, list)
        or not steps
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps)
    ):
        raise ConfigError(f"navigation: test_steps={steps!r} must be a list of ints >= 0.")
    return dataclasses.replace(cfg, test_steps=sorted(set(steps)))


def _fisher_tasks(cfg: NavigationConfig, tasks: int) -> torch.Tensor | None:
    if cfg.fisher_tasks is None or cfg.fisher_tasks >= tasks:
        return None
    return torch.arange(cfg.fisher_tasks)


# ---------------------------------------------------------------------------------- phases


class _Phase:
    """One policy being trained: parameters, outer optimizer, generator, iteration."""

    def __init__(self, name: str, cfg: NavigationConfig, init: Params, stream: int) -> None:
        self.name, self.cfg = name, cfg
        self.inner_steps = cfg.inner_steps if name == "maml" else 0
        self.total = cfg.iterations if name == "maml" else cfg.pretrain_total
        self.params = {k: v.clone() for k, v in init.items()}
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, stream))
        self.iteration = 0
        self.elapsed = 0.0
        self.adam: torch.optim.Adam | None = None
        if cfg.outer == "adam":
            self.params = {k: v.requires_grad_(True) for k, v in self.params.items()}
            self.adam = torch.optim.Adam(list(self.params.values()), lr=cfg.meta_lr)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "iteration": self.iteration,
            "elapsed_s": self.elapsed,
            "generator": self.generator.get_state(),
            "adam": self.adam.state_dict() if self.adam is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
        self.iteration = int(state["iteration"])
        self.elapsed = float(state["elapsed_s"])
        self.generator.set_state(state["generator"])
        if self.adam is not None:
            self.adam.load_state_dict(state["adam"])

    def step(self, env: Navigation2D, sigint: _Sigint) -> dict[str, Any]:
        """One outer update on a fresh meta-batch; returns the metrics row.

        A ``KeyboardInterrupt`` before the update rolls this iteration's random draws back, so
        a checkpoint saved then resumes exactly; the update itself is shielded from it.
        """
        snapshot = self.generator.get_state()
        t0 = time.perf_counter()
        try:
            row = self._step(env, sigint)
        except KeyboardInterrupt:
            self.generator.set_state(snapshot)
            raise
        self.elapsed += time.perf_counter() - t0
        row["elapsed_s"] = round(self.elapsed, 3)
        return row

    def _step(self, env: Navigation2D, sigint: _Sigint) -> dict[str, Any]:
        cfg = self.cfg
        goals = env.sample_goals(cfg.meta_batch, self.generator)
        batches = collect(
            env, self.params, goals, cfg.trajectories, self.inner_steps, cfg.inner_lr,
            self.generator, discount=cfg.discount, estimator=cfg.estimator,  # type: ignore[arg-type]
        )  # fmt: skip
        row: dict[str, Any] = {
            "phase": self.name,
            "return_before": float(batches[0].rollout.returns().mean()),
            "return_after": float(batches[-1].rollout.returns().mean()),
        }
        if self.adam is not None:
            self.adam.zero_grad(set_to_none=True)
            loss = -meta_objective(self.params, batches, cfg.inner_lr, estimator=cfg.estimator)  # type: ignore[arg-type]
            loss.backward()
            _check_finite(self.name, self.iteration, {k: v.grad for k, v in self.params.items()})
            with sigint.shield():
                self.adam.step()
                self.iteration += 1
            row.update(kl="", backtracks="", surrogate_gain="")
        else:
            prob = trpo_functions(
                batches, cfg.inner_lr, estimator=cfg.estimator,  # type: ignore[arg-type]
                fisher_tasks=_fisher_tasks(cfg, cfg.meta_batch),
            )  # fmt: skip
            new, info = trpo_step(
                self.params, prob.surrogate, prob.kl, fisher_kl=prob.fisher_kl,
                max_kl=cfg.max_kl, cg_iters=cfg.cg_iters, damping=cfg.cg_damping,
            )  # fmt: skip
            _check_finite(self.name, self.iteration, dict(new))
            with sigint.shield():
                self.params = new
                self.iteration += 1
            row.update(kl=info.kl, backtracks=info.backtracks,
                       surrogate_gain=info.surrogate_after - info.surrogate_before)  # fmt: skip
        row["iteration"] = self.iteration
        return row


def _check_finite(phase: str, iteration: int, tensors: dict[str, torch.Tensor | None]) -> None:
    bad = [k for k, v in tensors.items() if v is not None and not bool(v.isfinite().all())]
    if bad:
        raise metagrad.NonFiniteError(
            "metagrad train navigation", f"update of {bad[0]!r} ({phase})", None, None,
            advice=f"At iteration {iteration + 1}. Fix: lower --meta-lr (Adam) or --max-kl "
            f"(TRPO), or --inner-lr; resume from the last checkpoint.",
        )  # fmt: skip


# ---------------------------------------------------------------------------------- trainer


class NavigationTrainer:
    """Trains MAML and the pretrained baseline, evaluates all three policies.

    Args:
        cfg: the run.
        output: run folder (``None``: nothing written).
        resume: continue the checkpoint in ``output`` (its config must match, bookkeeping
            settings aside).
        overwrite: replace an earlier run in ``output``.
        progress: one status line per ``log_every`` iterations, an INFO record of the
            ``"metagrad"`` logger (``metagrad train`` shows it on stderr; ``--quiet`` hides it).
    """

    def __init__(
        self,
        cfg: NavigationConfig,
        output: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = False,
    ) -> None:
        self.cfg = cfg = validate(cfg)
        self.output = None if output is None else prepare_output(output, resume=resume,
                                                                 overwrite=overwrite)  # fmt: skip
        self.progress = progress
        self.env = Navigation2D(cfg.horizon)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, MODEL_STREAM))
        self.init = init_gaussian_mlp(2, 2, (cfg.hidden, cfg.hidden), generator=gen)
        self.phases = {
            "maml": _Phase("maml", cfg, self.init, MAML_STREAM),
            "pretrained": _Phase("pretrained", cfg, self.init, PRETRAIN_STREAM),
        }
        self._sigint = _Sigint()
        if resume and self.output is not None:
            self._restore(load_checkpoint(self.output))

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | dict[str, Any],
        *,
        eval_tasks: int | None = None,
        test_steps: list[int] | None = None,
        restore_rng: bool = True,
    ) -> NavigationTrainer:
        """The trained run of a navigation checkpoint, to evaluate (``metagrad eval``) or use.

        Args:
            checkpoint: a run folder, a checkpoint file, or a checkpoint already loaded with
                :func:`~metagrad.training.load_checkpoint`.
            eval_tasks, test_steps: replace the run's evaluation settings.
            restore_rng: also restore the global RNG states saved with it (as ``--resume``
                does); :meth:`evaluate` draws from its own generator either way.

        Raises:
            metagrad.training.CheckpointError: not a navigation checkpoint, or one with
                settings this version does not know.
        """
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        if ckpt.get("kind") != KIND:
            raise CheckpointError(
                f"not a navigation checkpoint (kind {ckpt.get('kind')!r}, task "
                f"{dict(ckpt.get('config') or {}).get('task')!r}); `metagrad train navigation` "
                f"writes those."
            )
        values = dict(ckpt["config"])
        if eval_tasks is not None:
            values["eval_tasks"] = eval_tasks
        if test_steps is not None:
            values["test_steps"] = list(test_steps)
        try:
            cfg = NavigationConfig(**values)
        except TypeError as err:
            raise CheckpointError(
                f"the navigation checkpoint holds settings this metagrad version does not know "
                f"({err}); use the version that wrote it "
                f"({ckpt.get('metagrad_version', 'unknown')})."
            ) from None
        trainer = cls(validate(cfg))
        trainer._restore(ckpt, rng=restore_rng)
        return trainer

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        maml, pre = self.phases["maml"].state_dict(), self.phases["pretrained"].state_dict()
        return {
            "kind": KIND,
            "metagrad_version": metagrad.__version__,
            "algorithm": f"maml-{self.cfg.outer}",
            "config": self.cfg.to_dict(),
            "iteration": maml["iteration"],
            "learner": maml.pop("params"),  # checked for NaN/Inf on load
            "pretrained": pre.pop("params"),
            "phases": {"maml": maml, "pretrained": pre},
            "rng": rng_state(),
        }

    def save(self) -> None:
        if self.output is not None:
            save_checkpoint(self.state_dict(), self.output)

    def _restore(self, ckpt: dict[str, Any], *, rng: bool = True) -> None:
        if ckpt.get("kind") != KIND:
            raise CheckpointError(
                f"{str(self.output)!r} holds a checkpoint of task "
                f"{ckpt.get('config', {}).get('task')!r}, not a navigation run. Fix: use "
                f"another --output."
            )
        stored, now = dict(ckpt["config"]), self.cfg.to_dict()
        diff = {k: (stored.get(k), v) for k, v in now.items()
                if k not in FREE_ON_RESUME and stored.get(k) != v}  # fmt: skip
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"the checkpoint in {str(self.output)!r} was trained with other settings "
                f"({shown}). Fix: resume with the checkpoint's settings (`metagrad train "
                f"navigation --resume --output DIR` alone reuses them) or use another --output."
            )
        for name, phase in self.phases.items():
            state = dict(ckpt["phases"][name])
            state["params"] = ckpt["learner"] if name == "maml" else ckpt["pretrained"]
            phase.load_state_dict(state)
        if rng:
            set_rng_state(ckpt["rng"])
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop log rows written after the checkpoint (a crash between log and save)."""
        if self.output is None or not (self.output / METRICS).exists():
            return
        with open(self.output / METRICS, newline="") as f:
            rows = [r for r in csv.DictReader(f)
                    if int(r["iteration"]) <= self.phases[r["phase"]].iteration]  # fmt: skip
        with open(self.output / METRICS, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def _log(self, row: dict[str, Any]) -> None:
        if self.output is None:
            return
        path = self.output / METRICS
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)

    # -- training -------------------------------------------------------------------------
    @property
    def train_time(self) -> float:
        return self.phases["maml"].elapsed + self.phases["pretrained"].elapsed

    def train(self, max_iterations: int | None = None) -> bool:
        """Train MAML, then the pretrained baseline, up to their totals; True once both are done.

        ``max_iterations`` stops (and saves) after that many iterations of this call. A first
        Ctrl-C finishes the iteration under way, saves and raises ``KeyboardInterrupt``; a
        second one stops at once, with the iteration's random draws rolled back.
        """
        done = 0
        with self._sigint.installed():
            self._sigint.requested = False
            for name in ("maml", "pretrained"):
                phase = self.phases[name]
                while phase.iteration < phase.total:
                    if max_iterations is not None and done >= max_iterations:
                        self.save()
                        return False
                    try:
                        row = phase.step(self.env, self._sigint)
                    except KeyboardInterrupt:
                        self.save()
                        raise
                    done += 1
                    self._log(row)
                    it = phase.iteration
                    if self.progress and (it % self.cfg.log_every == 0 or it == phase.total):
                        _log.info(
                            "navigation %s %d/%d: return before %.2f, after %.2f (%.2f s/it)",
                            name, it, phase.total, row["return_before"], row["return_after"],
                            phase.elapsed / max(it, 1),
                        )  # fmt: skip
                    if it % self.cfg.checkpoint_every == 0:
                        self.save()
                    if self._sigint.requested:
                        self.save()
                        raise KeyboardInterrupt
        self.save()
        return True

    # -- evaluation -----------------------------------------------------------------------
    def policies(self) -> dict[str, Params]:
        out = {"maml": self.phases["maml"].params}
        if self.cfg.pretrain_total > 0:
            out["pretrained"] = self.phases["pretrained"].params
        out["random"] = self.init
        return {k: {n: t.detach() for n, t in v.items()} for k, v in out.items()}

    def evaluate(self, seed: int | None = None) -> dict[str, Any]:
        """Average return after each test step count, per policy, on the same held-out goals.

        Per task the return is averaged over ``eval_trajectories`` trajectories; means and 95%
        intervals are over tasks, and the paired differences MAML minus each baseline use the
        same goals and random numbers (common random numbers). ``seed`` replaces the run's
        seed for the test goals (``metagrad eval --seed``).
        """
        cfg = self.cfg
        test_seed = derive_seed(cfg.seed if seed is None else seed, TEST_STREAM)
        top = max(cfg.test_steps)
        per_task: dict[str, torch.Tensor] = {}
        for name, params in self.policies().items():
            gen = torch.Generator().manual_seed(test_seed)
            goals = self.env.sample_goals(cfg.eval_tasks, gen)
            chunks = []
            for lo in range(0, cfg.eval_tasks, cfg.meta_batch):
                batches = collect(
                    self.env, params, goals[lo : lo + cfg.meta_batch], cfg.eval_trajectories,
                    top, cfg.inner_lr, gen, discount=cfg.discount,
                )  # fmt: skip
                chunks.append(torch.stack([b.rollout.returns().mean(1) for b in batches], 1))
            per_task[name] = torch.cat(chunks).double()  # [tasks, top + 1]
        rows: dict[str, list[dict[str, Any]]] = {}
        for name, ret in per_task.items():
            rows[name] = []
            for s in cfg.test_steps:
                m, ci = mean_ci95(ret[:, s].tolist())
                rows[name].append({"steps": s, "return": m, "return_ci95": ci,
                                   "loss": -m, "loss_ci95": ci})  # fmt: skip
        diffs = {}
        for base in ("pretrained", "random"):
            if base in per_task:
                d = per_task["maml"] - per_task[base]
                diffs[f"maml_minus_{base}"] = [
                    dict(zip(("steps", "difference", "ci95"), (s, *mean_ci95(d[:, s].tolist()))))
                    for s in cfg.test_steps
                ]
        return {"tasks": cfg.eval_tasks, "trajectories": cfg.eval_trajectories,
                "rows": rows, "differences": diffs}  # fmt: skip
