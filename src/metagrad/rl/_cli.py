"""``metagrad train navigation`` / ``metagrad eval`` of a navigation run: flags, settings,
``results.json`` and the printed table (the trainer itself is ``metagrad.rl._train``).

``metagrad.training._cli`` hands a ``train``/``eval`` command here first
(:func:`maybe_run_navigation`, :func:`maybe_eval_navigation`); anything that is not a
navigation run goes back to the supervised trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import metagrad
from metagrad.rl._train import (
    KIND,
    METRICS,
    TASK,
    NavigationConfig,
    NavigationTrainer,
    validate,
)
from metagrad.training._checkpoint import CheckpointError, load_checkpoint
from metagrad.training._cli import cli_logging, log_level
from metagrad.training._config import ConfigError, read_config_file
from metagrad.training._trainer import prepare_eval_output

_log = logging.getLogger("metagrad")

# ---------------------------------------------------------------------------------- report


def write_results(trainer: NavigationTrainer, path: Path, evaluation: dict[str, Any],
                  eval_time: float) -> Path:  # fmt: skip
    """``results.json``: the evaluation (the ``test`` block is MAML's), timings, settings."""
    cfg = trainer.cfg
    out = {
        "metagrad_version": metagrad.__version__,
        "algorithm": f"maml-{cfg.outer}",
        "task": TASK,
        "iterations": trainer.phases["maml"].iteration,
        "pretrain_iterations": trainer.phases["pretrained"].iteration,
        "train_time_s": trainer.phases["maml"].elapsed,
        "pretrain_time_s": trainer.phases["pretrained"].elapsed,
        "eval_time_s": eval_time,
        # metric "return"; "loss" is the negative return (what meta-training minimizes)
        "test": {"tasks": evaluation["tasks"], "trajectories": evaluation["trajectories"],
                 "metric": "return", "policy": "maml", "rows": evaluation["rows"]["maml"]},
        "policies": evaluation["rows"],
        "differences": evaluation["differences"],
        "config": cfg.to_dict(),
    }  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def format_table(evaluation: dict[str, Any]) -> str:
    rows = evaluation["rows"]
    steps = [r["steps"] for r in rows["maml"]]
    head = "policy      " + "".join(f"{f'{s} steps':>18}" for s in steps)
    lines = [head]
    for name, rs in rows.items():
        cells = "".join(f"{r['return']:>10.2f} ± {r['return_ci95']:<5.2f}" for r in rs)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI

# train flag dest -> NavigationConfig field (the supervised flags that mean the same here)
_SHARED = {"seed": "seed", "iterations": "iterations", "meta_batch": "meta_batch",
           "inner_steps": "inner_steps", "inner_lr": "inner_lr", "meta_lr": "meta_lr",
           "test_steps": "test_steps", "eval_tasks": "eval_tasks", "log_every": "log_every",
           "checkpoint_every": "checkpoint_every", "hidden": "hidden"}  # fmt: skip
_OWN = {"nav_outer": "outer", "nav_trajectories": "trajectories", "nav_horizon": "horizon",
        "nav_max_kl": "max_kl", "nav_fisher_tasks": "fisher_tasks",
        "nav_pretrain_iterations": "pretrain_iterations", "nav_estimator": "estimator",
        "nav_discount": "discount"}  # fmt: skip
# supervised-only flags: refused for navigation rather than silently ignored
_FOREIGN = ("data", "algorithm", "strategy", "n_way", "k_shot", "queries", "eval_shots",
            "eval_queries", "clip_grad", "lr_schedule", "val_every", "val_tasks", "model",
            "image_size", "split", "tensorboard", "compile", "nan_policy", "imaml_lam",
            "cg_steps")  # fmt: skip


def add_navigation_flags(p: argparse.ArgumentParser) -> None:
    """The navigation-only flags of ``metagrad train`` (dest ``nav_*``)."""
    g = p.add_argument_group("navigation (MAML-RL) only")
    g.add_argument("--outer", dest="nav_outer", choices=("trpo", "adam"),
                   help="outer optimizer: trpo (paper, default) or adam (--meta-lr)")  # fmt: skip
    g.add_argument("--trajectories", dest="nav_trajectories", metavar="N", type=int,
                   help="trajectories per task and adaptation step (20)")  # fmt: skip
    g.add_argument(
        "--horizon", dest="nav_horizon", metavar="T", type=int, help="episode length (100)"
    )
    g.add_argument(
        "--max-kl", dest="nav_max_kl", metavar="KL", type=float, help="TRPO trust region (0.01)"
    )
    g.add_argument("--fisher-tasks", dest="nav_fisher_tasks", metavar="N", type=int,
                   help="tasks the TRPO Fisher matrix is estimated on (5)")  # fmt: skip
    g.add_argument("--pretrain-iterations", dest="nav_pretrain_iterations", metavar="N", type=int,
                   help="iterations of the pretrained baseline (default: --iterations)")  # fmt: skip
    g.add_argument("--estimator", dest="nav_estimator", choices=("dice", "reinforce"),
                   help="inner policy-gradient estimator (dice: exact second order)")  # fmt: skip
    g.add_argument(
        "--discount", dest="nav_discount", metavar="GAMMA", type=float, help="gamma (0.99)"
    )


def _wants_navigation(args: argparse.Namespace) -> bool:
    if args.preset == TASK:
        return True
    if args.preset is None and args.config:
        try:
            return read_config_file(args.config).get("preset") == TASK
        except ConfigError:
            return False
    if args.preset is None and args.resume and args.output:
        try:
            return load_checkpoint(args.output).get("kind") == KIND
        except CheckpointError:
            return False
    return False


def maybe_run_navigation(args: argparse.Namespace) -> int | None:
    """``metagrad train`` for the navigation task (exit status), else ``None``.

    Navigation-only flags given for another task are refused (exit status 2).
    """
    if not _wants_navigation(args):
        given = [f"--{d[4:].replace('_', '-')}" for d in _OWN if getattr(args, d, None) is not None]
        if given:
            print(f"metagrad train: error: {', '.join(given)} apply to the navigation task only.",
                  file=sys.stderr)  # fmt: skip
            return 2
        return None
    try:
        with cli_logging("train", log_level(args)):  # progress lines and notes, as for train
            return _run(args)
    except (ConfigError, CheckpointError, ValueError, OSError, FloatingPointError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"metagrad train: error: {msg}", file=sys.stderr)
        return 2


def build_config(args: argparse.Namespace) -> NavigationConfig:
    """Defaults < ``--config`` file < flags (< the checkpoint's own settings on a bare resume)."""
    values: dict[str, Any] = {}
    if args.config:
        values = read_config_file(args.config)
        values.pop("preset", None)
    elif args.preset is None and args.resume and args.output:
        values = dict(load_checkpoint(args.output)["config"])
    foreign = [f"--{d.replace('_', '-')}" for d in _FOREIGN if getattr(args, d, None) is not None]
    if foreign:
        raise ConfigError(
            f"{', '.join(foreign)} do(es) not apply to the navigation task. Its settings: "
            f"--iterations, --meta-batch, --inner-steps, --inner-lr, --meta-lr, --hidden, "
            f"--test-steps, --eval-tasks, --outer, --trajectories, --horizon, --max-kl, "
            f"--fisher-tasks, --pretrain-iterations, --estimator, --discount."
        )
    for dest, name in {**_SHARED, **_OWN}.items():
        if getattr(args, dest, None) is not None:
            values[name] = getattr(args, dest)
    names = {f.name for f in dataclasses.fields(NavigationConfig)}
    unknown = sorted(k for k in (k.replace("-", "_") for k in values) if k not in names)
    if unknown:
        raise ConfigError(f"navigation: unknown setting(s) {unknown}; known: {sorted(names)}.")
    return validate(NavigationConfig(**{k.replace("-", "_"): v for k, v in values.items()}))


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "allow_config_change", False):
        raise ConfigError("--allow-config-change is not supported for the navigation task yet.")
    if getattr(args, "device", None) not in (None, "cpu"):
        raise ConfigError("the navigation task runs on the CPU only; drop --device.")
    cfg = build_config(args)
    out = Path(args.output) if args.output else Path("runs") / f"{TASK}-maml-{cfg.outer}"
    trainer = NavigationTrainer(cfg, out, resume=args.resume, overwrite=args.overwrite,
                                progress=not args.no_progress)  # fmt: skip
    try:
        trainer.train()
    except KeyboardInterrupt:
        print(f"metagrad train: interrupted; checkpoint saved in {out}. Continue with "
              f"--resume --output {out}.", file=sys.stderr)  # fmt: skip
        return 130
    t0 = time.perf_counter()
    evaluation = trainer.evaluate()
    eval_time = time.perf_counter() - t0
    maml, pre = trainer.phases["maml"], trainer.phases["pretrained"]
    print(f"MAML ({cfg.outer}) on 2D navigation: {maml.iteration} meta-iterations "
          f"({maml.elapsed:.0f} s), pretrained {pre.iteration} ({pre.elapsed:.0f} s); average "
          f"return over {cfg.eval_tasks} test tasks after k policy-gradient steps")  # fmt: skip
    print(format_table(evaluation))
    write_results(trainer, out / "results.json", evaluation, eval_time)
    made = ["results.json"]
    if not args.no_plots:
        try:
            from metagrad.rl._plots import plot_navigation_returns, plot_rl_learning_curves

            plot_navigation_returns(evaluation, out / "navigation_returns.png")
            plot_rl_learning_curves(out / METRICS, out / "learning_curves.png")
            made += ["navigation_returns.png", "learning_curves.png"]
        except ImportError as err:
            _log.info("note: plots skipped: %s", err)
    print(f"wrote {out / made[0]}" + "".join(f", {m}" for m in made[1:]))
    return 0


