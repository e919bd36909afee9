"""A pure-function view of a user's ``nn.Module`` that never touches the module itself.

The engine calls ``torch.func.functional_call`` on a private deep copy (the *template*), so
adaptation cannot change the user's parameters, buffers or train/eval flags.

BatchNorm policy (``bn=``):

* ``"transductive"`` (default, as in the MAML reference code): normalization layers always use
  the statistics of the batch they see (support batch in the inner loop, query batch after it),
  in training and in evaluation. Running statistics are neither read nor updated.
* ``"running"``: the module's own mode decides. In train mode batch statistics are used; in
  eval mode the user's *current* running statistics are read. They are never updated.

In both policies the user's buffers are read-only: the template's norm layers are switched to
``track_running_stats=False`` so no forward pass writes to a buffer.

Memory format (``memory_format=``): on CPU, oneDNN convolutions, BatchNorm and above all
``max_pool2d`` run much faster on channels-last (NHWC) activations (max-pool with indices on a
[75, 64, 28, 28] batch: 42 ms NCHW vs 4.5 ms NHWC, one thread). Every layer keeps the format of
its input, so converting the image batch once at the model's entry makes the whole forward,
backward and double backward NHWC. The values are the same function (only the summation order of
the convolutions changes).

* ``"auto"`` (default): channels-last for 4-D CPU inputs when the model has a ``Conv2d`` and is
  built only of ``torch.nn`` layers (a custom ``forward`` might call ``.view``, which fails on
  NHWC strides).
* ``"channels_last"``: always, on any device. ``"preserve"``: never.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metagrad._typing import Buffers, Params
from metagrad.functional._attention import no_fused_inference
from metagrad.functional._chain import Chain
from metagrad.functional._locate import active_recording, run_recorded
from metagrad.functional._rewrites import (
    MEMORY_FORMATS,
    needs_math_attention,
    rewrite_template,
    to_channels_last,
)

BN_POLICIES = ("transductive", "running")

Recorder = list[tuple[str, int, Tensor, Tensor]]
"""Per-step batch statistics recorded by norm layers: (module name, step, mean, var)."""

# The recorder of the forward pass in progress (set by ``FunctionalModel.forward``).
_RECORDING: contextvars.ContextVar[tuple[Recorder, int] | None] = contextvars.ContextVar(
    "metagrad_recording", default=None
)

_NORM_WITH_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Modules whose math is safe and fast to vmap over tasks (``strategy="auto"`` reads this; see algorithms._task.resolve_strategy).
_VMAP_SAFE = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Dropout,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.Softmax,
    nn.LogSoftmax,
)
_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


@dataclass
class FunctionalModel:
    """``forward(params, x)`` over a private template of ``source``.

    Attributes:
        source: the user's module (read for its train/eval flags, never written).
        template: private deep copy that ``functional_call`` runs.
        trainable: names of parameters with ``requires_grad=True`` (meta-learned).
        frozen: names of parameters with ``requires_grad=False``: constants, never adapted.
        buffers: buffers the template reads (cloned at each call so nothing can write back).
    """

    source: nn.Module
    template: nn.Module
    trainable: list[str]
    frozen: list[str]
    buffer_names: list[str]
    bn: str
    _mode_pairs: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)
    _hooked: bool = False
    # Resolved ``memory_format``: None (never), "cpu" (CPU inputs only: auto) or "any".
    channels_last: str | None = None
    fn_name: str = "metagrad"  # the public function, first word of error messages

    def __post_init__(self) -> None:
        # forward() runs per inner step per task: look buffer names up in a set built once.
        self._buffer_set = frozenset(self.buffer_names)
        # nn.MultiheadAttention's fused inference path has no derivative (see _rewrites).
        self._fused_attention = needs_math_attention(self.template)
        self._vmap_safe: bool | None = None
        # A plain Linear/activation stack runs without functional_call's swapping (_chain.py).
        self._chain = Chain.of(self.template)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        bn: str = "transductive",
        *,
        memory_format: str = "auto",
        fn_name: str = "metagrad",
    ) -> FunctionalModel:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{fn_name}: model must be a torch.nn.Module, got {type(module).__name__}; wrap "
                f"your function in an nn.Module whose forward(x) returns the prediction."
            )
        if bn not in BN_POLICIES:
            raise ValueError(
                f"{fn_name}: bn={bn!r} is not a BatchNorm policy; use one of {BN_POLICIES} "
                f"('transductive' is MAML's reference behaviour)."
            )
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(
                f"{fn_name}: memory_format={memory_format!r} is not one of {MEMORY_FORMATS}; "
                f"'auto' uses channels-last for stock conv nets on CPU."
            )
        template = copy.deepcopy(module)
        dropped: set[str] = set()
        for name, m in template.named_modules():
            if isinstance(m, _NORM_WITH_STATS):
                m.track_running_stats = False  # no forward ever writes a running statistic
                if bn == "transductive":
                    prefix = f"{name}." if name else ""
                    dropped.update(
                        prefix + b for b in ("running_mean", "running_var", "num_batches_tracked")
                    )
                    m.running_mean = None
                    m.running_var = None
                    m.num_batches_tracked = None
        named = dict(module.named_parameters())
        trainable = [k for k, p in named.items() if p.requires_grad]
        frozen = [k for k, p in named.items() if not p.requires_grad]
        buffer_names = [k for k, _ in module.named_buffers() if k not in dropped]
        pairs = list(zip(module.modules(), template.modules()))
        # After pairing: the rewrites reorder and replace the template's modules.
        channels_last = rewrite_template(module, template, memory_format)
        fm = cls(module, template, trainable, frozen, buffer_names, bn, pairs)
        fm.fn_name = fn_name
        fm.channels_last = channels_last
        return fm

    def params(self) -> Params:
        """The user's trainable parameters (live references, so the meta-gradient reaches them)."""
        named = dict(self.source.named_parameters())
        return {k: named[k] for k in self.trainable}

    def buffers(self) -> Buffers:
        """Clones of the user's buffers that the template reads."""
        named = dict(self.source.named_buffers())
        return {k: named[k].detach().clone() for k in self.buffer_names}

    def sync_modes(self) -> None:
        """Mirror the user's train/eval flags (Dropout etc.) onto the template."""
        for src, tpl in self._mode_pairs:
            if tpl.training != src.training:  # Module.__setattr__ is slow: only on a change
                tpl.training = src.training

    def stat_norm_modules(self) -> list[str]:
        """Names of the user's norm layers that track running statistics."""
        return [
            n
            for n, m in self.source.named_modules()
            if isinstance(m, _NORM_WITH_STATS)
            and m.track_running_stats
            and m.running_mean is not None
        ]

    def enable_stat_recording(self) -> None:
        """Install forward pre-hooks on the template that record per-step batch statistics."""
        if self._hooked:
            return
        wanted = set(self.stat_norm_modules())
        for name, m in self.template.named_modules():
            if name in wanted:
                m.register_forward_pre_hook(self._make_hook(name))
        self._hooked = True

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            active = _RECORDING.get()
            if active is None or not module.training:
                return
            recorder, step = active
            x = args[0].detach()
            dims = [0, *range(2, x.dim())]
            recorder.append((name, step, x.mean(dims), x.var(dims, unbiased=True)))

        return hook

    def forward(
        self,
        params: Params,
        buffers: Buffers,
        x: Tensor,
        *,
        recorder: Recorder | None = None,
        step: int = 0,
    ) -> Tensor:
        """Run the template with ``params`` (trainable subset; frozen ones are added).

        Entries of ``params`` named like a buffer (per-step statistics returned by ``adapt``)
        override that buffer. With a ``recorder`` (and :meth:`enable_stat_recording`), every
        norm layer with statistics appends ``(module name, step, batch mean, batch var)`` of
        its input during this call.
        """
        if recorder is not None:
            token = _RECORDING.set((recorder, step))
            try:
                return self.forward(params, buffers, x)
            finally:
                _RECORDING.reset(token)
        extra_bufs = self._buffer_set.intersection(params)
        if extra_bufs:
            buffers = {**buffers, **{k: params[k] for k in extra_bufs}}
            params = {k: v for k, v in params.items() if k not in extra_bufs}
        if self.frozen:
            named = dict(self.source.named_parameters())
            params = {**{k: named[k].detach() for k in self.frozen}, **params}
        if self.channels_last is not None and (
            self.channels_last == "any" or x.device.type == "cpu"
        ):
            x = to_channels_last(x)
        nodes = active_recording()  # the diagnostic pass after a double-backward failure
        if nodes is not None:
            call = (params, buffers, x)
            return run_recorded(self.template, nodes, lambda: self._call(*call))
        return self._call(params, buffers, x)

    def _call(self, params: Params, buffers: Buffers, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and _float16_autocast(x):
            raise ValueError(
                f"{self.fn_name}: the forward pass runs under "
                f"torch.autocast(dtype=torch.float16) while gradients are taken. float16 needs "
                f"a loss scale to keep small inner gradients (and their derivatives, at order 2) "
                f"from underflowing to zero, and metagrad's inner loop does not scale its loss. "
                f"Fix: use torch.autocast(device_type, dtype=torch.bfloat16) (float32's exponent "
                f"range, no loss scale needed), or float32."
            )
        chain = self._chain
        if chain is not None and chain.usable(params, buffers):
            return chain(params, x)
        if self._fused_attention:
            with no_fused_inference():
                return functional_call(self.template, (params, buffers), (x,))
        return functional_call(self.template, (params, buffers), (x,))

    def vmap_wrong_second_order(self) -> list[str]:
        """Layers whose second-order meta-gradient is wrong under ``vmap`` (BatchNorm, LayerNorm).

        Measured against the unrolled reference in float64: relative error ~4e-2 (BatchNorm) and
        ~3e-4 (LayerNorm) at order 2; GroupNorm and order 1 are exact.
        """
        return [
            type(m).__name__
            for m in self.source.modules()  # the user's classes (the template may swap some)
            if _wrong_under_vmap_double_backward(m)
        ]

    def vmap_safe(self) -> bool:
        """True when every module is a stock layer whose per-task vmap is exact and fast.

        Normalization layers are excluded: the batched-gradient pattern is wrong for them
        (pytorch/functorch#534) and the correct variant is slower than the loop (BENCHMARKS.md).
        Recurrent layers are excluded because vmap of their kernels is not supported. Decided
        once: the template is a private copy whose modules never change.
        """
        if self._vmap_safe is None:
            self._vmap_safe = self._decide_vmap_safe()
        return self._vmap_safe

    def _decide_vmap_safe(self) -> bool:
        for m in self.template.modules():
            if isinstance(m, _NORMS) or isinstance(m, nn.RNNBase):
                return False
            own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            if own and not isinstance(m, _VMAP_SAFE):
                return False
        return True


def _float16_autocast(x: Tensor) -> bool:
    """True when ``x``'s device runs autocast with float16 (tested once per forward: ~1 us)."""
    device = x.device.type
    if torch.compiler.is_compiling() or not torch.is_autocast_enabled(device):
        return False
    return torch.get_autocast_dtype(device) == torch.float16


def _wrong_under_vmap_double_backward(m: nn.Module) -> bool:
    return isinstance(
        m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
    )


def norm_module_names(module: nn.Module) -> list[str]:
    """Qualified names of normalization layers (for per-step BatchNorm weights)."""
    return [n for n, m in module.named_modules() if isinstance(m, _NORMS)]


def select_names(
    names: list[str],
    selector: str | list[str] | tuple[str, ...] | Callable[[str], bool] | None,
    fn_name: str,
    arg: str,
) -> list[str]:
    """Names chosen by a prefix string, a list of names/prefixes, or a predicate; None means all."""
    if selector is None:
        return list(names)
    if callable(selector):
        chosen = [n for n in names if selector(n)]
    else:
        prefixes = [selector] if isinstance(selector, str) else list(selector)
        chosen = [
            n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)
        ]
        unknown = [
            p
            for p in prefixes
            if not any(n == p or n.startswith(p.rstrip(".") + ".") for n in names)
        ]
        if unknown:
            raise ValueError(
                f"{fn_name}: {arg}={unknown!r} matches no trainable parameter; names are "
                f"{names}. Pass parameter names or module prefixes such as 'head' or 'head.weight'."
            )
    if not chosen:
        raise ValueError(
            f"{fn_name}: {arg}={selector!r} selects no trainable parameter out of {names}; "
            f"select at least one (e.g. the last layer's prefix for ANIL)."
        )
    return chosen


def dtype_device(params: Params) -> tuple[torch.dtype, torch.device]:
    p = next(iter(params.values()))
    return p.dtype, p.device
