"""The attention-kernel policy: math kernel exactly where a backward pass is differentiated.

Which kernel ran is read from the profiler's op names: the flash kernel is
``aten::_scaled_dot_product_flash_attention_for_cpu``, the math kernel
``aten::_scaled_dot_product_attention_math``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import sequence_tasks
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import metagrad as mg
from metagrad.functional._attention import higher_order_attention, no_fused_inference

F64 = torch.float64
FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"


def kernels(fn: Callable[[], object]) -> Counter[str]:
    """How often each SDPA kernel ran during ``fn()`` (forward ops only)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name in (FLASH, MATH))


class SDPANet(nn.Module):
    """One attention layer through ``F.scaled_dot_product_attention`` (no LayerNorm)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = (
            t.reshape(B, S, self.heads, D // self.heads).transpose(1, 2)
            for t in self.qkv(x).chunk(3, -1)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(torch.tanh(a.transpose(1, 2).reshape(B, S, D)).mean(1))


def _tasks(T: int = 2, K: int = 3, S: int = 4, d: int = 8) -> tuple[Tensor, ...]:
    return sequence_tasks(T, K, S, d, seed=1)


def _flags() -> tuple[bool, ...]:
    c = torch.backends.cuda
    return (
        c.flash_sdp_enabled(),
        c.mem_efficient_sdp_enabled(),
        c.math_sdp_enabled(),
        c.cudnn_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
    )


def test_context_selects_math_and_restores_flags() -> None:
    q = torch.randn(1, 2, 4, 8, dtype=F64)
    before = _flags()
    assert kernels(lambda: F.scaled_dot_product_attention(q, q, q))[FLASH] == 1
    with higher_order_attention():
        assert _flags() == (False, False, True, False, False)
        assert kernels(lambda: F.scaled_dot_product_attention(q, q, q)) == {MATH: 1}
        with higher_order_attention():  # nested: still math, and the outer state comes back
            pass
        assert _flags() == (False, False, True, False, False)
    assert _flags() == before
    with pytest.raises(KeyError), higher_order_attention():
        raise KeyError("restored on errors too")
    assert _flags() == before


def test_context_overrides_a_user_kernel_choice_and_gives_it_back() -> None:
    q = torch.randn(1, 2, 4, 8, dtype=F64)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with higher_order_attention():
            assert kernels(lambda: F.scaled_dot_product_attention(q, q, q)) == {MATH: 1}
        assert kernels(lambda: F.scaled_dot_product_attention(q, q, q)) == {FLASH: 1}


def test_no_fused_inference_restores_fastpath() -> None:
    torch.backends.mha.set_fastpath_enabled(True)
    with no_fused_inference():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("strategy", ["loop", "hvp_chain", "vmap"])
def test_second_order_uses_math_for_support_and_flash_for_query(strategy: str) -> None:
    xs, ys, xq, yq = _tasks()
    learner = mg.MAML(SDPANet().to(F64), F.mse_loss, 0.1, 1, order=2, strategy=strategy)
    ran = kernels(lambda: learner.meta_loss(xs, ys, xq, yq).backward())
    assert ran[MATH] >= 1, ran  # the support forward, whose backward is differentiated
    assert ran[FLASH] >= 1, ran  # the query forward (and hvp_chain's stored forward steps)


@pytest.mark.parametrize("strategy", ["loop", "hvp_chain", "vmap"])
def test_first_order_and_evaluation_keep_the_fast_kernel(strategy: str) -> None:
    xs, ys, xq, yq = _tasks()
    learner = mg.MAML(SDPANet().to(F64), F.mse_loss, 0.1, 2, order=1, strategy=strategy)
    ran = kernels(lambda: learner.meta_loss(xs, ys, xq, yq).backward())
    assert ran[MATH] == 0 and ran[FLASH] >= 4, ran
    second = mg.MAML(learner.module, F.mse_loss, 0.1, 2, order=2, strategy=strategy)
    with torch.no_grad():
        ran = kernels(lambda: second.meta_loss(xs, ys, xq, yq))  # validation: value only
    assert ran[MATH] == 0 and ran[FLASH] >= 2, ran
    ran = kernels(lambda: second.predict(second.adapt(xs[0], ys[0], steps=2), xq[0]))
    assert ran == {FLASH: 3}, ran  # adapt() evaluates first order: fast kernel everywhere


def test_kernel_flags_unchanged_after_meta_steps() -> None:
    before = _flags()
    learner = mg.MAML(SDPANet().to(F64), F.mse_loss, 0.1, 1, order=2, strategy="loop")
    learner.meta_loss(*_tasks()).backward()
    assert _flags() == before


def test_toolkit_differentiates_through_attention() -> None:
    net = SDPANet().to(F64)
    x = torch.randn(3, 4, 8, dtype=F64)
    params = {k: p.detach() for k, p in net.named_parameters()}

    def f(p: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(net, p, (x,)).pow(2).mean()

    v = {k: torch.randn_like(t) for k, t in params.items()}
    with sdpa_kernel(SDPBackend.MATH):  # the reference: PyTorch's own HVP on the math kernel
        _, want = torch.autograd.functional.hvp(
            lambda *ts: f(dict(zip(params, ts))), tuple(params.values()), tuple(v.values())
        )
    for mode in ("rev", "fwd"):
        got = mg.hvp(f, params, v, mode=mode)
        for k, w in zip(params, want):
            torch.testing.assert_close(got[k], w, rtol=1e-10, atol=1e-12)
    H = mg.hessian(f, {"out.weight": params["out.weight"]} | {"qkv.bias": params["qkv.bias"]})
    assert H["qkv.bias"]["qkv.bias"].shape == (24, 24)
    assert torch.isfinite(H["qkv.bias"]["out.weight"]).all()
    pen = mg.grad_norm_penalty(f, dict(net.named_parameters()))
    pen.backward()  # 2 H g through the attention layer
    assert net.qkv.weight.grad is not None and bool(net.qkv.weight.grad.abs().sum() > 0)
    s = torch.tensor(0.3, dtype=F64)
    d3 = mg.nth_derivative(lambda t: f({**params, "qkv.bias": params["qkv.bias"] * t}), s, 3)
    assert torch.isfinite(d3)


def test_first_order_toolkit_keeps_the_fast_kernel() -> None:
    net = SDPANet().to(F64)
    x = torch.randn(3, 4, 8, dtype=F64)
    params = {"out.bias": net.out.bias.detach()}
    f = lambda p: torch.func.functional_call(net, p, (x,)).sum()  # noqa: E731
    assert kernels(lambda: mg.jacobian(f, params)) == {FLASH: 1}
    assert (
        kernels(lambda: mg.nth_derivative(lambda t: f({"out.bias": t}), params["out.bias"], 1))[
            MATH
        ]
        == 0
    )
    assert kernels(lambda: mg.hvp(f, params, params))[MATH] == 1


def test_encoder_eval_mode_under_vmap_does_not_take_the_fused_path() -> None:
    """In eval mode nn.TransformerEncoderLayer takes a fused op without derivative under torch.func."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.Sequential(nn.TransformerEncoder(layer, 1), nn.Flatten(), nn.Linear(32, 1)).to(F64)
    enc.eval()
    learner = mg.MAML(enc, F.mse_loss, 0.1, 1, order=1, strategy="vmap")
    learner.eval()
    g = learner.meta_grad(*_tasks())
    assert all(v is not None and torch.isfinite(v).all() for v in g.values())
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is untouched
