"""The meta-training loop: Adam on the meta-gradient, validation, logs, exact resume.

A run interrupted at iteration ``n`` and resumed from its checkpoint ends with bitwise the same
parameters as an uninterrupted run: the checkpoint holds the learner, the meta-optimizer, the
scheduler, every RNG (global ones and the samplers' own generators) and the iteration.

Ctrl-C (SIGINT) during :meth:`Trainer.train` finishes the meta-iteration under way, then saves
that state and raises ``KeyboardInterrupt``; a second Ctrl-C stops at once, rolling the
half-done iteration's random draws back, so both checkpoints describe the last finished
iteration exactly.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import metagrad
from metagrad._errors import NonFiniteError, non_finite_error
from metagrad.algorithms import MAML
from metagrad.distributed import distributed_meta_loss, is_distributed
from metagrad.training._build import (
    image_shape,
    load_splits,
    make_learner,
    make_model,
    make_samplers,
)
from metagrad.training._callbacks import Callback
from metagrad.training._checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    CheckpointError,
    OutputWriteError,
    clean_stale_temp_files,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metagrad.training._config import ConfigError, TrainConfig, validate
from metagrad.training._evaluate import EvalResult, evaluate

_log = logging.getLogger("metagrad")
METRICS = "metrics.csv"
# nan_policy="skip" gives up after this many skipped meta-batches in a row (diverged parameters
# fail on every batch; skipping them forever only hides that).
MAX_SKIPS_IN_A_ROW = 10
COLUMNS = ["iteration", "train_loss", "lr", "grad_norm", "elapsed_s", "val_loss", "val_loss_ci95",
           "val_accuracy", "val_accuracy_ci95", "train_accuracy", "val_steps"]  # fmt: skip
# A resumed run must match its checkpoint's config in every key but these (they change neither
# the trained parameters nor what the metrics mean); others need allow_config_change=True.
FREE_ON_RESUME = ("iterations", "val_every", "log_every", "checkpoint_every", "val_tasks",
                  "eval_tasks", "tensorboard", "val_steps")  # fmt: skip
# Never changeable on resume: the model and the task streams continue from the checkpoint.
FIXED_ON_RESUME = ("task", "seed")
# What `Trainer.from_checkpoint` (metagrad eval) may override: data location and evaluation.
EVAL_OVERRIDES = ("data", "eval_tasks", "eval_shots", "eval_queries", "device", "test_steps",
                  "val_tasks", "imaml_eval_lam")  # fmt: skip
_FLAG = {"shots": "--k-shot"}  # config key -> CLI flag, where they are not spelled alike


def prepare_output(
    output: str | os.PathLike[str], *, resume: bool, overwrite: bool = False
) -> Path:
    """Create and probe the output folder before any long work; refuse to clobber a run.

    ``overwrite=True`` (CLI ``--overwrite``) deletes an earlier run's checkpoints and log first.
    """
    out = _writable_folder(output, "output directory", "another --output")
    clean_stale_temp_files(out)  # left by a run killed while writing (may recover checkpoint.pt)
    has_ckpt = (out / CHECKPOINT).exists() or (out / PREVIOUS).exists()
    if has_ckpt and overwrite and not resume:
        for name in (CHECKPOINT, PREVIOUS, METRICS):
            (out / name).unlink(missing_ok=True)
        has_ckpt = False
    if has_ckpt and not resume:
        raise ConfigError(
            f"{str(out)!r} already holds a training checkpoint; nothing was overwritten. Fix: pass "
            f"--resume to continue that run, --overwrite to replace it, or choose another --output."
        )
    if resume and not has_ckpt:
        raise CheckpointError(
            f"--resume: no {CHECKPOINT} in {str(out)!r}; start without --resume or point "
            f"--output at the run to continue."
        )
    return out


def _writable_folder(output: str | os.PathLike[str], what: str, fix: str) -> Path:
    """``output`` created if needed and proven writable (a temporary file), else ConfigError."""
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{what} {str(out)!r} is not writable ({err.strerror or err}). Fix: choose {fix}."
        ) from None
    return out


def prepare_eval_output(output: str | os.PathLike[str]) -> Path:
    """``metagrad eval --output``: a writable folder that is not a training run's own."""
    out = _writable_folder(output, "--output", "another --output folder")
    if (out / CHECKPOINT).exists() or (out / PREVIOUS).exists():
        raise ConfigError(
            f"--output {str(out)!r} holds a training run ({CHECKPOINT}); the evaluation would "
            f"overwrite its results.json and plots. Fix: choose another folder, e.g. --output "
            f"{out / 'eval'}."
        )
    clean_stale_temp_files(out)
    return out


