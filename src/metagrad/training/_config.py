"""Run configuration: one flat dataclass, named presets, TOML/JSON files, CLI overrides.

Precedence, lowest first: the preset, the config file, then explicit command-line flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("sinusoid", "omniglot", "folder")
ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "imaml")
STRATEGIES = ("auto", "loop", "vmap", "hvp_chain", "checkpoint")
SCHEDULES = ("constant", "cosine")
INITS = ("torch", "maml")  # sinusoid MLP: nn.Linear default, or the MAML reference code's
MODELS = ("conv4", "vit")  # image tasks: the MAML paper's conv-4, or metagrad.models.vit


class ConfigError(ValueError):
    """An invalid configuration value, preset name or config file."""


@dataclass
class TrainConfig:
    """Everything that defines a meta-training run (stored in every checkpoint).

    The defaults are the MAML paper's sinusoid setup; see :data:`PRESETS` for the others.
    """

    task: str = "sinusoid"
    data: str | None = None
    algorithm: str = "maml"
    # task shape: training tasks; eval_* for the final test (None: same as training)
    n_way: int = 5
    shots: int = 10
    queries: int = 10
    eval_shots: int | None = None
    eval_queries: int | None = None
    # model (image tasks): conv-4 filters, image side, Omniglot rotations and split
    hidden: int = 64
    # sinusoid MLP initialisation: "torch" (nn.Linear default) or "maml" (reference code:
    # truncated normal std 0.01, zero biases); see metagrad.models.sinusoid_mlp
    init: str = "torch"
    model: str = "conv4"  # image tasks: "conv4" or "vit" (patch 7 at 28x28; ignored for sinusoid)
    image_size: int | None = None
    rotations: list[int] = field(default_factory=lambda: [0])
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    split_seed: int = 0
    # data-scaling ablation: keep this fraction of the training split's characters (classes),
    # a nested subset (a smaller fraction keeps a prefix of the same seeded order); val/test
    # are unchanged
    train_fraction: float = 1.0
    # inner loop
    inner_lr: float = 0.01
    inner_steps: int = 1
    test_steps: list[int] = field(default_factory=lambda: [0, 1, 5, 10])
    strategy: str = "auto"
    compile: bool = False
    first_order_steps: int | None = None
    # maml/fomaml: the meta-objective's weight of the query loss after each inner step
    # 1..inner_steps during meta-training (None: the last step only, as the MAML paper)
    step_weights: list[float] | None = None
    imaml_lam: float = 1.0
    cg_steps: int = 5
    # iMAML: solve (1 + d) I + H / lam instead of I + H / lam (a ReLU net's H can be indefinite)
    cg_damping: float = 0.0
    # iMAML: proximal strength of test-time adaptation (validation and test); None: imaml_lam,
    # 0: plain inner steps on the support loss (the iMAML reference code's evaluation)
    imaml_eval_lam: float | None = None
    # outer loop
    meta_lr: float = 1e-3
    meta_batch: int = 25
    iterations: int = 70_000
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    clip_grad: float | None = None
    nan_policy: str = "raise"  # or "skip": drop a meta-batch whose loss/meta-gradient is NaN/Inf
    seed: int = 0
    # bookkeeping
    val_every: int = 1000
    val_tasks: int = 100
    val_steps: int | None = None  # inner steps of validation (None: inner_steps, as trained)
    eval_tasks: int = 600
    log_every: int = 100
    checkpoint_every: int = 1000
    tensorboard: bool = False
    device: str = "cpu"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in checkpoints loaded with ``weights_only=True``)."""
        return dataclasses.asdict(self)

    @property
    def eval_steps(self) -> int:
        """Inner steps used by the learner in eval mode: the largest test step count."""
        return max(self.test_steps)

    @property
    def validation_steps(self) -> int:
        """Inner steps before the validation query loss: ``val_steps``, else ``inner_steps``.

        The training step count by default, so every algorithm validates where it was trained
        (Meta-SGD's learned rates can diverge at the largest test step count).
        """
        return self.inner_steps if self.val_steps is None else self.val_steps


PAPER = {
    # MAML paper, sinusoid K=5 test MSE after 1 / 5 / 10 steps (values as given in the issue).
    "sinusoid": {"metric": "mse", "shots": 5, "values": {1: 0.67, 5: 0.38, 10: 0.35}},
    # MAML paper Table 1, Omniglot (full 1200-character background set), accuracy %.
    "omniglot-5w1s": {"metric": "accuracy", "values": {3: 0.987}, "ci95": 0.004},
    "omniglot-20w1s": {"metric": "accuracy", "values": {5: 0.958}, "ci95": 0.003},
}

