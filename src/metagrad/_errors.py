"""Errors that teach: every message names the public function, the value and the fix."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from metagrad.functional._locate import NodeRecord

Locate = Callable[[], Sequence["NodeRecord"]]
"""Re-runs one inner forward pass and returns which module created which autograd node."""


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in the inner loop or in the meta-gradient.

    Attributes:
        task: index of the task in the meta-batch (None when not task-specific).
        step: inner step at which it appeared (None for the query loss / meta-gradient).
        where: what was non-finite (``"support loss"``, ``"gradient of 'fc.weight'"``...).
    """

    def __init__(
        self,
        fn_name: str,
        where: str,
        task: int | None,
        step: int | None,
        unit: str = "task",
        advice: str | None = None,
    ) -> None:
        self.task, self.step, self.where = task, step, where
        loc = []
        if task is not None:
            loc.append(f"{unit} {task}")
        if step is not None:
            loc.append(f"inner step {step}")
        at = " at " + ", ".join(loc) if loc else ""
        if advice is None:
            data = f"{unit} {task}'s data" if task is not None else "the data"
            advice = (
                f"Usual fixes: lower the inner learning rate (the inner loop diverged), check "
                f"that {data} has no NaN/Inf, clip or normalise inputs; with Adam keep eps > 0."
            )
        super().__init__(f"{fn_name}: non-finite value (NaN/Inf) in the {where}{at}. {advice}")


def check_finite(
    fn_name: str, t: Tensor, where: str, task: int | None, step: int | None, unit: str = "task"
) -> None:
    """Raise :class:`NonFiniteError` if ``t`` holds a NaN or Inf."""
    if not bool(t.detach().isfinite().all()):
        raise NonFiniteError(fn_name, where, task, step, unit)


def translate_autograd_error(
    fn_name: str,
    err: RuntimeError,
    order: int,
    *,
    strategy: str | None = None,
    locate: Locate | None = None,
) -> Exception | None:
    """Turn PyTorch's cryptic double-backward failures into an explanation; None if unknown.

    Args:
        fn_name: the public function, first word of the message.
        err: PyTorch's error.
        order: the derivative order of the failing computation (2: a backward pass was
            differentiated).
        strategy: the strategy that ran (named in the message).
        locate: called only for a recognised failure, to name the module that created the
            failing op (see :mod:`metagrad.functional._locate`).
    """
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
        where = _modules_text(_find(locate, lambda r: r.node.startswith("CudnnRnn")))
        return RuntimeError(
            f"{fn_name}: cuDNN's fused RNN kernels have no double backward, which second-order "
            f"MAML needs{_by(order, strategy)}.{where} Fix: run the meta-step inside `with torch.backends.cudnn.flags(enabled=False):` "
            f"or use order=1. PyTorch said: {msg.splitlines()[0]}"
        )
    return _missing_derivative(fn_name, msg, order, strategy, locate)


_NO_FORMULA = re.compile(r"derivative for (?:aten::)?([\w.]+) is not implemented")
_ONCE = "marked with @once_differentiable"
_FUSED_MHA = ("_native_multi_head_attention", "_transformer_encoder_layer_fwd")


