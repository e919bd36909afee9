"""From a :class:`TrainConfig` to task samplers, model and learner."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metagrad.algorithms import ANIL, IMAML, MAML, MAMLpp, MetaSGD, Reptile
from metagrad.algorithms._task import InnerSpec
from metagrad.models import conv4, sinusoid_mlp, vit
from metagrad.tasks import (
    DatasetError,
    FewShotTasks,
    ImageClasses,
    SinusoidTasks,
    TaskBatch,
    derive_seed,
    keep_fraction,
    load_image_folder,
    load_omniglot,
)
from metagrad.training._config import MIN_IMAGE_SIZE, ConfigError, TrainConfig

# Streams of derive_seed(cfg.seed, stream).
MODEL_STREAM, TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 0, 1, 2, 3


class Sampler(Protocol):
    def sample(self, tasks: int) -> TaskBatch: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


AnySampler = Union[SinusoidTasks, FewShotTasks]  # noqa: UP007 (runtime alias on 3.10)


@dataclass
class Splits:
    """Data of the three splits (images for classification, None for sinusoid)."""

    train: ImageClasses | None = None
    val: ImageClasses | None = None
    test: ImageClasses | None = None

    def get(self, name: str) -> ImageClasses:
        data = getattr(self, name)
        if data is None:  # pragma: no cover - only image tasks call this
            raise ValueError(f"no {name} split")
        result: ImageClasses = data
        return result


def load_splits(cfg: TrainConfig) -> Splits:
    """Read the dataset of ``cfg`` (nothing for sinusoid)."""
    if cfg.task == "sinusoid":
        return Splits()
    if not cfg.data:
        raise ConfigError(f"task={cfg.task!r} needs a data path: pass --data PATH.")
    if not Path(cfg.data).exists():
        raise DatasetError(
            f"data path {cfg.data!r} does not exist. Fix: pass --data with "
            + (
                "an Omniglot zip, a folder of zips or an extracted Omniglot folder."
                if cfg.task == "omniglot"
                else "a folder laid out as ROOT/<class>/*.png|jpg."
            )
        )
    split = (cfg.split[0], cfg.split[1], cfg.split[2]) if len(cfg.split) == 3 else (0.0, 0.0, 0.0)
    if cfg.task == "omniglot":
        om = load_omniglot(
            cfg.data,
            image_size=cfg.image_size or 28,
            split=split,
            split_seed=cfg.split_seed,
            rotations=cfg.rotations,
            train_fraction=cfg.train_fraction,
        )
        return Splits(om.train, om.val, om.test)
    data = load_image_folder(cfg.data, image_size=cfg.image_size)
    if len(cfg.split) != 3 or min(cfg.split) < 0 or not 0.99 < sum(cfg.split) < 1.01:
        raise ConfigError(f"split={cfg.split!r} must be three fractions >= 0 summing to 1.")
    perm = np.random.default_rng(cfg.split_seed).permutation(data.num_classes)
    n_tr = round(cfg.split[0] * data.num_classes)
    n_va = round(cfg.split[1] * data.num_classes)
    parts = [
        sorted(int(i) for i in p)
        for p in (perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :])
    ]
    parts[0] = keep_fraction(parts[0], cfg.train_fraction, cfg.split_seed)
    out = [data.subset(p).with_rotations(cfg.rotations) for p in parts]
    return Splits(*out)


def make_sampler(
    cfg: TrainConfig, splits: Splits, split: str, *, seed: int, eval_sizes: bool | None = None
) -> AnySampler:
    """The task sampler of ``split`` ("train", "val" or "test").

    ``eval_sizes``: tasks of the evaluation's shots and queries (default: for every split but
    "train"); ``metagrad eval --eval-split train`` scores training classes at the test sizes.
    """
    train = not eval_sizes if eval_sizes is not None else split == "train"
    shots = cfg.shots if train or cfg.eval_shots is None else cfg.eval_shots
    queries = cfg.queries if train or cfg.eval_queries is None else cfg.eval_queries
    if cfg.task == "sinusoid":
        return SinusoidTasks(shots, queries, seed=seed)
    data = splits.get(split)
    if not train and data.num_classes:
        _check_eval_sizes(cfg, data, split, shots, queries)
    try:
        return FewShotTasks(data, cfg.n_way, shots, queries, seed=seed)
    except DatasetError as err:
        raise DatasetError(f"{split} split: {err}") from None


def _check_eval_sizes(
    cfg: TrainConfig, data: ImageClasses, split: str, shots: int, queries: int
) -> None:
    """Validation/test tasks too large for the split, naming the settings actually used there."""
    sizes = data.class_sizes()
    smallest = int(sizes.min())
    if shots + queries <= smallest:
        return
    name = data.names[int(sizes.argmin())]
    terms = [
        "eval_shots" if cfg.eval_shots is not None else "shots (--k-shot; no --eval-shots given)",
        "eval_queries" if cfg.eval_queries is not None else "queries (no --eval-queries given)",
    ]
    raise DatasetError(
        f"{split} split: {terms[0]} + {terms[1]} = {shots} + {queries} = {shots + queries} images "
        f"per class are needed but class {name!r} has {smallest}. Fix: make them sum to at most "
        f"{smallest} (metagrad train: --eval-shots/--eval-queries; metagrad eval: "
        f"--shots/--queries)."
    )


def make_samplers(cfg: TrainConfig, splits: Splits) -> dict[str, AnySampler]:
    streams = {"train": TRAIN_STREAM, "val": VAL_STREAM, "test": TEST_STREAM}
    return {
        name: make_sampler(cfg, splits, name, seed=derive_seed(cfg.seed, s))
        for name, s in streams.items()
    }


def make_model(cfg: TrainConfig, image_shape: tuple[int, int, int] | None) -> nn.Module:
    """The MAML paper's network for ``cfg.task``, initialised from ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, MODEL_STREAM))
        if cfg.task == "sinusoid":
            model: nn.Module = sinusoid_mlp(init=cfg.init)
        else:
            if image_shape is None:  # pragma: no cover - guarded by load_splits
                raise ValueError("image tasks need the image shape")
            c, h, w = image_shape
            if h != w:
                raise ConfigError(
                    f"images are {h}x{w} but conv-4 needs square images; pass --image-size N."
                )
            if h < MIN_IMAGE_SIZE:
                raise ConfigError(
                    f"images are {h}x{w} but conv-4's four 2x2 max-pools need at least "
                    f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}; pass --image-size {MIN_IMAGE_SIZE} or more."
                )
            if cfg.model == "vit":
                model = _vit(cfg, c, h)
            else:
                model = conv4(cfg.n_way, in_channels=c, hidden=cfg.hidden, image_size=h)
    return model.to(cfg.device)


