"""Meta-learning only low-rank adapters (LoRA) of a transformer, exactly, in float64.

Two mechanisms: a frozen base (``requires_grad=False``: only adapters are adapted and
meta-learned) and ``adapt=lora_only`` on a trainable base (adapters adapted, everything
meta-learned). Both against the independent unrolled reference (1e-10) and finite differences
(1e-6), with metagrad's own :func:`metagrad.models.add_lora` and with a ``peft`` LoRA model
(``pip install "metagrad[adapters]"``; opt in with ``pytest -m slow``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import assert_unchanged, fd_rel_errors, rel_err, snapshot
from reference import RefConfig, reference_meta_grad
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import metagrad as mg
from metagrad.models import LoRALinear, add_lora, lora_only, vit

F64 = torch.float64
REF_TOL, FD_TOL = 1e-10, 1e-6


def tiny_vit() -> nn.Module:
    """3-way ViT on 8x8 images: 4 patches of 4x4, one block of width 8, 2 heads."""
    return vit(n_way=3, image_size=8, patch=4, dim=8, depth=1, heads=2).to(F64)


def _tasks(T: int = 2, K: int = 3) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(T, K, 1, 8, 8, generator=g, dtype=F64),
        torch.randint(0, 3, (T, K), generator=g),
        torch.randn(T, K, 1, 8, 8, generator=g, dtype=F64),
        torch.randint(0, 3, (T, K), generator=g),
    )


def _reference(learner: nn.Module, cfg: RefConfig, batch: tuple[Tensor, ...]) -> dict:
    with sdpa_kernel(SDPBackend.MATH):
        return reference_meta_grad(learner, F.cross_entropy, cfg, *batch)[1]


def test_add_lora_freezes_the_base_and_starts_at_the_base_model() -> None:
    base = tiny_vit()
    x = torch.randn(4, 1, 8, 8, dtype=F64)
    before = base(x)
    model = add_lora(base, ["attn.q", "attn.v"], rank=2)
    assert isinstance(model.blocks[0].attn.q, LoRALinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        "blocks.0.attn.q.lora_a",
        "blocks.0.attn.q.lora_b",
        "blocks.0.attn.v.lora_a",
        "blocks.0.attn.v.lora_b",
    ]
    torch.testing.assert_close(model(x), before)  # B = 0: exactly the base model
    assert all(lora_only(n) for n in trainable)
    assert not lora_only("blocks.0.attn.q.base.weight")
    with pytest.raises(ValueError, match=r"matches no nn\.Linear"):
        add_lora(tiny_vit(), "nonexistent")


@pytest.mark.parametrize("strategy", ["auto", "hvp_chain"])
def test_frozen_base_meta_learns_adapters_only(strategy: str) -> None:
    torch.manual_seed(1)
    model = add_lora(tiny_vit(), ["attn.q", "attn.v", "mlp.0"], rank=2, init_b=0.3)
    before = snapshot(model)
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=2, strategy=strategy)
    batch = _tasks()
    got = learner.meta_grad(*batch)
    assert set(got) == {f"module.{n}" for n, p in model.named_parameters() if p.requires_grad}
    want = _reference(learner, RefConfig(inner_lr=0.5, steps=2), batch)
    assert rel_err(got, want) < REF_TOL
    errs = fd_rel_errors(learner, got, batch, n_dirs=2)
    assert max(errs) < FD_TOL, errs
    assert_unchanged(model, before)


def test_adapt_selects_adapters_on_a_trainable_base() -> None:
    torch.manual_seed(2)
    model = add_lora(tiny_vit(), ["attn.q", "attn.v"], rank=2, init_b=0.3, freeze_base=False)
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=1, adapt=lora_only)
    names = tuple(n for n, _ in model.named_parameters() if lora_only(n))
    assert learner.adapt_names == names
    batch = _tasks()
    got = learner.meta_grad(*batch)
    assert len(got) == len(list(model.parameters()))  # every parameter is meta-learned
    want = _reference(learner, RefConfig(inner_lr=0.5, adapt=names), batch)
    assert rel_err(got, want) < REF_TOL
    errs = fd_rel_errors(learner, got, batch, n_dirs=2)
    assert max(errs) < FD_TOL, errs


def test_check_meta_gradient_on_adapters() -> None:
    torch.manual_seed(3)
    model = add_lora(tiny_vit(), ["attn.q", "attn.v"], rank=2, init_b=0.3)
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=1)
    report = mg.check_meta_gradient(learner, *_tasks(), directions=2)
    assert report.passed, str(report)


def _peft_vit() -> nn.Module:
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_vit(), cfg)
    with torch.no_grad():  # peft starts B at 0; move off it so every factor has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.slow  # importing peft takes 4-10 s here (it imports transformers and accelerate)
def test_peft_lora_model_matches_reference_and_finite_differences() -> None:
    model = _peft_vit()
    before = snapshot(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(lora_only(n) for n in trainable)
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=1)
    batch = _tasks()
    got = learner.meta_grad(*batch)
    want = _reference(learner, RefConfig(inner_lr=0.5), batch)
    assert rel_err(got, want) < REF_TOL
    errs = fd_rel_errors(learner, got, batch, n_dirs=2)
    assert max(errs) < FD_TOL, errs
    assert_unchanged(model, before)