def maybe_eval_navigation(args: argparse.Namespace) -> int | None:
    """``metagrad eval`` of a navigation checkpoint (exit status), else ``None``."""
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError:
        return None  # the supervised path reports it
    if ckpt.get("kind") != KIND:
        return None
    try:
        given = [f"--{d}" for d in ("data", "shots", "queries", "algorithm")
                 if getattr(args, d, None) is not None]  # fmt: skip
        trace = bool(getattr(args, "trace", None))
        if given or trace:
            raise ConfigError(
                f"{', '.join(given) or '--trace'} do(es) not apply to a navigation checkpoint; "
                f"it takes --tasks, --test-steps, --seed, --output, --no-plots, --json."
            )
        trainer = NavigationTrainer.from_checkpoint(
            ckpt, eval_tasks=args.tasks, test_steps=args.test_steps
        )
        out = prepare_eval_output(args.output) if args.output else None
        t0 = time.perf_counter()
        evaluation = trainer.evaluate(seed=args.seed)
        print(format_table(evaluation))
        if out is not None:
            write_results(trainer, out / "results.json", evaluation, time.perf_counter() - t0)
            if not args.no_plots:
                from metagrad.rl._plots import plot_navigation_returns

                plot_navigation_returns(evaluation, out / "navigation_returns.png")
            print(f"wrote {out / 'results.json'}")
        if args.json:
            print(json.dumps(evaluation))
    except (ConfigError, CheckpointError, ValueError, OSError, TypeError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"metagrad eval: error: {msg}", file=sys.stderr)
        return 2
    return 0
