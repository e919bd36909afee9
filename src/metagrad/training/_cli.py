"""``metagrad train`` and ``metagrad eval`` (registered by ``metagrad.cli``).

Errors print one line ``metagrad <cmd>: error: ...`` and return exit status 2; no traceback
(``metagrad --debug`` adds it). Omniglot is read from ``--data`` or, without it, from the
folder or zip named by the environment variable ``METAGRAD_DATA`` (:data:`DATA_ENV`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from metagrad._argtypes import (
    int_at_least,
    nonneg_float,
    number,
    positive_float,
    step_list,
    unit_fractions,
)
from metagrad._errors import NonFiniteError
from metagrad._perf import keep_freed_memory
from metagrad.algorithms._task import STRATEGIES
from metagrad.distributed import DistributedError, check_same_config, init_from_env
from metagrad.tasks import DatasetError, derive_seed
from metagrad.training._build import TEST_STREAM, make_sampler
from metagrad.training._checkpoint import CheckpointError, OutputWriteError, load_checkpoint
from metagrad.training._config import (
    ALGORITHMS,
    ALIASES,
    INITS,
    MODELS,
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    preset,
    read_config_file,
    validate,
)
from metagrad.training._evaluate import format_table
from metagrad.training._papers import paper_number, setting_name
from metagrad.training._report import make_plots, paper_reference, write_results
from metagrad.training._trainer import Trainer

_log = logging.getLogger("metagrad")
Subparsers = "argparse._SubParsersAction[argparse.ArgumentParser]"
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, NonFiniteError, ValueError, OSError,
               DistributedError)  # fmt: skip
DIST_TIMEOUT_S = 60.0  # default of --dist-timeout: well under gloo's 300 s for CPU jobs
# flag dest -> TrainConfig field (only flags given on the command line override).
TRAIN_FLAGS = {
    "data": "data", "algorithm": "algorithm", "iterations": "iterations", "seed": "seed",
    "meta_batch": "meta_batch", "inner_steps": "inner_steps", "inner_lr": "inner_lr",
    "meta_lr": "meta_lr", "strategy": "strategy", "n_way": "n_way", "k_shot": "shots",
    "queries": "queries", "eval_shots": "eval_shots", "eval_queries": "eval_queries",
    "test_steps": "test_steps", "eval_tasks": "eval_tasks", "clip_grad": "clip_grad",
    "lr_schedule": "lr_schedule", "val_every": "val_every", "log_every": "log_every",
    "checkpoint_every": "checkpoint_every", "hidden": "hidden", "image_size": "image_size",
    "device": "device", "tensorboard": "tensorboard", "split": "split", "val_tasks": "val_tasks",
    "compile": "compile", "imaml_lam": "imaml_lam", "cg_steps": "cg_steps", "cg_damping": "cg_damping", "nan_policy": "nan_policy",
    "imaml_eval_lam": "imaml_eval_lam",
    "model": "model", "val_steps": "val_steps", "init": "init",
    "step_weights": "step_weights", "train_fraction": "train_fraction",
}  # fmt: skip
DATA_ENV = "METAGRAD_DATA"  # Omniglot location when --data is not given
_pos_int, _nonneg_int = int_at_least(1), int_at_least(0)


def default_omniglot_path() -> str | None:
    """The Omniglot location named by ``$METAGRAD_DATA``, or None when it is unset or empty.

    Never a path guessed from the package's own location: an installed package looks only where
    it is told.
    """
    return os.environ.get(DATA_ENV) or None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _fail(cmd: str, err: BaseException, debug: bool = False) -> int:
    if debug:  # `metagrad --debug ...`
        traceback.print_exception(err)
    print(f"metagrad {cmd}: error: {_one_line(err)}", file=sys.stderr)
    return 2


class _StderrHandler(logging.Handler):
    """The library's log records as ``metagrad <cmd>: warning: ...`` lines on (current) stderr."""

    def __init__(self, cmd: str, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.cmd = cmd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            prefix = f"metagrad {self.cmd}: " + ("" if level == "info" else f"{level}: ")
            sys.stderr.write(prefix + record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - never let logging break a run
            self.handleError(record)


def log_level(args: argparse.Namespace) -> int:
    """``--quiet``: errors only; ``--verbose``: debug records too; else warnings and notes."""
    if getattr(args, "quiet", False):
        return logging.ERROR
    return logging.DEBUG if getattr(args, "verbose", False) else logging.INFO


@contextmanager
def cli_logging(cmd: str, level: int = logging.INFO) -> Iterator[None]:
    """Show the ``metagrad`` logger's records of ``level`` and above during one CLI command.

    Nested use (``metagrad.cli`` around a subcommand that sets up its own) keeps the outer one.
    """
    logger = logging.getLogger("metagrad")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        yield
        return
    handler = _StderrHandler(cmd, level)
    old_level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = propagate


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Preset, then ``--config`` file, then explicit flags; validated."""
    file_values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    in_file = file_values.pop("preset", None)
    if args.preset and in_file is not None and in_file != args.preset:
        raise ConfigError(
            f"the preset is named twice: {args.preset!r} on the command line and {in_file!r} in "
            f"config file {args.config!r}. Fix: drop one of them."
        )
    name = args.preset or in_file
    if name is None and args.resume and args.output and not file_values:
        # `train --resume --output DIR`: the run's own settings, then the flags.
        stored = load_checkpoint(args.output).get("config", {})
        file_values, name = stored, "sinusoid"
    if name is None:
        raise ConfigError(
            f"name a preset or task (one of {sorted([*PRESETS, *ALIASES])}) or give a --config "
            f'file with preset = "...".'
        )
    cfg = preset(name)
    cfg = apply_overrides(cfg, file_values, f"config file {args.config!r}")
    flags = {field: getattr(args, dest) for dest, field in TRAIN_FLAGS.items()}
    cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None}, "command line")
    if cfg.task == "omniglot" and not cfg.data:
        cfg = cfg.replace(data=default_omniglot_path())
        if cfg.data is None:
            raise ConfigError(
                f"no Omniglot data given: pass --data PATH (an Omniglot zip, a folder of zips, or "
                f"an extracted folder), or set the environment variable {DATA_ENV}=PATH."
            )
    if cfg.data:
        cfg = cfg.replace(data=str(Path(cfg.data).expanduser().resolve()))
    return validate(cfg)


def _own_paper(cfg: Any, shots: int) -> str | None:
    """What a non-MAML algorithm's own paper reports for this setting (the table's paper
    column is MAML's), e.g. ``99.16% +- 0.35% (Rajeswaran et al. 2019, iMAML-GD)``; or None."""
    if cfg.algorithm == "maml":
        return None
    setting = setting_name({"task": cfg.task, "n_way": cfg.n_way}, shots)
    own = paper_number(cfg.algorithm, setting)
    return None if own is None else own.text(cfg.task == "omniglot", pm="+-")


def _finish(
    trainer: Trainer, out: Path | None, cmd: str, train_time: float | None, plots: bool = True
) -> Any:
    """Evaluate, print the table, write results.json and plots; returns the evaluation."""
    t0 = time.perf_counter()
    result = trainer.evaluate()
    eval_time = time.perf_counter() - t0
    paper = paper_reference(trainer.cfg, result)
    cfg = trainer.cfg
    title = f"{cfg.algorithm} on {cfg.task}, {trainer.iteration} meta-iterations"
    if result.split != "test":
        title += f", tasks of the {result.split} split's classes"
    if train_time is not None:
        title += f" ({train_time:.0f} s training)"
    print(title)
    print(format_table(result, paper))
    if paper is not None:
        print("(paper: MAML, Finn et al. 2017)")
    own = _own_paper(cfg, result.shots)
    if own is not None:
        print(f"({cfg.algorithm}'s own paper: {own})")
    if out is None:
        return result
    try:
        write_results(out / "results.json", cfg, result, iteration=trainer.iteration,
                      train_time_s=train_time, eval_time_s=eval_time,
                      config_changes=trainer.config_changes)  # fmt: skip
    except OSError as err:
        saved = (
            f"the checkpoint of iteration {trainer.iteration} is saved in {str(out)!r}; "
            if cmd == "train"
            else ""
        )
        e = OutputWriteError(
            f"could not write {str(out / 'results.json')!r} ({err.strerror or err}); {saved}the "
            f"table above is the result. Fix: free space, then rerun the evaluation with "
            f"`metagrad eval {out if cmd == 'train' else '<checkpoint>'}`."
        )
        e.errno = err.errno
        raise e from err
    made = []
    try:
        made = make_plots(trainer, out) if plots else []
    except ImportError as err:
        _log.info("note: plots skipped: %s", _one_line(err))
    print(f"wrote {out / 'results.json'}" + "".join(f", {p.name}" for p in made))
    return result


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``metagrad train``."""
    from metagrad.rl._cli import maybe_run_navigation  # the RL task has its own trainer

    status = maybe_run_navigation(args)
    if status is not None:
        return status
    with cli_logging("train", log_level(args)):
        return _run_train(args)


def _run_train(args: argparse.Namespace) -> int:
    keep_freed_memory()  # long run: reuse activation pages instead of re-faulting them
    try:
        cfg = build_config(args)
        out = Path(args.output) if args.output else Path("runs") / f"{cfg.task}-{cfg.algorithm}"
        # torchrun: join the process group (gloo on CPU); a hung or dead rank ends the others
        # within --dist-timeout seconds instead of gloo's 300 s default.
        rank, world = init_from_env(timeout_s=args.dist_timeout)
        if world > 1:
            check_same_config(cfg.to_dict())
            if cfg.meta_batch < world:
                raise ConfigError(
                    f"meta_batch={cfg.meta_batch} is smaller than the world size {world}; every "
                    f"rank needs a task. Raise --meta-batch or use fewer processes."
                )
            if cfg.algorithm in ("reptile", "imaml"):
                raise ConfigError(
                    f"algorithm={cfg.algorithm!r} is not distributed yet; use the MAML family."
                )
        if args.allow_config_change and not args.resume:
            raise ConfigError("--allow-config-change applies to --resume only.")
        trainer = Trainer(
            cfg, out, resume=args.resume, overwrite=args.overwrite,
            progress=not args.no_progress, writer=rank == 0,
            allow_config_change=args.allow_config_change,
        )  # fmt: skip
        try:
            trainer.train()
        except KeyboardInterrupt:
            if rank == 0:  # the writer; the other ranks stopped at the same iteration
                print(
                    f"metagrad train: interrupted at iteration {trainer.iteration}; checkpoint "
                    f"saved in {out}. Continue with --resume --output {out}.",
                    file=sys.stderr,
                )
            return 130
        if rank == 0:  # only rank 0 reports and writes
            _finish(trainer, out, "train", trainer.elapsed, plots=not args.no_plots)
    except USER_ERRORS as err:
        return _fail("train", err, getattr(args, "debug", False))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``metagrad eval``."""
    from metagrad.rl._cli import maybe_eval_navigation  # the RL task has its own evaluation

    status = maybe_eval_navigation(args)
    if status is not None:
        return status
    with cli_logging("eval", log_level(args)):
        return _run_eval(args)


def _run_eval(args: argparse.Namespace) -> int:
    keep_freed_memory()
    try:
        overrides: dict[str, Any] = {}
        for dest, field in (("data", "data"), ("tasks", "eval_tasks"), ("shots", "eval_shots"),
                            ("queries", "eval_queries"), ("device", "device"),
                            ("imaml_eval_lam", "imaml_eval_lam")):  # fmt: skip
            if getattr(args, dest) is not None:
                overrides[field] = getattr(args, dest)
        if "data" in overrides:
            overrides["data"] = str(Path(overrides["data"]).expanduser().resolve())
        trainer = Trainer.from_checkpoint(args.checkpoint, overrides=overrides)
        if args.algorithm is not None and args.algorithm != trainer.cfg.algorithm:
            raise CheckpointError(
                f"{args.checkpoint!r} was trained with algorithm {trainer.cfg.algorithm!r}, not "
                f"{args.algorithm!r}."
            )
        split = args.eval_split or "test"
        if split != "test" and trainer.cfg.task == "sinusoid":
            raise ConfigError(
                f"metagrad eval: --eval-split {split} needs a task with class splits; sinusoid "
                f"tasks all come from one distribution. Drop --eval-split."
            )
        if args.seed is not None or split != "test":
            seed = trainer.cfg.seed if args.seed is None else args.seed
            trainer.samplers["test"] = make_sampler(
                trainer.cfg, trainer.splits, split, seed=derive_seed(seed, TEST_STREAM),
                eval_sizes=True,
            )  # fmt: skip
        trainer.eval_split = split
        if args.test_steps is not None:
            trainer.cfg = trainer.cfg.replace(test_steps=sorted(set(args.test_steps)))
        out = None
        if args.output:
            from metagrad.training._trainer import prepare_eval_output

            out = prepare_eval_output(args.output)
        result = _finish(trainer, out, "eval", None, plots=not args.no_plots)
        if args.trace:
            _write_trace(trainer, out, args.trace, plots=not args.no_plots)
        if args.json:  # the evaluation above, not a second one
            print(json.dumps(result.to_dict()))
    except USER_ERRORS as err:
        return _fail("eval", err, getattr(args, "debug", False))
    return 0


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``metagrad compare`` on ``subparsers``; sets ``handler``."""
    p = subparsers.add_parser(
        "compare",
        help="finished runs side by side: one Markdown table of their test results",
        description="One row per run folder (its results.json): algorithm, iterations, "
        "training time, the test metric after each inner-step count, the algorithm's own "
        "paper's number.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their results.json)")
    p.add_argument("--steps", type=step_list, help="only these inner-step columns, e.g. 1,3")
    p.set_defaults(handler=run_compare)
    return p  # type: ignore[no-any-return]


def run_compare(args: argparse.Namespace) -> int:
    """``metagrad compare``: print :func:`metagrad.training._compare.compare_table`."""
    from metagrad.training._compare import compare_table, load_run

    try:
        print(compare_table([load_run(r) for r in args.runs], args.steps))
    except USER_ERRORS as err:
        return _fail("compare", err, getattr(args, "debug", False))
    return 0


def _write_trace(trainer: Trainer, out: Path | None, tasks: int, *, plots: bool) -> None:
    """Inner-loop trace of ``tasks`` test tasks: trace.csv (+ trace.png) in ``out``."""
    from metagrad.viz import inner_trace, plot_trace, write_trace_csv

    if out is None:
        raise ConfigError("--trace needs --output DIR for trace.csv and trace.png.")
    if trainer.cfg.algorithm == "imaml":
        raise ConfigError("--trace follows the learner's own inner loop; iMAML's is implicit.")
    batch = trainer.samplers["test"].sample(tasks).to(trainer.cfg.device)
    rows = inner_trace(trainer.learner, *batch, steps=max(trainer.cfg.test_steps))  # type: ignore[arg-type]
    write_trace_csv(rows, out / "trace.csv")
    written = ["trace.csv"]
    if plots:
        try:
            plot_trace(
                rows, out / "trace.png", title=f"{trainer.cfg.algorithm} on {trainer.cfg.task}"
            )
            written.append("trace.png")
        except ImportError as err:
            _log.info("note: trace.png skipped: %s", _one_line(err))
        except Exception as err:  # trace.csv is written; a picture never fails the command
            _log.warning("trace.png skipped: %s: %s", type(err).__name__, _one_line(err))
    print(f"wrote {out / written[0]}" + (f", {written[1]}" if len(written) > 1 else ""))


def _weights(text: str) -> list[float]:
    """``0.5,0,0,0,0.5`` -> a list of finite numbers >= 0."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers, e.g. 0.5,0,0,0,0.5"
        ) from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every weight must be a finite number >= 0")
    return values


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``metagrad train`` on ``subparsers``; sets ``handler``."""
    names = sorted([*PRESETS, *ALIASES, "navigation"])
    p = subparsers.add_parser(
        "train",
        help="meta-train a preset (sinusoid, omniglot, folder...) and evaluate it",
        description=(
            "Meta-train, evaluate on 600 test tasks, write checkpoint.pt, metrics.csv, "
            "results.json and plots to --output. Settings: preset < --config file < flags."
        ),
    )
    p.add_argument("preset", nargs="?", metavar="PRESET", help=f"one of {', '.join(names)}")
    p.add_argument("--config", help="TOML or JSON file of settings (may name preset = ...)")
    p.add_argument(
        "--data",
        help="dataset: Omniglot zip / folder of zips / extracted folder, or ROOT/<class>/*.png "
        f"(Omniglot default: ${DATA_ENV})",
    )
    p.add_argument("--algorithm", choices=ALGORITHMS, help="meta-learning algorithm (default maml)")
    p.add_argument("--iterations", type=_pos_int, help="meta-iterations")
    p.add_argument("--seed", type=_nonneg_int, help="run seed (model init and task streams)")
    p.add_argument("--output", help="run folder (default runs/<task>-<algorithm>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --output")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in --output (else refused)"
    )
    p.add_argument(
        "--allow-config-change", action="store_true",
        help="with --resume: continue under changed settings (else refused, listing them); "
        "the changes are recorded in the checkpoint and results.json",
    )  # fmt: skip
    p.add_argument("--meta-batch", type=_pos_int, help="tasks per meta-update")
    p.add_argument("--inner-steps", type=_nonneg_int, help="inner steps during meta-training")
    p.add_argument("--inner-lr", type=number, help="inner learning rate alpha")
    p.add_argument("--meta-lr", type=number, help="Adam learning rate beta")
    p.add_argument("--strategy", choices=STRATEGIES, help="meta-gradient strategy")
    p.add_argument("--n-way", type=_pos_int, help="classes per task")
    p.add_argument(
        "--k-shot", "--shots", dest="k_shot", type=_pos_int,
        help="support examples per class (per task for sinusoid); config key shots (or k_shot)",
    )  # fmt: skip
    p.add_argument("--queries", type=_pos_int, help="query examples per class during training")
    p.add_argument("--eval-shots", type=_pos_int, help="support examples at test time")
    p.add_argument("--eval-queries", type=_pos_int, help="query examples at test time")
    p.add_argument(
        "--test-steps", type=step_list, help="inner step counts scored at test, e.g. 0,1,5,10"
    )
    p.add_argument("--eval-tasks", type=_pos_int, help="test tasks (default 600)")
    p.add_argument("--clip-grad", type=number, help="clip the meta-gradient norm")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"))
    p.add_argument("--val-every", type=_pos_int, help="validate every N iterations")
    p.add_argument("--val-tasks", type=_pos_int, help="validation tasks")
    p.add_argument(
        "--val-steps", type=_nonneg_int,
        help="inner steps before the validation loss (default: --inner-steps, as trained)",
    )  # fmt: skip
    p.add_argument("--log-every", type=_pos_int)
    p.add_argument("--checkpoint-every", type=_pos_int)
    p.add_argument("--hidden", type=_pos_int, help="conv-4 filters")
    p.add_argument(
        "--model", choices=MODELS,
        help="image tasks: conv4 (the MAML paper's, default) or vit (metagrad.models.vit)",
    )  # fmt: skip
    p.add_argument(
        "--step-weights", type=_weights, metavar="W1,...,WK",
        help="maml/fomaml: meta-objective weight of the query loss after each inner step "
        "(one per --inner-steps; default: the last step only), e.g. 0.5,0,0,0,0.5",
    )  # fmt: skip
    p.add_argument(
        "--init", choices=INITS,
        help="sinusoid MLP initialisation: torch (nn.Linear default) or maml (reference code: "
        "truncated normal std 0.01, zero biases)",
    )  # fmt: skip
    p.add_argument("--image-size", type=_pos_int, help="resize images to N x N")
    p.add_argument("--split", type=unit_fractions, help="class split fractions TRAIN,VAL,TEST")
    p.add_argument(
        "--train-fraction", type=positive_float, metavar="F",
        help="keep this fraction (0, 1] of the training characters, nested across fractions "
        "(data-scaling ablation; validation and test unchanged)",
    )  # fmt: skip
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument(
        "--tensorboard", action="store_const", const=True, help="also log to TensorBoard"
    )
    p.add_argument(
        "--compile", action="store_const", const=True,
        help="torch.compile the vmapped meta-gradient (MLPs; ~40 s once, then ~5x faster)",
    )  # fmt: skip
    p.add_argument(
        "--nan-policy", choices=("raise", "skip"),
        help="on NaN/Inf: stop with an error naming task/step (default) or skip the meta-batch",
    )  # fmt: skip
    p.add_argument("--imaml-lam", type=positive_float, help="iMAML proximal strength lambda")
    p.add_argument("--cg-steps", type=_pos_int, help="iMAML conjugate-gradient steps")
    p.add_argument(
        "--cg-damping", type=nonneg_float, metavar="D",
        help="iMAML: solve (1 + D) I + H / lambda (default 0; > 0 where the support Hessian "
        "is indefinite and CG fails)",
    )  # fmt: skip
    _add_eval_lam_flag(p)
    p.add_argument(
        "--dist-timeout", type=positive_float, default=DIST_TIMEOUT_S, metavar="SECONDS",
        help=f"torchrun: seconds a rank waits for the others in a collective before it stops "
        f"with an error (default {DIST_TIMEOUT_S:g})",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    from metagrad.rl._cli import add_navigation_flags

    add_navigation_flags(p)
    p.set_defaults(handler=run_train)
    return p  # type: ignore[no-any-return]


def _add_eval_lam_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--imaml-eval-lam", type=nonneg_float, metavar="L",
        help="iMAML: proximal strength of test-time adaptation (default: --imaml-lam; 0 adapts "
        "without the proximal term, as the iMAML reference code evaluates)",
    )  # fmt: skip


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``metagrad eval`` on ``subparsers``; sets ``handler``."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a training checkpoint on test tasks",
        description="Mean and 95% CI over test tasks after each test step count.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt or its run folder")
    p.add_argument("--data", help="dataset location, if it moved since training")
    p.add_argument("--tasks", type=_pos_int, help="test tasks (default: the run's, 600)")
    p.add_argument("--test-steps", type=step_list, help="inner step counts, e.g. 0,1,5,10")
    p.add_argument("--shots", type=_pos_int, help="support examples at test time")
    p.add_argument("--queries", type=_pos_int, help="query examples at test time")
    p.add_argument("--seed", type=_nonneg_int, help="seed of the test task stream")
    p.add_argument(
        "--eval-split",
        choices=("test", "val", "train"),
        help="draw the tasks from this split's classes (default test; train: the meta-training "
        "classes at the test's shots and queries, to measure the generalization gap)",
    )
    _add_eval_lam_flag(p)
    p.add_argument("--algorithm", choices=ALGORITHMS, help="assert the checkpoint's algorithm")
    p.add_argument("--device", help="torch device")
    p.add_argument("--output", help="folder for results.json and plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--trace", type=_pos_int, default=0, metavar="N",
        help="also trace the inner loop on N test tasks: trace.csv and trace.png in --output",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=run_eval)
    return p  # type: ignore[no-any-return]
