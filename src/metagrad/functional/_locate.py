"""Which module of the user's model created which autograd node (for error messages).

PyTorch's double-backward failures name an op (``aten::..._backward``) or nothing at all (a
custom ``autograd.Function`` marked ``@once_differentiable``), never the layer. After such a
failure the engine re-runs one inner forward pass under :func:`recording_nodes`;
:class:`~metagrad.functional.FunctionalModel` then runs its private template with temporary
forward hooks that walk each module's new piece of the autograd graph (from its outputs back to
its inputs) and record ``(module name, module class, node)`` for the innermost module that
created each node. Only this diagnostic pass pays for the hooks.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metagrad._compat import pytree


@dataclass(frozen=True)
class NodeRecord:
    """One autograd node created in the forward pass of one module.

    Attributes:
        module: qualified name of the innermost module whose forward created it (``""`` for
            the root module).
        module_type: that module's class name.
        node: the node's name (``ScaledDotProductFlashAttentionForCpuBackward0``, ``MyFnBackward``).
        function: for a custom ``autograd.Function``, its class name; else None.
        once_differentiable: the Function's backward is marked ``@once_differentiable``.
    """

    module: str
    module_type: str
    node: str
    function: str | None
    once_differentiable: bool


_RECORDING: contextvars.ContextVar[list[NodeRecord] | None] = contextvars.ContextVar(
    "metagrad_node_recording", default=None
)


@contextmanager
def recording_nodes() -> Iterator[list[NodeRecord]]:
    """Collect :class:`NodeRecord` s of every ``FunctionalModel`` forward pass run inside."""
    records: list[NodeRecord] = []
    token = _RECORDING.set(records)
    try:
        yield records
    finally:
        _RECORDING.reset(token)


def active_recording() -> list[NodeRecord] | None:
    # The diagnostic re-run is eager; torch.compile cannot trace ContextVar.get (graph break).
    if torch.compiler.is_compiling():
        return None
    return _RECORDING.get()


def run_recorded(template: nn.Module, records: list[NodeRecord], fn: Callable[[], Any]) -> Any:
    """``fn()`` with forward hooks on ``template``'s modules that append to ``records``."""
    seen: dict[int, Any] = {}  # id -> node (holding the node keeps its id unique)
    handles = []
    for name, module in template.named_modules():
        handles.append(module.register_forward_hook(_hook(name, records, seen)))
    try:
        return fn()
    finally:
        for h in handles:
            h.remove()


def _hook(
    name: str, records: list[NodeRecord], seen: dict[int, Any]
) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        stop = {id(t.grad_fn) for t in _tensors(args) if t.grad_fn is not None}
        todo: list[Any] = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        visited: dict[int, Any] = {}
        while todo:
            node = todo.pop()
            if node is None or id(node) in stop or id(node) in visited:
                continue
            visited[id(node)] = node
            # Inner modules' hooks run first: the innermost module that created a node owns it.
            if id(node) not in seen and type(node).__name__ != "AccumulateGrad":
                seen[id(node)] = node
                records.append(_record(name, type(module).__name__, node))
            todo.extend(nxt for nxt, _ in node.next_functions if nxt is not None)

    return hook


def _record(module: str, module_type: str, node: Any) -> NodeRecord:
    fwd = getattr(type(node), "_forward_cls", None)  # custom autograd.Function nodes
    once = fwd is not None and hasattr(getattr(fwd, "backward", None), "__wrapped__")
    return NodeRecord(module, module_type, node.name(), None if fwd is None else fwd.__name__, once)


def _tensors(x: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, Tensor)]


def node_name_of_op(op: str) -> str:
    """``_scaled_dot_product_flash_attention_for_cpu`` -> ``ScaledDotProductFlashAttentionForCpu``.

    PyTorch names the backward node of ``aten::op`` ``<CamelCase(op)>Backward<k>``.
    """
    return "".join(part[:1].upper() + part[1:] for part in op.split("_") if part)


def probe_records(fn: Callable[[], Any]) -> list[NodeRecord]:
    """Records of one diagnostic call of ``fn`` (an objective); [] if it fails itself."""
    with recording_nodes() as records, torch.enable_grad():
        try:
            fn()
        except Exception:  # the diagnostic must never hide the error being explained
            return records
    return records
