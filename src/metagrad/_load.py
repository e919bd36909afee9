"""``metagrad.load``: what a ``metagrad train`` run trained, in one call.

A supervised run gives back its learner; a ``metagrad train navigation`` run its policies
(:class:`metagrad.rl.NavigationPolicy`, rebuilt by :meth:`NavigationTrainer.from_checkpoint
<metagrad.rl._train.NavigationTrainer.from_checkpoint>`, as ``metagrad eval`` does).

The checkpoint (``checkpoint.pt``, read with ``torch.load(weights_only=True)``) stores the run's
:class:`~metagrad.training.TrainConfig` and the learner's ``state_dict``; the learner is rebuilt
from the config exactly as ``metagrad train`` built it, then the weights are loaded. No data is
read: for image tasks the input channels (and, when the run kept the files' size, the image
size) come from the stored weights.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from metagrad.algorithms._base import Learner
    from metagrad.rl._trained import NavigationPolicy

_FN = "metagrad.load"


def _image_shape(cfg: Any, state: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` the run's conv-4 was built for, from its config and weights."""
    if cfg.task == "sinusoid":
        return None
    convs = [t for k, t in state.items() if k.startswith("module.") and t.dim() == 4]
    heads = [t for k, t in state.items() if k.startswith("module.") and t.dim() == 2]
    if not convs or not heads:
        raise ValueError(
            f"{_FN}: the checkpoint's weights hold no conv-4 network (task={cfg.task!r}); it was "
            f"not written by this version of `metagrad train`."
        )
    channels = int(convs[0].shape[1])
    if cfg.image_size:
        return channels, cfg.image_size, cfg.image_size
    # Kept the files' size: any side giving the stored head's input size builds the same model.
    side = max(1, math.isqrt(int(heads[-1].shape[1]) // cfg.hidden))
    return channels, 16 * side, 16 * side


def load(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> Learner | NavigationPolicy:
    """What ``metagrad train`` saved (a run folder or a checkpoint file): the meta-trained
    learner, or for ``metagrad train navigation`` the trained policies.

    The learner is the one the run trained (``MAML``, ``MetaSGD``, ``ANIL``, ``MAMLpp``,
    ``Reptile`` or ``IMAML``, with its inner learning rate, step counts and any learned rates),
    in eval mode; ``learner.module`` is the plain ``nn.Module`` with the meta-learned weights
    (no ``module.`` prefix to strip). Adapt it to your own tasks with ``learner.adapt(xs, ys)``
    and ``learner.predict(params, xq)``, or score a sampler with
    :func:`metagrad.training.evaluate`.

    A navigation run (``metagrad train navigation``) gives a
    :class:`metagrad.rl.NavigationPolicy`: ``policy.params`` (MAML's meta-learned Gaussian
    policy), ``policy.pretrained`` and ``policy.init`` (the baselines), ``policy.config``;
    ``policy.adapt(goals, steps)`` adapts it to new goals, ``policy.rollout(goals, n)`` runs
    it, ``policy.evaluate()`` is the evaluation ``metagrad eval`` prints. It runs on the CPU.

    Args:
        path: the run folder given to ``metagrad train --output`` (its ``checkpoint.pt``, or
            ``checkpoint.prev.pt`` if the last save was interrupted) or a checkpoint file.
        device: where to put the model (default CPU, whatever device the run used).

    Returns:
        The learner, in eval mode, on ``device``; or the navigation run's
        :class:`~metagrad.rl.NavigationPolicy`.

    Raises:
        metagrad.training.CheckpointError: no checkpoint there, not a metagrad checkpoint
            (neither a supervised nor a navigation run), or written by an incompatible version.
        ValueError: a navigation run with a ``device`` other than the CPU.

    Example:
        >>> import metagrad, torch
        >>> learner = metagrad.load("runs/sinusoid-maml")  # doctest: +SKIP
        >>> xs = torch.linspace(-5, 5, 10).view(10, 1)  # doctest: +SKIP
        >>> fast = learner.adapt(xs, 2 * torch.sin(xs - 1), steps=10)  # doctest: +SKIP
        >>> learner.predict(fast, xs).shape  # doctest: +SKIP
        torch.Size([10, 1])
    """
    from metagrad.rl._train import KIND as NAVIGATION
    from metagrad.training._build import make_learner, make_model
    from metagrad.training._checkpoint import CheckpointError, load_checkpoint
    from metagrad.training._config import TrainConfig

    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind")
    if kind == NAVIGATION:
        if torch.device(device).type != "cpu":
            raise ValueError(
                f"{_FN}: {str(path)!r} is a navigation run, which runs on the CPU only; drop "
                f"device={str(device)!r}."
            )
        from metagrad.rl._trained import NavigationPolicy

        try:
            return NavigationPolicy.from_checkpoint(ckpt)
        except CheckpointError as err:
            raise CheckpointError(f"{_FN}: {str(path)!r}: {err}") from None
    if kind is not None:
        raise CheckpointError(
            f"{_FN}: {str(path)!r} holds a checkpoint of kind {kind!r}, which this metagrad "
            f"version cannot load: it loads runs of `metagrad train` (the supervised tasks) and "
            f"`metagrad train navigation` ({NAVIGATION!r})."
        )
    stored = dict(ckpt.get("config", {}))
    try:
        cfg = TrainConfig(**stored).replace(device=str(device))
    except TypeError as err:
        raise CheckpointError(
            f"{_FN}: {str(path)!r} holds a config this metagrad version does not know ({err}); "
            f"load it with the metagrad version that wrote it "
            f"({ckpt.get('metagrad_version', 'unknown')})."
        ) from None
    state = ckpt.get("learner")
    if not isinstance(state, dict):
        raise CheckpointError(f"{_FN}: {str(path)!r} holds no learner weights.")
    learner = make_learner(cfg, make_model(cfg, _image_shape(cfg, state)))
    try:
        learner.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{_FN}: the weights in {str(path)!r} do not fit the model its config describes "
            f"({first}); was the checkpoint written by another metagrad version?"
        ) from None
    return learner.to(device).eval()
