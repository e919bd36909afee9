r"""Low-rank adapters (LoRA) for ``nn.Linear`` layers, to meta-learn a small part of a big model.

A LoRA layer computes :math:`y = W x + b + \frac{\alpha}{r} B A x` with the base ``W, b`` frozen
and the rank-:math:`r` factors :math:`A \in \mathbb{R}^{r \times d_{in}}`,
:math:`B \in \mathbb{R}^{d_{out} \times r}` trainable (Hu et al. 2021). With MAML, the
meta-learned quantity is the adapters' *initialization*: the inner loop adapts ``A, B`` on each
task's support set and the meta-gradient (exact second order) updates their starting point, as
in MAML-en-LLM (KDD 2024). Two ways to choose what is adapted and what is meta-learned:

* freeze the base (``requires_grad=False``, what :func:`add_lora` does by default): only the
  adapters are adapted and meta-learned, and the meta-gradient's memory and time shrink with
  them (``benchmarks/bench_adapters.py``);
* or keep the base trainable and pass ``adapt=lora_only`` to the learner: the inner loop adapts
  the adapters only (ANIL's mechanism), the outer loop meta-learns everything.

Example:
    >>> import torch, torch.nn.functional as F, metagrad as mg
    >>> from metagrad.models import add_lora, lora_only, vit
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = add_lora(vit(n_way=5, depth=1, dim=16, heads=2), ["attn.q", "attn.v"], rank=2)
    >>> sorted(n for n, p in model.named_parameters() if p.requires_grad)[:2]
    ['blocks.0.attn.q.lora_a', 'blocks.0.attn.q.lora_b']
    >>> learner = mg.MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=1, order=2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Module):
    r"""``base(x) + (alpha / rank) * x A^T B^T``: a frozen ``nn.Linear`` plus a low-rank update.

    Args:
        base: the ``nn.Linear`` to adapt (kept as ``self.base``; its parameters are frozen
            unless ``freeze_base=False``).
        rank: rank :math:`r` of the update.
        alpha: scale numerator (default ``rank``: scale 1).
        init_b: standard deviation of ``B``'s initialization; 0 (default, as in the paper)
            starts at exactly the base model.
        freeze_base: set ``requires_grad=False`` on the base weight and bias.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        alpha: float | None = None,
        *,
        init_b: float = 0.0,
        freeze_base: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear: base must be an nn.Linear, got {type(base).__name__}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRALinear: rank={rank!r} must be an int >= 1.")
        self.base = base
        self.rank = rank
        self.scale = (rank if alpha is None else alpha) / rank
        w = base.weight
        # A like a Linear's default init, B at init_b (0: the adapted model starts as the base).
        bound = 1.0 / math.sqrt(base.in_features)
        a = torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device)
        self.lora_a = nn.Parameter(a.uniform_(-bound, bound))
        b = torch.randn(base.out_features, rank, dtype=w.dtype, device=w.device)
        self.lora_b = nn.Parameter(b * init_b)
        if freeze_base:
            for p in base.parameters():
                p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


Targets = str | Sequence[str] | Callable[[str, nn.Linear], bool]


def add_lora(
    model: nn.Module,
    targets: Targets,
    rank: int = 4,
    alpha: float | None = None,
    *,
    init_b: float = 0.0,
    freeze_base: bool = True,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` layers of ``model`` by :class:`LoRALinear` (in place).

    Args:
        model: the model to modify (it is modified in place and returned, as peft's
            ``inject_adapter_in_model`` does; metagrad itself never modifies a model).
        targets: which linear layers: a name suffix (``"attn.q"`` matches ``blocks.0.attn.q``),
            a list of suffixes, or a predicate ``(qualified name, layer) -> bool``.
        rank, alpha, init_b: see :class:`LoRALinear`.
        freeze_base: freeze every parameter of ``model`` that is not an adapter (default), so
            that only the adapters are adapted and meta-learned.

    Returns:
        ``model``.

    Raises:
        ValueError: ``targets`` matches no ``nn.Linear`` of the model.
    """
    if callable(targets):
        pick = targets
    else:
        suffixes = [targets] if isinstance(targets, str) else list(targets)

        def pick(name: str, layer: nn.Linear) -> bool:
            return any(name == s or name.endswith("." + s) for s in suffixes)

    chosen = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Linear and n and pick(n, m)  # exact type: not a Linear inside LoRA
    ]
    if not chosen:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(
            f"add_lora: targets={targets!r} matches no nn.Linear of the model; its linear "
            f"layers are {linears[:12]}{' ...' if len(linears) > 12 else ''}."
        )
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, layer in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(
            parent, attr, LoRALinear(layer, rank, alpha, init_b=init_b, freeze_base=freeze_base)
        )
    return model


def lora_only(name: str) -> bool:
    """Predicate for ``adapt=``: the parameters of LoRA adapters (metagrad's and peft's names)."""
    last = name.rsplit(".", 1)[-1]
    return last.startswith("lora_") or ".lora_" in name
