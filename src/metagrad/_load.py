"""``metagrad.load``: the trained learner of a ``metagrad train`` run, in one call.

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


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Learner:
    """The meta-trained learner saved by ``metagrad train`` (a run folder or a checkpoint file).

    The learner is the one the run trained (``MAML``, ``MetaSGD``, ``ANIL``, ``MAMLpp``,
    ``Reptile`` or ``IMAML``, with its inner learning rate, step counts and any learned rates),
    in eval mode; ``learner.module`` is the plain ``nn.Module`` with the meta-learned weights
    (no ``module.`` prefix to strip). Adapt it to your own tasks with ``learner.adapt(xs, ys)``
    and ``learner.predict(params, xq)``, or score a sampler with
    :func:`metagrad.training.evaluate`.

    Args:
        path: the run folder given to ``metagrad train --output`` (its ``checkpoint.pt``, or
            ``checkpoint.prev.pt`` if the last save was interrupted) or a checkpoint file.
        device: where to put the model (default CPU, whatever device the run used).

    Returns:
        The learner, in eval mode, on ``device``.

    Raises:
        metagrad.training.CheckpointError: no checkpoint there, not a metagrad checkpoint, or
            written by an incompatible version.

    Example:
        >>> import metagrad, torch
        >>> learner = metagrad.load("runs/sinusoid-maml")  # doctest: +SKIP
        >>> xs = torch.linspace(-5, 5, 10).view(10, 1)  # doctest: +SKIP
        >>> fast = learner.adapt(xs, 2 * torch.sin(xs - 1), steps=10)  # doctest: +SKIP
        >>> learner.predict(fast, xs).shape  # doctest: +SKIP
        torch.Size([10, 1])
    """
    from metagrad.training._build import make_learner, make_model
    from metagrad.training._checkpoint import CheckpointError, load_checkpoint
    from metagrad.training._config import TrainConfig

    ckpt = load_checkpoint(path)
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
