"""Stock attention layers and a Hugging Face model under exact second-order MAML, in float64.

Every strategy against the independent unrolled reference (``reference.py``, run under
``sdpa_kernel(SDPBackend.MATH)``, the workaround a user would need without metagrad) to 1e-10,
central finite differences to 1e-6, ``check_meta_gradient``, and the user's module unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import assert_unchanged, fd_rel_errors, rel_err, sequence_tasks, snapshot
from reference import RefConfig, reference_meta_grad
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import metagrad as mg

F64 = torch.float64
REF_TOL, FD_TOL = 1e-10, 1e-6
D, S = 8, 4  # model width, sequence length


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1), nn.Flatten(), nn.Linear(D * S, 1))


class Decoder(nn.Module):
    """nn.TransformerDecoder with a causal mask, attending to an encoding of the same sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, D)
        layer = nn.TransformerDecoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 1)
        self.head = nn.Linear(D, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.decoder(h, torch.tanh(h), tgt_mask=mask, tgt_is_causal=True)[:, -1])


class MHANet(nn.Module):
    """nn.MultiheadAttention without norm layers (vmap is exact for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(a).mean(1))


class SDPANet(nn.Module):
    """Causal self-attention written with F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.head = nn.Linear(D, 1)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        q, k, v = (t.reshape(B, S, 2, D // 2).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(torch.tanh(a.transpose(1, 2).reshape(B, S, D)).mean(1))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "encoder": encoder,
    "decoder": Decoder,
    "mha": MHANet,
    "sdpa": SDPANet,
}
VMAP_EXACT = ("mha", "sdpa")  # no LayerNorm: the batched double backward is exact


def _tasks(T: int = 2, K: int = 3) -> tuple[Tensor, ...]:
    return sequence_tasks(T, K, S, D, seed=3)


def _reference(learner: nn.Module, cfg: RefConfig, batch: tuple[Tensor, ...]) -> dict:
    with sdpa_kernel(SDPBackend.MATH):
        return reference_meta_grad(learner, F.mse_loss, cfg, *batch)[1]


CASES = [(m, s) for m in MODELS for s in ("auto", "loop", "hvp_chain", "checkpoint")]
CASES += [(m, "vmap") for m in VMAP_EXACT]


@pytest.mark.parametrize(("name", "strategy"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_matches_unrolled_reference(name: str, strategy: str) -> None:
    model = MODELS[name]().to(F64)
    before = snapshot(model)
    steps = 2 if strategy in ("hvp_chain", "checkpoint") else 1  # exercise the chain
    learner = mg.MAML(model, F.mse_loss, inner_lr=0.3, inner_steps=steps, strategy=strategy)
    batch = _tasks()
    got = learner.meta_grad(*batch)
    want = _reference(learner, RefConfig(inner_lr=0.3, steps=steps), batch)
    assert rel_err(got, want) < REF_TOL
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(MODELS))
def test_finite_differences(name: str) -> None:
    model = MODELS[name]().to(F64)
    learner = mg.MAML(model, F.mse_loss, inner_lr=0.3, inner_steps=1)
    batch = _tasks()
    errs = fd_rel_errors(learner, learner.meta_grad(*batch), batch, n_dirs=2)
    assert max(errs) < FD_TOL, errs


def test_encoder_eval_mode_fast_path_is_not_taken() -> None:
    """Eval mode: PyTorch's fused encoder op (no derivative) must not run inside the engine."""
    model = encoder().to(F64).eval()
    learner = mg.MAML(model, F.mse_loss, inner_lr=0.3, inner_steps=1).eval()
    batch = _tasks()
    got = learner.meta_grad(*batch)
    want = _reference(learner, RefConfig(inner_lr=0.3, steps=1, order=2), batch)
    assert rel_err(got, want) < REF_TOL
    with torch.no_grad():  # evaluation of a learner in eval mode
        assert torch.isfinite(learner.meta_loss(*batch))


def test_nested_tensor_padding_mask_path() -> None:
    """TransformerEncoder's nested-tensor conversion (eval + padding mask) stays differentiable."""

    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
            self.head = nn.Linear(D, 1)

        def forward(self, x: Tensor) -> Tensor:
            pad = torch.zeros(x.shape[:2], dtype=torch.bool)
            pad[:, -1] = True  # the last position is padding
            return self.head(self.enc(x, src_key_padding_mask=pad)[:, 0])

    model = Padded().to(F64).eval()
    learner = mg.MAML(model, F.mse_loss, inner_lr=0.3, inner_steps=1).eval()
    batch = _tasks()
    got = learner.meta_grad(*batch)
    torch.backends.mha.set_fastpath_enabled(False)  # the reference must avoid it as well
    try:
        want = _reference(learner, RefConfig(inner_lr=0.3, steps=1), batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert rel_err(got, want) < REF_TOL


def test_first_order_and_anil_on_the_encoder() -> None:
    model = encoder().to(F64)
    batch = _tasks()
    for order in (1, 2):
        learner = mg.MAML(model, F.mse_loss, inner_lr=0.3, inner_steps=1, order=order, adapt="2")
        want = _reference(
            learner, RefConfig(inner_lr=0.3, order=order, adapt=("2.weight", "2.bias")), batch
        )
        assert rel_err(learner.meta_grad(*batch), want) < REF_TOL


def test_check_meta_gradient_passes_on_the_encoder() -> None:
    learner = mg.MAML(encoder(), F.mse_loss, inner_lr=0.3, inner_steps=1)
    xs, ys, xq, yq = _tasks()
    report = mg.check_meta_gradient(learner, xs, ys, xq, yq, directions=2)
    assert report.passed, str(report)
    assert report.reference_rel_error is not None and report.reference_rel_error < REF_TOL


# -- Hugging Face transformers ---------------------------------------------------------------
class HFClassifier(nn.Module):
    """``input_ids -> logits`` of a Hugging Face sequence classifier (the loss takes a tensor)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: Tensor) -> Tensor:
        return self.hf(input_ids=ids).logits


def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)  # built from the config: no download
    assert model.config._attn_implementation == "sdpa"  # F.scaled_dot_product_attention inside
    return HFClassifier(model).to(F64)


def _token_tasks(T: int = 2, K: int = 3) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(4)
    ids = lambda: torch.randint(1, 20, (T, K, 5), generator=g)  # noqa: E731
    labels = lambda: torch.randint(0, 3, (T, K), generator=g)  # noqa: E731
    return ids(), labels(), ids(), labels()


@pytest.mark.parametrize("strategy", ["auto", "hvp_chain"])
def test_hugging_face_bert_matches_reference(strategy: str) -> None:
    model = tiny_bert()
    before = snapshot(model)
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=1, strategy=strategy)
    batch = _token_tasks()
    got = learner.meta_grad(*batch)
    with sdpa_kernel(SDPBackend.MATH):
        want = reference_meta_grad(learner, F.cross_entropy, RefConfig(inner_lr=0.5), *batch)[1]
    assert rel_err(got, want) < REF_TOL
    assert_unchanged(model, before)


def test_hugging_face_bert_finite_differences_and_check() -> None:
    model = tiny_bert()
    learner = mg.MAML(model, F.cross_entropy, inner_lr=0.5, inner_steps=1)
    batch = _token_tasks()
    errs = fd_rel_errors(learner, learner.meta_grad(*batch), batch, n_dirs=1)
    assert max(errs) < FD_TOL, errs
    report = mg.check_meta_gradient(learner, *batch, directions=1)
    assert report.passed, str(report)