def _check_tensorboard() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "tensorboard logging needs the tensorboard package: pip install metagrad[tensorboard] "
            "(or pip install tensorboard), or drop --tensorboard."
        ) from None
    return SummaryWriter


class _Progress:
    """tqdm when installed, else one status line on stderr (rate-limited)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.bar: Any = None
        self.val = ""
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="meta-train", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def validated(self, loss: float, accuracy: float | None) -> None:
        """Show the latest validation loss (and accuracy) from now on."""
        self.val = f"  val {loss:.4f}" + ("" if accuracy is None else f" ({100 * accuracy:.1f}%)")

    def update(self, it: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss={loss:.4f}, lr={lr:.1e}" + self.val, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last < 2.0 and it < self.total:
            return
        self.last = now
        rate = (it - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - it) / rate if rate > 0 else math.inf
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(
            f"meta-train {it}/{self.total}  loss {loss:.4f}{self.val}  lr {lr:.1e}  {rate:.1f} it/s  "
            f"ETA {eta_s}{end}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            sys.stderr.write("\n")


class _Sigint:
    """SIGINT while training: the first stops after the current iteration, a second at once.

    Installed only from the main thread over Python's default handler (a handler of the caller's
    own is left alone). Inside :meth:`shield` (the optimizer update) even a second SIGINT waits.
    """

    def __init__(self) -> None:
        self.requested = False
        self._shielded = False
        self._pending = False
        self._previous: Any = None

    @contextmanager
    def installed(self) -> Iterator[_Sigint]:
        ours = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
        if ours:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            if ours:
                signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.requested = True
            _log.warning(
                "interrupt: finishing the current meta-iteration, then saving a checkpoint "
                "(Ctrl-C again to stop at once)."
            )
            return
        if self._shielded:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def shield(self) -> Iterator[None]:
        """Defer every SIGINT until the block (a parameter update) is complete."""
        self._shielded = True
        try:
            yield
        finally:
            self._shielded = False
        if self._pending:
            self._pending = False
            raise KeyboardInterrupt


class Trainer:
    """Meta-trains the learner of a :class:`TrainConfig`, writing logs and checkpoints.

    Args:
        cfg: the run (validated here).
        output: folder for ``checkpoint.pt``, ``metrics.csv`` (and TensorBoard logs); None keeps
            everything in memory (no checkpoints).
        resume: continue the checkpoint in ``output``; its config must match ``cfg`` in every key
            except bookkeeping ones (:data:`FREE_ON_RESUME`: ``iterations``, logging and
            validation intervals...), else :class:`CheckpointError` lists what differs.
        allow_config_change: with ``resume``, continue under ``cfg``'s changed values anyway
            (not ``task`` or ``seed``); each change is logged and kept in the checkpoint's
            ``config_changes``, and ``meta_lr``/``min_lr``/``lr_schedule`` reach the optimizer.
        overwrite: replace an earlier run's checkpoints and log in ``output``.
        progress: show a progress bar.
        callbacks: experiment-tracker hooks (:class:`~metagrad.training.Callback`): each
            ``metrics.csv`` row, each validation and the end of training reach them.

    Raises:
        ConfigError, DatasetError, CheckpointError: bad settings, data or checkpoint; raised
            before any training step, and nothing on disk is overwritten.

    Example:
        >>> from metagrad.training import Trainer, preset
        >>> t = Trainer(preset("sinusoid").replace(iterations=2, meta_batch=2), progress=False)
        >>> t.train()
        2
    """

    def __init__(
        self,
        cfg: TrainConfig,
        output: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        writer: bool = True,
        allow_config_change: bool = False,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        cfg = validate(cfg)
        self.callbacks = list(callbacks)
        if writer:
            self.output = (
                None
                if output is None
                else prepare_output(output, resume=resume, overwrite=overwrite)
            )
        else:  # a non-zero distributed rank: reads the checkpoint to resume, never writes
            self.output = None if output is None else Path(output)
            progress = False
        ckpt = load_checkpoint(self.output) if resume and self.output is not None else None
        if not writer:
            self.output = None
        changes: dict[str, tuple[Any, Any]] = {}
        self.config_changes: list[dict[str, Any]] = []
        if ckpt is not None:
            changes = self._resume_changes(cfg, ckpt, allow_config_change)
            self.config_changes = list(ckpt.get("config_changes", []))
        self.writer_cls = _check_tensorboard() if cfg.tensorboard and self.output else None
        self.cfg = cfg
        self.progress_enabled = progress
        self.splits = load_splits(cfg)
        self.samplers = make_samplers(cfg, self.splits)
        # whose classes samplers["test"] draws from (``metagrad eval --eval-split``)
        self.eval_split = "test"
        self.model = make_model(cfg, image_shape(self.splits))
        self.learner = make_learner(cfg, self.model)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=cfg.meta_lr)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        if cfg.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=cfg.iterations, eta_min=cfg.min_lr
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.ConstantLR(
                self.optimizer, factor=1.0, total_iters=0
            )
        self.iteration = 0
        self.skipped = 0  # meta-batches dropped by nan_policy="skip"
        self.elapsed = 0.0
        self.last_val: EvalResult | None = None
        self._sigint = _Sigint()
        self._skips_in_a_row = 0
        self.saved_iteration: int | None = None  # the iteration safely on disk
        if ckpt is not None:
            self._restore(
                ckpt, lr_changed=bool({"meta_lr", "min_lr", "lr_schedule"} & set(changes))
            )
            if changes:
                self.config_changes.append(
                    {"iteration": self.iteration,
                     "changes": {k: [old, new] for k, (old, new) in changes.items()}}
                )  # fmt: skip
                _log.warning(
                    "resuming at iteration %d with changed settings (--allow-config-change): %s; "
                    "recorded in the checkpoint's config_changes.",
                    self.iteration, "; ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items()),
                )  # fmt: skip

    # -- checkpoints -----------------------------------------------------------------------
    @staticmethod
    def _resume_changes(
        cfg: TrainConfig, ckpt: dict[str, Any], allow: bool
    ) -> dict[str, tuple[Any, Any]]:
        """Keys where ``cfg`` differs from the checkpoint's config (bookkeeping ones aside).

        Raises CheckpointError listing them all, unless ``allow`` (then only for FIXED ones).
        """
        stored = dict(ckpt.get("config", {}))
        if "algorithm" in ckpt:
            stored.setdefault("algorithm", ckpt["algorithm"])
        now = cfg.to_dict()
        diff = {
            k: (stored[k], now[k])
            for k in now
            if k in stored and k not in FREE_ON_RESUME and stored[k] != now[k]
        }
        if not diff:
            return {}

        def show(keys: list[str]) -> str:
            return "; ".join(
                f"{k}{f' ({_FLAG[k]})' if k in _FLAG else ''}: checkpoint {diff[k][0]!r}, "
                f"now {diff[k][1]!r}"
                for k in keys
            )

        fixed = [k for k in diff if k in FIXED_ON_RESUME]
        if allow and fixed:
            raise CheckpointError(
                f"--allow-config-change cannot change {show(fixed)}: the model and the task "
                f"streams continue from the checkpoint. Fix: resume with the checkpoint's value, "
                f"or start a new run in another --output."
            )
        if allow:
            return diff
        if "algorithm" in diff:
            old, new = diff["algorithm"]
            head = f"the checkpoint was written by algorithm {old!r} but this run uses {new!r}"
            rest = [k for k in diff if k != "algorithm"]
            head += f" (other differences: {show(rest)})" if rest else ""
        else:
            head = (
                f"the checkpoint is from another model/run or was trained with other settings: "
                f"{show(list(diff))}"
            )
        raise CheckpointError(
            f"{head}. Fix: resume with the checkpoint's settings (`metagrad train --resume "
            f"--output DIR` alone reuses them), pass --allow-config-change to continue with the "
            f"new values (recorded in the checkpoint), or use another --output for a new run."
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "metagrad_version": metagrad.__version__,
            "algorithm": self.cfg.algorithm,
            "config": self.cfg.to_dict(),
            "config_changes": self.config_changes,
            "iteration": self.iteration,
            "skipped": self.skipped,
            "elapsed_s": self.elapsed,
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "samplers": {k: s.state_dict() for k, s in self.samplers.items()},
        }

    def _restore(self, ckpt: dict[str, Any], *, lr_changed: bool = False) -> None:
        try:
            self.learner.load_state_dict(ckpt["learner"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if lr_changed:  # deliberate change: the new schedule at the checkpoint's position
                self._set_schedule_position(int(ckpt["scheduler"].get("last_epoch", 0)))
            else:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
                self.scheduler.T_max = self.cfg.iterations  # a resumed run may be extended
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"the checkpoint does not fit this model/algorithm ({first}). Fix: resume with "
                f"the settings it was trained with."
            ) from None
        set_rng_state(ckpt["rng"])
        for k, s in self.samplers.items():
            s.load_state_dict(ckpt["samplers"][k])
        self.iteration = int(ckpt["iteration"])
        self.saved_iteration = self.iteration
        self.skipped = int(ckpt.get("skipped", 0))
        self.elapsed = float(ckpt.get("elapsed_s", 0.0))
        self._truncate_metrics()

    def _set_schedule_position(self, steps: int) -> None:
        """Put ``cfg``'s learning-rate schedule (new meta_lr/min_lr/kind) at ``steps`` updates;
        the optimizer's lr loaded from a checkpoint is replaced by it."""
        cfg, sched = self.cfg, self.scheduler
        if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
            sched.eta_min = cfg.min_lr
            progress = min(steps, cfg.iterations) / cfg.iterations
            lr = cfg.min_lr + (cfg.meta_lr - cfg.min_lr) * (1 + math.cos(math.pi * progress)) / 2
        else:
            lr = cfg.meta_lr
        for g in self.optimizer.param_groups:
            g["initial_lr"] = cfg.meta_lr
            g["lr"] = lr
        sched.base_lrs = [cfg.meta_lr for _ in self.optimizer.param_groups]
        sched.last_epoch = steps
        sched._last_lr = [lr for _ in self.optimizer.param_groups]  # type: ignore[attr-defined]

    def save(self) -> Path | None:
        """Write the checkpoint now (no-op without an output folder)."""
        if self.output is None:
            return None
        bad = [
            n
            for n, p in self.learner.state_dict().items()
            if p.is_floating_point() and not bool(p.isfinite().all())
        ]
        if bad:  # never replace the last good checkpoint with a broken one
            # The meta-parameters themselves: outer-loop advice, not the inner-loop default.
            raise NonFiniteError(
                "metagrad.train", f"meta-parameters {bad[:3]} at iteration {self.iteration}",
                None, None,
                advice=f"The checkpoint was not written (the last good one in "
                f"{str(self.output)!r} is kept). The meta-update diverged: lower --meta-lr or "
                f"pass --clip-grad, then resume from that checkpoint with --resume.",
            )  # fmt: skip
        try:
            path = save_checkpoint(self.state_dict(), self.output)
        except OSError as err:
            raise self._write_error(
                self.output / CHECKPOINT, "write the checkpoint of", err
            ) from err
        self.saved_iteration = self.iteration
        return path

    def _write_error(self, path: Path, doing: str, err: OSError) -> OutputWriteError:
        """Disk full / read-only: which file, what is safely saved, how to continue."""
        why = err.strerror or str(err)
        if err.errno is not None:
            why = f"{why}, errno {err.errno}"
        out = path.parent
        if self.saved_iteration is None:
            safe = "no checkpoint of this run is on disk yet. Fix: free space, then start again"
        else:
            safe = (
                f"{str(out / CHECKPOINT)!r} safely holds iteration {self.saved_iteration}. Fix: "
                f"free space (or make the folder writable), then continue with `metagrad train "
                f"--resume --output {out}`"
            )
        e = OutputWriteError(
            f"could not {doing} iteration {self.iteration} to {str(path)!r} ({why}); {safe}."
        )
        e.errno = err.errno
        return e

    # -- logging -----------------------------------------------------------------------------
    def _truncate_metrics(self) -> None:
        """Drop rows logged after the checkpoint (an interrupted run's tail) before appending."""
        if self.output is None or not (self.output / METRICS).exists():
            return
        with open(self.output / METRICS, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= self.iteration]
        with open(self.output / METRICS, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def _log(self, row: dict[str, Any], writer: Any) -> None:
        for cb in self.callbacks:
            cb.on_log(self, dict(row))
        if self.output is None:
            return
        path = self.output / METRICS
        new = not path.exists()
        try:
            header = COLUMNS
            if not new:  # a log begun by an older version keeps its columns
                with open(path, newline="") as f:
                    header = next(csv.reader(f), COLUMNS) or COLUMNS
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, header, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        except OSError as err:
            raise self._write_error(path, "append the log row of", err) from err
        if writer is not None:
            for k, v in row.items():
                if k != "iteration" and v not in (None, ""):
                    writer.add_scalar(k, float(v), int(row["iteration"]))

    # -- the loop ------------------------------------------------------------------------------
    @property
    def classification(self) -> bool:
        return self.cfg.task != "sinusoid"

    def step(self) -> tuple[float, float]:
        """One meta-update; returns (meta-loss, meta-gradient norm before clipping).

        A ``KeyboardInterrupt`` before the update rolls the random draws of this iteration back
        (the train sampler and torch's global RNG), so a checkpoint saved then resumes exactly;
        the update itself (optimizer, scheduler, iteration count) is never split by one.
        """
        sampler = self.samplers["train"]
        snapshot = (torch.get_rng_state(), sampler.state_dict())
        try:
            batch = sampler.sample(self.cfg.meta_batch).to(self.cfg.device)
            self.learner.train()
            self.optimizer.zero_grad(set_to_none=True)
            try:
                if isinstance(self.learner, MAML):
                    # Shards the meta-batch over ranks under torchrun; plain meta_loss otherwise.
                    # A Ctrl-C on any rank is agreed on in its first all-reduce (stop=...).
                    loss = distributed_meta_loss(
                        self.learner, *batch, stop=self._sigint.requested and is_distributed()
                    )
                else:
                    loss = self.learner.meta_loss(*batch)
                loss.backward()
                norm = self._clip_and_check(float(loss.detach()))
            except NonFiniteError as raw:
                err = self._explain_non_finite(raw, batch)
                self._skips_in_a_row += 1
                if self.cfg.nan_policy != "skip":
                    raise err from raw
                if self._skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
                    raise non_finite_error(
                        "metagrad.train", err.where, err.task, err.step,
                        f"metagrad.train: {self._skips_in_a_row} meta-batches in a row were "
                        f"skipped (--nan-policy skip), so skipping is not helping; the last: {err}",
                    ) from raw  # fmt: skip
                # Skip this meta-batch: no update, so no NaN can reach the parameters or a
                # checkpoint (under torchrun every rank skips it: the decision is collective).
                with self._sigint.shield():
                    self.skipped += 1
                    self.iteration += 1
                _log.warning(
                    "skipped the meta-batch of iteration %d (%s); %d skipped so far.",
                    self.iteration, err, self.skipped,
                )  # fmt: skip
                return math.nan, math.nan
        except KeyboardInterrupt:
            torch.set_rng_state(snapshot[0])
            sampler.load_state_dict(snapshot[1])
            raise
        with self._sigint.shield():
            self.optimizer.step()
            self.scheduler.step()
            self.iteration += 1
        self._skips_in_a_row = 0
        return float(loss.detach()), norm

    def _clip_and_check(self, loss: float) -> float:
        """The meta-gradient's norm; clipped to ``cfg.clip_grad`` only when that is set.

        A finite meta-gradient whose float32 norm overflows is measured in float64 (clipping it
        with an infinite norm would turn every entry into NaN); a NaN/Inf entry, or one left
        after clipping, raises :class:`NonFiniteError` naming the parameter.
        """
        with_grad = [(n, p) for n, p in self.learner.named_parameters() if p.grad is not None]
        named = [(n, p.grad) for n, p in with_grad if p.grad is not None]
        grads = [g for _, g in named]
        if not grads:
            return 0.0
        clip = self.cfg.clip_grad
        total = float(torch.nn.utils.get_total_norm(grads))
        if not math.isfinite(total):
            self._check_grads(named, loss, "")
            total = math.sqrt(sum(float(g.detach().double().square().sum()) for g in grads))
            if clip is not None and total > clip:
                torch._foreach_mul_(grads, clip / (total + 1e-6))
        elif clip is not None:
            total = float(torch.nn.utils.clip_grad_norm_([p for _, p in with_grad], clip))
        if clip is not None:
            self._check_grads(named, loss, f" after clipping to --clip-grad {clip:g}")
        elif total > math.sqrt(torch.finfo(grads[0].dtype).max):
            self._check_adam_range(named, loss)
        return total

    def _check_adam_range(self, named: list[tuple[str, torch.Tensor]], loss: float) -> None:
        """Refuse entries whose square overflows: Adam's second moment would become Inf and
        freeze that parameter for the rest of the run (finite but silently wrong)."""
        top, name = max((float(g.detach().abs().max()), n) for n, g in named if g.numel())
        g0 = named[0][1]
        if top <= math.sqrt(torch.finfo(g0.dtype).max):
            return
        raise non_finite_error(
            "metagrad.train", f"meta-gradient of {name!r}", None, None,
            f"metagrad.train: the meta-gradient of {name!r} has an entry of {top:.3g} at "
            f"iteration {self.iteration + 1} (meta-loss {loss:.4g}); its square overflows "
            f"{str(g0.dtype).replace('torch.', '')}, so Adam's second moment would become Inf and "
            f"freeze that parameter. Fix: pass --clip-grad (e.g. 10), or lower --inner-lr.",
        )  # fmt: skip

    def _check_grads(self, named: list[tuple[str, torch.Tensor]], loss: float, when: str) -> None:
        bad = [n for n, g in named if not bool(g.isfinite().all())]
        if not bad:
            return
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        reduced = " (summed across ranks)" if is_distributed() else ""
        raise non_finite_error(
            "metagrad.train", f"meta-gradient of {bad[0]!r}", None, None,
            f"metagrad.train: the meta-gradient{reduced} of {bad[0]!r}{more} is NaN/Inf{when} at "
            f"iteration {self.iteration + 1}, although the meta-loss ({loss:.4g}) is finite. "
            f"Fix: lower --inner-lr or --inner-steps (exploding second-order terms), or use "
            f"--algorithm fomaml; --nan-policy skip drops such meta-batches.",
        )  # fmt: skip

    def _explain_non_finite(self, err: NonFiniteError, batch: Any) -> NonFiniteError:
        """Name the real cause of a NaN/Inf at inner step 0 (the loss at the meta-parameters).

        There inner_lr has not acted yet: the data or the meta-parameters are to blame.
        """
        if err.step != 0 or err.task is None or not 0 <= err.task < int(batch[0].shape[0]):
            return err
        names = ("xs", "ys", "xq", "yq")
        parts = [(n, t[err.task]) for n, t in zip(names, batch)]
        dirty = [n for n, t in parts if t.is_floating_point() and not bool(t.isfinite().all())]
        it = self.iteration + 1
        if dirty:
            return non_finite_error(
                "metagrad.train", err.where, err.task, err.step,
                f"metagrad.train: task {err.task} of the meta-batch of iteration {it} has NaN/Inf "
                f"in its data ({', '.join(dirty)}). Fix: clean the dataset, or pass --nan-policy "
                f"skip to drop such meta-batches.",
            )  # fmt: skip
        if self.iteration == 0:
            return err  # the initial parameters on finite data: the model or loss itself
        updates = self.iteration - self.skipped
        params = [(n, p.detach()) for n, p in self.learner.named_parameters()]
        bad = [n for n, p in params if not bool(p.isfinite().all())]
        if bad:
            cause = f"the meta-parameters are NaN/Inf ({bad[0]!r})"
        else:
            big, name = max((float(p.abs().max()), n) for n, p in params if p.numel())
            x = max(float(t.abs().max()) for _, t in parts if t.is_floating_point() and t.numel())
            cause = (
                f"the data are finite (largest |value| {x:.3g}) but the meta-parameters overflow "
                f"the model (largest |parameter| {big:.3g}, in {name!r})"
            )
        return non_finite_error(
            "metagrad.train", err.where, err.task, err.step,
            f"metagrad.train: non-finite {err.where} at task {err.task} before any inner step "
            f"(iteration {it}), so inner_lr is not the cause: {cause} after {updates} "
            f"meta-update{'s' if updates != 1 else ''} with meta_lr={self.cfg.meta_lr:g}. Fix: "
            f"lower --meta-lr, or pass "
            f"--clip-grad; resume from a checkpoint written before the divergence.",
        )  # fmt: skip

    def validate(self, tasks: int | None = None) -> EvalResult:
        """Query metrics on validation tasks after ``cfg.validation_steps`` inner steps.

        That is the training step count unless ``val_steps`` says otherwise.
        """
        return evaluate(
            self.learner,
            self.samplers["val"],
            tasks=tasks or self.cfg.val_tasks,
            steps=[self.cfg.validation_steps],
            classification=self.classification,
            device=self.cfg.device,
        )

    def train_accuracy(self) -> float | None:
        """Query accuracy on ``meta_batch`` training tasks (classification; else None).

        The train sampler is rewound afterwards, so the training stream (and exact resume)
        is unchanged: these are the tasks of the next meta-batch.
        """
        if not self.classification:
            return None
        sampler = self.samplers["train"]
        state = sampler.state_dict()
        try:
            r = evaluate(
                self.learner, sampler, tasks=self.cfg.meta_batch,
                steps=[self.cfg.inner_steps], classification=True, device=self.cfg.device,
            ).rows[0]  # fmt: skip
        finally:
            sampler.load_state_dict(state)
        return r.accuracy

    def train(self, until: int | None = None) -> int:
        """Meta-train up to ``cfg.iterations`` (or ``until``, to stop early); return the iteration.

        A ``KeyboardInterrupt`` (Ctrl-C: after the iteration under way finishes; under torchrun
        all ranks agree to stop at the same iteration) saves a checkpoint at the last finished
        iteration, then re-raises.
        """
        cfg = self.cfg
        stop = cfg.iterations if until is None else min(until, cfg.iterations)
        writer = None
        if self.writer_cls is not None and self.output is not None:
            writer = self.writer_cls(str(self.output / "tensorboard"))
        bar = _Progress(cfg.iterations, self.iteration, self.progress_enabled)
        try:
            with self._sigint.installed():
                self._loop(stop, writer, bar)
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        self.save()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.iteration

    def _loop(self, stop: int, writer: Any, bar: _Progress) -> None:
        cfg = self.cfg
        window: list[float] = []
        norms: list[float] = []
        t_start, elapsed0 = time.perf_counter(), self.elapsed
        self._sigint.requested = False
        while self.iteration < stop:
            loss, norm = self.step()
            self.elapsed = elapsed0 + time.perf_counter() - t_start
            if math.isfinite(loss):  # a skipped meta-batch (nan_policy="skip") logs nothing
                window.append(loss)
                norms.append(norm)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.update(self.iteration, loss, lr)
            it = self.iteration
            row: dict[str, Any] = {}
            if it % cfg.log_every == 0 or it == cfg.iterations:
                # A window of only skipped meta-batches (nan_policy="skip") has no loss: blank.
                row = {"iteration": it, "lr": lr, "elapsed_s": round(self.elapsed, 3),
                       "train_loss": sum(window) / len(window) if window else None,
                       "grad_norm": sum(norms) / len(norms) if norms else None}  # fmt: skip
                window, norms = [], []
            if it % cfg.val_every == 0 or it == cfg.iterations:
                val_state = self.samplers["val"].state_dict()
                try:
                    val = self.validate()
                except KeyboardInterrupt:  # a second Ctrl-C: as if it had not started
                    self.samplers["val"].load_state_dict(val_state)
                    raise
                self.last_val = val
                r = val.rows[-1]
                row = {**row, "iteration": it, "val_loss": r.loss, "val_loss_ci95": r.loss_ci95,
                       "val_accuracy": r.accuracy, "val_accuracy_ci95": r.accuracy_ci95,
                       "train_accuracy": self.train_accuracy(), "val_steps": r.steps}  # fmt: skip
                bar.validated(r.loss, r.accuracy)
                for cb in self.callbacks:
                    cb.on_validation(self, val)
            if row:
                self._log(row, writer)
            if it % cfg.checkpoint_every == 0 and it < stop:
                self.save()
            # Ctrl-C: stop after this iteration (under torchrun the ranks agree on it in the
            # next step's first all-reduce, which raises KeyboardInterrupt on all of them).
            if self._sigint.requested and not (is_distributed() and isinstance(self.learner, MAML)):
                raise KeyboardInterrupt

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], *, overrides: dict[str, Any] | None = None
    ) -> Trainer:
        """Rebuild a trained run from its checkpoint (file or run folder) for evaluation.

        ``overrides`` may change data location and evaluation settings (``data``, ``eval_tasks``,
        ``eval_shots``, ``eval_queries``, ``device``...), not the model.
        """
        ckpt = load_checkpoint(path)
        stored = dict(ckpt.get("config", {}))
        try:
            cfg = TrainConfig(**stored)
        except TypeError as err:
            raise CheckpointError(
                f"{str(path)!r} holds a config this metagrad version does not know ({err})."
            ) from None
        for k, v in (overrides or {}).items():
            if k not in EVAL_OVERRIDES and v != getattr(cfg, k, None):
                raise CheckpointError(
                    f"{k} is fixed by the checkpoint ({getattr(cfg, k, None)!r}); evaluation "
                    f"may change only {', '.join(EVAL_OVERRIDES)}."
                )
            cfg = cfg.replace(**{k: v})
        trainer = cls(cfg, None, progress=False)
        trainer._restore(ckpt)
        trainer.config_changes = list(ckpt.get("config_changes", []))
        return trainer

    def evaluate(self, tasks: int | None = None, steps: list[int] | None = None) -> EvalResult:
        """The final test: ``cfg.eval_tasks`` tasks of ``samplers["test"]`` (the test split's
        classes unless ``eval_split`` says otherwise) after each of ``cfg.test_steps``."""
        result = evaluate(
            self.learner,
            self.samplers["test"],
            tasks=tasks or self.cfg.eval_tasks,
            steps=steps or self.cfg.test_steps,
            classification=self.classification,
            device=self.cfg.device,
        )
        result.split = self.eval_split
        return result