# Trained with K=10, tested with K=5 (100 query points per test task for a tight CI).
_SINUSOID: dict[str, Any] = {"eval_shots": 5, "eval_queries": 100}
_OMNIGLOT: dict[str, Any] = {
    "task": "omniglot",
    "n_way": 5,
    "shots": 1,
    "queries": 5,
    "eval_queries": 15,
    "image_size": 28,
    "rotations": [0, 90, 180, 270],
    "inner_lr": 0.4,
    "inner_steps": 1,
    "test_steps": [0, 1, 3],
    "meta_batch": 32,
    "meta_lr": 1e-3,
    "iterations": 60_000,
    "lr_schedule": "cosine",
    "val_every": 500,
    "log_every": 20,
    "checkpoint_every": 200,
}

PRESETS: dict[str, dict[str, Any]] = {
    # MAML paper: 1-40-40-1 ReLU, K=10, 1 step, alpha 0.01, Adam 1e-3, meta-batch 25, 70k its.
    "sinusoid": _SINUSOID,
    # The same cut to 10,000 iterations (results/sinusoid-maml-10k).
    "sinusoid-quick": {**_SINUSOID, "iterations": 10_000},
    # `make run`: the paper's network, alpha 0.01, K=10 / test K=5, Adam 1e-3, meta-batch 25,
    # but meta-trained on the query loss after 1 *and* after 5 inner steps (weights 0.5/0.5):
    # the paper's one-step objective drives the initialization past the step size's stability
    # limit (alpha * lambda_max > 2 on 5-shot tasks) and some tasks blow up after 3+ test steps;
    # see README "Reproduction results" and results/sinusoid-divergence.
    "sinusoid-multistep": {
        **_SINUSOID,
        "inner_steps": 5,
        "step_weights": [0.5, 0.0, 0.0, 0.0, 0.5],
        "iterations": 60_000,
        "val_every": 5000,
        "checkpoint_every": 5000,
    },
    # MAML paper Omniglot: conv-4 (64 filters), 1 train / 3 test steps, alpha 0.4, meta-batch 32.
    "omniglot-5w1s": _OMNIGLOT,
    # 20-way 1-shot: 5 steps, alpha 0.1, meta-batch 16 (MAML reference code).
    "omniglot-20w1s": {
        **_OMNIGLOT,
        "n_way": 20,
        "inner_lr": 0.1,
        "inner_steps": 5,
        "test_steps": [0, 1, 5],
        "meta_batch": 16,
    },
    # Any folder-per-class image set (mini-ImageNet layout): conv-4, 5-way 1-shot.
    "folder": {
        **_OMNIGLOT,
        "task": "folder",
        "image_size": None,
        "rotations": [0],
        "hidden": 32,
        "inner_lr": 0.01,
        "inner_steps": 5,
        "test_steps": [0, 1, 10],
        "meta_batch": 4,
        "iterations": 60_000,
    },
}
ALIASES = {"omniglot": "omniglot-5w1s"}


def preset(name: str) -> TrainConfig:
    """The named preset (``sinusoid``, ``sinusoid-quick``, ``omniglot``/``omniglot-5w1s``, ...)."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted([*PRESETS, *ALIASES])}.")
    return TrainConfig().replace(**PRESETS[key])


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (``.json``) file of :class:`TrainConfig` fields.

    A ``preset = "name"`` key selects the base preset; a ``[train]`` table may hold the fields.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist.")
    text = p.read_bytes()
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(text)
        elif p.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(
                        "reading TOML on Python 3.10 needs tomli: pip install tomli (or use JSON)."
                    ) from None
            raw = tomllib.loads(text.decode("utf-8"))
        else:
            raise ConfigError(f"config file {str(p)!r}: use a .toml or .json file.")
    except (ValueError, UnicodeDecodeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"config file {str(p)!r} is not valid: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a table/object of settings.")
    if isinstance(raw.get("train"), dict):
        raw = {**{k: v for k, v in raw.items() if k != "train"}, **raw["train"]}
    return raw


# Other spellings of a setting: ``k_shot`` (the flag is ``--k-shot``) is ``shots``.
KEY_ALIASES = {"k_shot": "shots"}


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """``cfg`` with ``values`` (field name -> value; ``-`` in names allowed) applied.

    Raises:
        ConfigError: an unknown key, or a value of the wrong type (naming key, value, type).
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for k, v in values.items():
        key = KEY_ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
        if key in changes:
            raise ConfigError(f"{source}: {key!r} is given twice (as {k!r} and its alias).")
        if key not in names:
            raise ConfigError(f"{source}: unknown setting {k!r}; known: {sorted(names)}.")
        problem = type_problem(key, v)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        changes[key] = v
    return cfg.replace(**changes)


_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
_DEFAULTS = TrainConfig().to_dict()
_EXPECTED = {"bool": "true or false (a boolean)", "int": "an integer", "float": "a number",
             "str": "a string", "list[int]": "a list of integers",
             "list[float]": "a list of numbers"}  # fmt: skip