def _missing_derivative(
    fn: str, msg: str, order: int, strategy: str | None, locate: Locate | None
) -> Exception | None:
    """Ops without a (double) backward: name the op, the module, who needs it and the fix."""
    said = f" PyTorch said: {msg.splitlines()[0]}"
    if _ONCE in msg:
        hits = _find(locate, lambda r: r.once_differentiable)
        names = sorted({r.function for r in hits if r.function})
        what = "a custom autograd.Function"
        if names:
            what = f"the custom autograd.Function {', '.join(names)}"
        return RuntimeError(
            f"{fn}: {what} marks its backward @once_differentiable, so its backward pass cannot "
            f"be differentiated; {_needs(order, strategy)}.{_modules_text(hits)} Fix: write its "
            f"backward with differentiable torch operations (drop @once_differentiable; a "
            f"backward made of torch ops is differentiated automatically), replace that layer, "
            f"or use order=1 (first-order MAML needs no double backward).{said}"
        )
    if "autograd.Function with functorch transforms" in msg:
        return RuntimeError(
            f"{fn}: the model uses a custom torch.autograd.Function written without "
            f"setup_context, and strategy={strategy or 'vmap'!r} runs it under torch.func "
            f"transforms (vmap/grad), which need one. Fix: strategy='loop' (plain autograd, any "
            f"Function), or give the Function a setup_context staticmethod (PyTorch's "
            f"'Extending torch.func with autograd.Function').{said}"
        )
    m = _NO_FORMULA.search(msg)
    if m is None:
        return None
    op = m.group(1)
    if op in _FUSED_MHA:
        return RuntimeError(
            f"{fn}: aten::{op} is the fused inference fast path of nn.MultiheadAttention / "
            f"nn.TransformerEncoderLayer (eval mode, nested tensors) and has no derivative at "
            f"all. metagrad turns it off for the forward passes it runs through the model; this "
            f"one ran outside them. Fix: torch.backends.mha.set_fastpath_enabled(False) "
            f"around that code, or put the model in train mode.{said}"
        )
    twice = op.endswith("_backward")
    fwd_op = op[: -len("_backward")] if twice else op
    node = "".join(p[:1].upper() + p[1:] for p in fwd_op.split("_") if p) + "Backward"
    where = _modules_text(_find(locate, lambda r: r.node.startswith(node)))
    if not twice:
        return RuntimeError(
            f"{fn}: PyTorch has no derivative for aten::{op} at all, so no gradient can flow "
            f"through it at any order (order={order}{_strategy(strategy)}).{where} Fix: replace "
            f"that operation or layer with differentiable ones, or keep it out of the parameters' "
            f"path (compute it under torch.no_grad() on inputs only).{said}"
        )
    if "attention" in fwd_op:
        return RuntimeError(
            f"{fn}: the fused attention kernel aten::{fwd_op} has a backward but no double "
            f"backward; {_needs(order, strategy)}.{where} metagrad runs "
            f"F.scaled_dot_product_attention on the math kernel wherever it differentiates a "
            f"backward pass, so this kernel was chosen inside the model (a `with "
            f"sdpa_kernel(...)` in its forward, or a direct call of the fused op). Fix: let the "
            f"model call F.scaled_dot_product_attention without pinning a kernel (or pin "
            f"SDPBackend.MATH there), or use order=1 (first-order MAML needs no double "
            f"backward).{said}"
        )
    return RuntimeError(
        f"{fn}: aten::{fwd_op} has a backward but no double backward (PyTorch implements no "
        f"derivative of aten::{op}); {_needs(order, strategy)}.{where} Fix: replace that layer "
        f"with one built from differentiable operations, or use order=1 / a first-order "
        f"algorithm (FOMAML, Reptile), which differentiate each backward pass only once.{said}"
    )


def _strategy(strategy: str | None) -> str:
    if not strategy:
        return ""
    from metagrad.bilevel._api import _ALIASES  # here: the engine imports this module

    alias = {engine: maml for maml, engine in _ALIASES.items()}.get(strategy)
    return f", strategy={strategy!r}" + (f" ({alias!r} in the MAML family)" if alias else "")


def _by(order: int, strategy: str | None) -> str:
    return f" (order={order}{_strategy(strategy)})"


def _needs(order: int, strategy: str | None) -> str:
    from metagrad.algorithms._task import STRATEGIES  # here: the algorithms import this module

    exact = ", ".join(repr(s) for s in STRATEGIES if s != "auto")
    return (
        f"order={order}{_strategy(strategy)} differentiates the inner objective's backward pass "
        f"(the Hessian term of the meta-gradient), as every exact second-order strategy "
        f"({exact}) and iMAML do"
    )


def _find(locate: Locate | None, pred: Callable[[NodeRecord], bool]) -> list[NodeRecord]:
    if locate is None:
        return []
    try:
        return [r for r in locate() if pred(r)]
    except Exception:  # a failing diagnostic must not hide the explanation
        return []


def _modules_text(hits: Sequence[NodeRecord]) -> str:
    mods = list(dict.fromkeys(f"{r.module or '<root>'!r} ({r.module_type})" for r in hits))
    if not mods:
        return ""
    return f" It is created by module {', '.join(mods[:4])}{' ...' if len(mods) > 4 else ''}."


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