def _vit(cfg: TrainConfig, channels: int, size: int) -> nn.Module:
    """``metagrad.models.vit``: 7x7 patches where the side allows (28: 16 patches), else 4x4."""
    patch = next((p for p in (7, 4, 2) if size % p == 0), None)
    if patch is None:
        raise ConfigError(
            f"images are {size}x{size} but the ViT cuts them into 7x7, 4x4 or 2x2 patches; "
            f"pass --image-size 28 (or any multiple of 4 or 7)."
        )
    return vit(cfg.n_way, in_channels=channels, image_size=size, patch=patch)


def head_name(model: nn.Module) -> str:
    """Module name of the model's last ``nn.Linear`` (the head ANIL adapts)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError("algorithm='anil' needs a model whose head is an nn.Linear.")
    return names[-1]


class StepWeightedMAML(MAML):
    """MAML whose meta-objective is a weighted sum of the query losses after each inner step.

    ``step_weights[k - 1]`` weighs the query loss after step ``k`` (meta-training only; the
    weights enter the compiled meta-gradient as a tensor, so they cost no recompilation).
    ``[0.5, 0, 0, 0, 0.5]`` with 5 inner steps trains for one step and for five at once.
    """

    def __init__(self, *args: Any, step_weights: Sequence[float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_weights = tuple(float(w) for w in step_weights)
        if len(self.step_weights) != self.inner_steps:
            raise ConfigError(
                f"step_weights has {len(self.step_weights)} entries for {self.inner_steps} "
                f"inner steps."
            )

    def inner_spec(self, steps: int, order: int, *, training: bool) -> InnerSpec:
        spec = super().inner_spec(steps, order, training=training)
        if training and steps == len(self.step_weights):
            spec = dataclasses.replace(spec, step_weights=self.step_weights)
        return spec


def make_learner(cfg: TrainConfig, model: nn.Module) -> MAML | Reptile | IMAML:
    """The learner named by ``cfg.algorithm`` around ``model``."""
    loss = F.mse_loss if cfg.task == "sinusoid" else F.cross_entropy
    a = cfg.algorithm
    if a == "reptile":
        return Reptile(model, loss, cfg.inner_lr, cfg.inner_steps, eval_steps=cfg.eval_steps)
    if a == "imaml":
        return IMAML(
            model, loss, cfg.inner_lr, cfg.inner_steps, lam=cfg.imaml_lam,
            cg_steps=cfg.cg_steps, cg_damping=cfg.cg_damping, eval_steps=cfg.eval_steps,
            eval_lam=cfg.imaml_eval_lam,
        )  # fmt: skip
    kwargs: dict[str, Any] = {
        "eval_steps": cfg.eval_steps, "strategy": cfg.strategy, "compile": cfg.compile,
    }  # fmt: skip
    if cfg.first_order_steps is not None:
        kwargs["first_order_steps"] = cfg.first_order_steps
    args = (model, loss)
    if a in ("maml", "fomaml"):
        order = 2 if a == "maml" else 1
        if cfg.step_weights is not None:
            return StepWeightedMAML(
                *args, cfg.inner_lr, cfg.inner_steps, order,
                step_weights=cfg.step_weights, **kwargs,
            )  # fmt: skip
        return MAML(*args, cfg.inner_lr, cfg.inner_steps, order, **kwargs)
    if a == "metasgd":
        return MetaSGD(*args, cfg.inner_lr, cfg.inner_steps, **kwargs)
    if a == "anil":
        return ANIL(*args, head_name(model), cfg.inner_lr, cfg.inner_steps, **kwargs)
    if a == "mamlpp":
        return MAMLpp(*args, cfg.inner_lr, cfg.inner_steps, **kwargs)
    raise ConfigError(f"algorithm={a!r} is not known.")  # pragma: no cover - validated earlier


def image_shape(splits: Splits) -> tuple[int, int, int] | None:
    return None if splits.train is None else splits.train.image_shape
