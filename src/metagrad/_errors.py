"""Errors that teach: every message names the public function, the value and the fix."""

from __future__ import annotations

from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in the inner loop or in the meta-gradient.

    Attributes:
        task: index of the task in the meta-batch (None when not task-specific).
        step: inner step at which it appeared (None for the query loss / meta-gradient).
        where: what was non-finite (``"support loss"``, ``"gradient of 'fc.weight'"``...).
    """

    def __init__(self, fn_name: str, where: str, task: int | None, step: int | None) -> None:
        self.task, self.step, self.where = task, step, where
        loc = []
        if task is not None:
            loc.append(f"task {task}")
        if step is not None:
            loc.append(f"inner step {step}")
        at = " at " + ", ".join(loc) if loc else ""
        super().__init__(
            f"{fn_name}: non-finite value (NaN/Inf) in the {where}{at}. Usual fixes: lower "
            f"inner_lr (the inner loop diverged), check that task {task if task is not None else ''} "
            f"data has no NaN/Inf, clip or normalise inputs; with inner_optimizer='adam' keep eps > 0."
        )


def check_finite(fn_name: str, t: Tensor, where: str, task: int | None, step: int | None) -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds a NaN or Inf."""
    if not bool(t.detach().isfinite().all()):
        raise NonFiniteError(fn_name, where, task, step)


def translate_autograd_error(fn_name: str, err: RuntimeError, order: int) -> Exception | None:
    """Turn PyTorch's cryptic double-backward failures into an explanation; None if unknown."""
    msg = str(err)
    if "modified by an inplace operation" in msg:
        return RuntimeError(
            f"{fn_name}: the model's forward modifies a tensor in place that autograd saved for "
            f"the backward pass (order={order}). Second-order MAML differentiates through the "
            f"inner gradient, so in-place ops on saved activations break it. Fix: replace in-place "
            f"ops (nn.ReLU(inplace=True), x += y, x.mul_(...), x[idx] = ...) with out-of-place "
            f"versions in the model, or use order=1. PyTorch said: {msg.splitlines()[0]}"
        )
    low = msg.lower()
    if "cudnn" in low and (
        "double backward" in low or "backward can only be called in training" in low
    ):
        return RuntimeError(
            f"{fn_name}: cuDNN's fused RNN kernels have no double backward, which second-order "
            f"MAML needs. Fix: run the meta-step inside `with torch.backends.cudnn.flags(enabled=False):` "
            f"or use order=1. PyTorch said: {msg.splitlines()[0]}"
        )
    return None


def non_finite_error(
    fn_name: str, where: str, task: int | None, step: int | None, message: str
) -> NonFiniteError:
    """A :class:`NonFiniteError` (same ``task``/``step``/``where`` fields) with its own message.

    For callers that know the cause better than the generic advice, e.g. a training loop that
    sees the meta-parameters themselves overflow (then inner_lr is not the culprit).
    """
    err = NonFiniteError(fn_name, where, task, step)
    err.args = (message,)
    return err