def _is(kind: str, v: object) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind.startswith("list[") and isinstance(v, list):
        return all(_is(kind[5:-1], x) for x in v)
    return False


def type_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the setting ``name`` (wrong type), or None if its type fits.

    Checks the type only (``"5"`` for an int, ``"no"`` for a bool); ranges are :func:`validate`'s.
    """
    ann = _TYPES.get(name)
    if ann is None:
        return None
    optional = ann.endswith(" | None")
    kind = ann.removesuffix(" | None")
    if value is None and optional:
        return None
    if _is(kind, value):
        return None
    example = _DEFAULTS[name]
    if example is None or not _is(kind, example):
        example = {"int": 5, "float": 0.5, "str": "...", "bool": False}.get(kind, [])
    shown = json.dumps(example)
    return (
        f"{name}={value!r} has the wrong type: expected {_EXPECTED.get(kind, kind)}"
        f"{' or null/none' if optional else ''}, got {type(value).__name__}. Fix: write it like "
        f"{name} = {shown}."
    )


def _check_device(device: str) -> None:
    """A device that exists and holds data here, checked before any data is loaded."""
    if device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"device={device!r} is not a torch device. Fix: use 'cpu', 'cuda', 'cuda:1' or 'mps'."
        ) from None
    if dev.type == "meta":
        raise ConfigError(
            "device='meta' holds shapes only, no data: training and evaluation need a real "
            "device. Fix: use 'cpu' or 'cuda'."
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device!r} but this PyTorch sees no CUDA device (torch.cuda.is_available() "
                f"is False: a CPU-only build, or no GPU/driver). Fix: use --device cpu."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are "
                f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        return
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device={device!r} but MPS is not available here. Fix: use 'cpu'.")
        return
    try:
        torch.empty(1, device=dev)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"device={device!r} is not usable here ({first}). Fix: use 'cpu' or 'cuda'."
        ) from None


# conv-4's four 2x2 max-pools need at least 16 pixels a side.
MIN_IMAGE_SIZE = 16


def _check_int(name: str, v: object, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name}={v!r} must be an int >= {lo}.")


def _check_float(name: str, v: object, lo: float, *, strict: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (v < lo if not strict else v <= lo):  # type: ignore[operator]
        raise ConfigError(f"{name}={v!r} must be a finite number {'>' if strict else '>='} {lo}.")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field; raise :class:`ConfigError` naming the field and the fix.

    Types first (a config file's ``cg_steps = "5"`` or ``tensorboard = "no"``), then ranges,
    the device and the image size, all before any data is loaded.
    """
    for f in dataclasses.fields(TrainConfig):
        problem = type_problem(f.name, getattr(cfg, f.name))
        if problem:
            raise ConfigError(problem)
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not known; choose one of {list(TASKS)}.")
    if cfg.nan_policy not in ("raise", "skip"):
        raise ConfigError(f"nan_policy={cfg.nan_policy!r} must be 'raise' (default) or 'skip'.")
    if cfg.step_weights is not None:
        w = cfg.step_weights
        if cfg.algorithm not in ("maml", "fomaml"):
            raise ConfigError(
                f"step_weights applies to maml and fomaml; algorithm={cfg.algorithm!r} has "
                f"{'its own annealed multi-step loss' if cfg.algorithm == 'mamlpp' else 'none'}. "
                f"Fix: drop step_weights."
            )
        if (
            len(w) != cfg.inner_steps
            or not all(math.isfinite(x) and x >= 0 for x in w)
            or not sum(w) > 0
        ):
            raise ConfigError(
                f"step_weights={w!r} needs one finite weight >= 0 per inner step "
                f"(inner_steps={cfg.inner_steps}), not all zero, e.g. [0.5, 0, 0, 0, 0.5] for 5."
            )
    if cfg.compile and cfg.algorithm in ("reptile", "imaml"):
        raise ConfigError(
            f"compile=True applies to the MAML family; algorithm={cfg.algorithm!r} runs its own "
            f"loop. Drop --compile."
        )
    if not (math.isfinite(cfg.imaml_lam) and cfg.imaml_lam > 0 and cfg.cg_steps >= 1):
        raise ConfigError(
            f"imaml_lam={cfg.imaml_lam} must be a finite number > 0 and cg_steps={cfg.cg_steps} "
            f">= 1 (iMAML)."
        )
    _check_float("cg_damping", cfg.cg_damping, 0.0)
    if cfg.imaml_eval_lam is not None:
        _check_float("imaml_eval_lam", cfg.imaml_eval_lam, 0.0)
        if cfg.algorithm != "imaml":
            raise ConfigError(
                f"imaml_eval_lam applies to iMAML; algorithm={cfg.algorithm!r} adapts without a "
                f"proximal term. Fix: drop imaml_eval_lam (--imaml-eval-lam)."
            )
    if cfg.algorithm not in ALGORITHMS:
        raise ConfigError(
            f"algorithm={cfg.algorithm!r} is not known; choose one of {list(ALGORITHMS)}."
        )
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy={cfg.strategy!r} is not known; choose one of {list(STRATEGIES)}."
        )
    if cfg.lr_schedule not in SCHEDULES:
        raise ConfigError(f"lr_schedule={cfg.lr_schedule!r}: choose one of {list(SCHEDULES)}.")
    if cfg.init not in INITS:
        raise ConfigError(f"init={cfg.init!r} is not known; choose one of {list(INITS)}.")
    if cfg.init != "torch" and cfg.task != "sinusoid":
        raise ConfigError(
            f"init={cfg.init!r} applies to the sinusoid MLP only; task={cfg.task!r} uses its "
            f'model\'s own initialisation. Fix: drop init (or set init = "torch").'
        )
    if cfg.model not in MODELS:
        raise ConfigError(f"model={cfg.model!r} is not known; choose one of {list(MODELS)}.")
    for name in ("n_way", "shots", "queries", "hidden", "meta_batch", "iterations", "val_every",
                 "val_tasks", "eval_tasks", "log_every", "checkpoint_every"):  # fmt: skip
        _check_int(name, getattr(cfg, name), 1)
    for name in ("eval_shots", "eval_queries", "image_size"):
        if getattr(cfg, name) is not None:
            _check_int(name, getattr(cfg, name), 1)
    _check_int("inner_steps", cfg.inner_steps, 0)
    if cfg.val_steps is not None:
        _check_int("val_steps", cfg.val_steps, 0)
    _check_int("seed", cfg.seed, 0)
    _check_int("split_seed", cfg.split_seed, 0)
    if cfg.first_order_steps is not None:
        _check_int("first_order_steps", cfg.first_order_steps, 0)
    if not isinstance(cfg.test_steps, list) or not cfg.test_steps:
        raise ConfigError(f"test_steps={cfg.test_steps!r} must be a non-empty list of ints >= 0.")
    for s in cfg.test_steps:
        _check_int("test_steps entry", s, 0)
    _check_float("inner_lr", cfg.inner_lr, 0.0)
    _check_float("meta_lr", cfg.meta_lr, 0.0, strict=True)
    _check_float("min_lr", cfg.min_lr, 0.0)
    if cfg.clip_grad is not None:
        _check_float("clip_grad", cfg.clip_grad, 0.0, strict=True)
    if cfg.task != "sinusoid" and cfg.algorithm == "reptile" and cfg.inner_steps == 0:
        raise ConfigError("algorithm='reptile' needs inner_steps >= 1.")
    if cfg.task == "folder" and not cfg.data:
        raise ConfigError("task='folder' needs a data path: --data ROOT (ROOT/<class>/*.png).")
    if len(cfg.split) != 3 or min(cfg.split) < 0 or not 0.99 < sum(cfg.split) < 1.01:
        raise ConfigError(
            f"split={cfg.split!r} must be three fractions TRAIN,VAL,TEST >= 0 summing to 1, "
            f"e.g. [0.7, 0.1, 0.2]."
        )
    ok = isinstance(cfg.train_fraction, (int, float)) and not isinstance(cfg.train_fraction, bool)
    if not ok or not 0.0 < cfg.train_fraction <= 1.0:
        raise ConfigError(
            f"train_fraction={cfg.train_fraction!r} must be a number in (0, 1] (the fraction of "
            f"training characters kept, e.g. 0.5); 1 keeps them all."
        )
    if cfg.task == "sinusoid" and cfg.train_fraction != 1.0:
        raise ConfigError(
            f"train_fraction={cfg.train_fraction!r} applies to image tasks (omniglot, folder); "
            f"sinusoid tasks are drawn afresh. Fix: drop --train-fraction."
        )
    bad = [a for a in cfg.rotations if a % 90 != 0]
    if not cfg.rotations or bad or len({a % 360 for a in cfg.rotations}) != len(cfg.rotations):
        raise ConfigError(
            f"rotations={cfg.rotations!r} must be distinct multiples of 90, e.g. [0] (none) or "
            f"[0, 90, 180, 270]."
        )
    if cfg.task != "sinusoid" and cfg.image_size is not None and cfg.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"image_size={cfg.image_size} is too small for conv-4: its four 2x2 max-pools need "
            f"images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}. Fix: --image-size "
            f"{MIN_IMAGE_SIZE} or more (28 for Omniglot)."
        )
    _check_device(cfg.device)
    return cfg.replace(test_steps=sorted(set(cfg.test_steps)))
