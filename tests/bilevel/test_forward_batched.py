"""``strategy="forward"``: all tangent directions in one vmapped jvp, chunked, with a fallback.

The problem: hyperparameter optimization of a small MLP (per-layer learning rates and per-layer
weight decay in ``h``, the optimizer's own weight decay as a tensor), in float64 against the
unrolled (reverse-mode) strategy.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metagrad import bilevel, optim
from metagrad.bilevel import _forward
from metagrad.bilevel._problem import MetaParams
from metagrad.bilevel._tree import Flat

D = torch.float64
SIZES = (4, 6, 3)


def _layer(name: str) -> int:
    return int(name.split(".")[0][1:])


def _net(w: dict[str, Tensor], x: Tensor) -> Tensor:
    x = torch.tanh(F.linear(x, w["l0.weight"], w["l0.bias"]))
    return F.linear(x, w["l1.weight"], w["l1.bias"])


def _setup(
    opt_name: str, steps: int, dtype: torch.dtype = D
) -> tuple[bilevel.Problem, dict[str, Tensor], dict[str, Tensor], Any, Any]:
    g = torch.Generator().manual_seed(0)
    X, Xv = (
        torch.randn(16, 4, generator=g, dtype=dtype),
        torch.randn(10, 4, generator=g, dtype=dtype),
    )
    y, yv = (
        torch.randn(16, 3, generator=g, dtype=dtype),
        torch.randn(10, 3, generator=g, dtype=dtype),
    )
    w0 = {
        "l0.weight": 0.5 * torch.randn(6, 4, generator=g, dtype=dtype),
        "l0.bias": torch.zeros(6, dtype=dtype),
        "l1.weight": 0.5 * torch.randn(3, 6, generator=g, dtype=dtype),
        "l1.bias": torch.zeros(3, dtype=dtype),
    }
    lr = 0.1 if opt_name == "sgd" else 0.02
    h = {
        "lr": torch.tensor([lr, 0.8 * lr], dtype=dtype, requires_grad=True),
        "wd": torch.tensor([1e-2, 3e-2], dtype=dtype, requires_grad=True),
    }

    def inner(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        decay = sum(h["wd"][_layer(k)] * (v**2).sum() for k, v in w.items() if "weight" in k)
        return F.mse_loss(_net(w, b[0]), b[1]) + 0.5 * decay

    def outer(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return F.mse_loss(_net(w, b[0]), b[1])

    wd = torch.tensor(5e-3, dtype=dtype, requires_grad=True)  # the optimizer's own decay
    opt: optim.Optimizer
    if opt_name == "sgd":
        opt = optim.SGD(lr=1.0, momentum=0.9, weight_decay=wd)
    else:
        opt = optim.Adam(lr=1.0, weight_decay=wd)
    pb = bilevel.Problem(
        inner, outer, opt, steps, lr=lambda h, k, n: h["lr"][_layer(n)]
    )  # per-layer learning rates read from h
    return pb, w0, h, (X, y), (Xv, yv)


def _flat(res: bilevel.HyperGrad) -> Tensor:
    gs = [res.grads.h["lr"], res.grads.h["wd"], *res.grads.opt.values()]
    return torch.cat([g.reshape(-1) for g in gs])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _no_loop(*args: object) -> None:
    raise AssertionError("the per-scalar jvp loop ran: the batched path was not used")


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("steps", [1, 5])
def test_batched_forward_equals_unroll(
    opt_name: str, steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    pb, w0, h, di, do = _setup(opt_name, steps)
    ref = bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll")
    monkeypatch.setattr(_forward, "_loop", _no_loop)
    res = bilevel.hypergrad(pb, w0, h, di, do, strategy="forward")
    assert res.strategy == "forward"
    assert _rel(_flat(res), _flat(ref)) < 1e-10
    assert abs(float(res.value) - float(ref.value)) <= 1e-12 * abs(float(ref.value))
    assert res.grads.h["lr"].dtype == D and res.grads.opt["weight_decay"].shape == ()


def test_batched_forward_over_batched_problems_and_w0(monkeypatch: pytest.MonkeyPatch) -> None:
    pb, w0, h, (X, y), (Xv, yv) = _setup("adam", 3)
    w0 = {k: v.requires_grad_() for k, v in w0.items()}  # + the initialization: 57 scalars
    di = (torch.stack([X, X.flip(0)]), torch.stack([y, y.flip(0)]))
    do = (torch.stack([Xv, Xv + 0.1]), torch.stack([yv, yv]))
    ref = bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll", batched=True)
    monkeypatch.setattr(_forward, "_loop", _no_loop)
    res = bilevel.hypergrad(pb, w0, h, di, do, strategy="forward", batched=True)
    want = torch.cat([_flat(ref), *(ref.grads.w0[k].reshape(-1) for k in w0)])
    got = torch.cat([_flat(res), *(res.grads.w0[k].reshape(-1) for k in w0)])
    assert _rel(got, want) < 1e-10
    assert torch.allclose(res.per_problem, ref.per_problem, rtol=1e-13, atol=0)


def _spy_batched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the chunk size of every call of ``_forward._batched`` (which still runs)."""
    calls: list[int] = []
    batched = _forward._batched

    def spy(objective: Any, diff: list[Tensor], chunk_size: int) -> Any:
        calls.append(chunk_size)
        return batched(objective, diff, chunk_size)

    monkeypatch.setattr(_forward, "_batched", spy)
    return calls


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_chunk_sizes_give_the_same_gradient(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pb, w0, h, di, do = _setup("sgd", 5)
    ref = bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll")
    calls = _spy_batched(monkeypatch)
    monkeypatch.setattr(_forward, "CHUNK_SIZE", chunk)  # the default through hypergrad
    res = bilevel.hypergrad(pb, w0, h, di, do, strategy="forward")
    assert calls == [min(chunk, 5)]  # 2 lrs + 2 decays + the optimizer's decay
    assert _rel(_flat(res), _flat(ref)) < 1e-10
    # and the explicit option of forward_mode: 1, 3 and all agree to rounding
    mp = MetaParams(w0, h, pb.optimizer.hyperparams())
    direct = _forward.forward_mode(pb, Flat(mp, True), di, do, batched=False, chunk_size=chunk)
    assert _rel(_flat(direct), _flat(res)) < 1e-13


def test_default_chunk_size_is_bounded() -> None:
    assert _forward.default_chunk_size(5, 100) == 5
    assert _forward.default_chunk_size(1000, 100) == _forward.CHUNK_SIZE
    assert _forward.default_chunk_size(1000, _forward.TANGENT_BUDGET // 4) == 4
    assert _forward.default_chunk_size(1000, 10 * _forward.TANGENT_BUDGET) == 1
    pb, w0, h, di, do = _setup("sgd", 1)
    mp = MetaParams(w0, h, pb.optimizer.hyperparams())
    with pytest.raises(ValueError, match=r"chunk_size=0 must be an int >= 1"):
        _forward.forward_mode(pb, Flat(mp, True), di, do, batched=False, chunk_size=0)


class _Square(torch.autograd.Function):
    """x * x with a jvp and a backward but no vmap rule: vmap over tangents refuses it."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x * x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * t

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_objective_that_cannot_be_vmapped_falls_back_to_the_loop(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pb, w0, h, di, do = _setup("adam", 5)

    def outer(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return _Square.apply(_net(w, b[0]) - b[1]).mean()

    import dataclasses

    pb = dataclasses.replace(pb, outer=outer)
    with pytest.raises(RuntimeError, match="does not have vmap support"):  # the premise
        torch.func.vmap(lambda t: torch.func.jvp(_Square.apply, (t,), (t,)))(torch.ones(2, 2))
    ref = bilevel.hypergrad(pb, w0, h, di, do, strategy="unroll")
    with caplog.at_level(logging.INFO, logger="metagrad"):
        res = bilevel.hypergrad(pb, w0, h, di, do, strategy="forward")
    assert "could not vmap over tangent directions" in caplog.text
    assert _rel(_flat(res), _flat(ref)) < 1e-10
    # with a cache, only the first call tries (and pays for) the batched pass
    calls = _spy_batched(monkeypatch)
    cache = bilevel.Cache()
    flat = Flat(MetaParams(w0, h, pb.optimizer.hyperparams()), True)
    for _ in range(2):
        again = _forward.forward_mode(pb, flat, di, do, batched=False, cache=cache)
        assert _rel(_flat(again), _flat(ref)) < 1e-10
    assert len(calls) == 1


def _torch_has_the_scalar_dtype_bug() -> bool:
    lam = torch.tensor(0.1)
    out = torch.func.jvp(lambda a: 0.5 * a, (lam,), (torch.ones(()),))
    return bool(out[1].dtype != lam.dtype)


def test_float32_python_scalar_times_0d_tensor_gets_a_clear_error() -> None:
    if not _torch_has_the_scalar_dtype_bug():
        pytest.skip("this torch gives 0.5 * lam a float32 tangent (the bug is fixed)")
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g), torch.randn(20, generator=g)

    def bad(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        reg = (w["w"] ** 2).sum()
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + 0.5 * h["lam"] * reg

    def good(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        reg = (w["w"] ** 2).sum()
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + 0.5 * (h["lam"] * reg)

    def outer(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean()

    w0, h = {"w": torch.zeros(3)}, {"lam": torch.tensor(0.1, requires_grad=True)}
    pb = bilevel.Problem(bad, outer, optim.SGD(lr=0.1), steps=3)
    with pytest.raises(ValueError) as info:
        bilevel.hypergrad(pb, w0, h, (X, y), (X, y), strategy="forward")
    msg = str(info.value)
    assert "metagrad.bilevel.hypergrad(strategy='forward')" in msg
    assert "known torch 2.13 float32 forward-mode dtype issue" in msg
    assert "Python scalar times a 0-d tensor" in msg
    assert "0.5 * (lam * reg)" in msg and "float64" in msg and "strategy='unroll'" in msg
    assert isinstance(info.value.__cause__, RuntimeError)  # the real failure, chained
    assert "dtype" in str(info.value.__cause__)
    # the fixes it names work
    ref = bilevel.hypergrad(pb, w0, h, (X, y), (X, y), strategy="unroll")
    ok = bilevel.hypergrad(
        bilevel.Problem(good, outer, optim.SGD(lr=0.1), steps=3),
        w0,
        h,
        (X, y),
        (X, y),
        strategy="forward",
    )
    assert torch.allclose(ok.grads.h["lam"], ref.grads.h["lam"], rtol=1e-5)
    h64 = {"lam": torch.tensor(0.1, dtype=D, requires_grad=True)}
    w64 = {"w": torch.zeros(3, dtype=D)}
    res64 = bilevel.hypergrad(pb, w64, h64, (X.double(), y.double()), (X.double(), y.double()),
                              strategy="forward")  # fmt: skip
    assert torch.allclose(res64.grads.h["lam"].float(), ref.grads.h["lam"], rtol=1e-5)


def test_a_genuine_dtype_mistake_is_not_blamed_on_torch() -> None:
    X, y = torch.randn(20, 3, dtype=D), torch.randn(20)  # float64 data, float32 model

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + h["lam"] * (w["w"] ** 2).sum()

    pb = bilevel.Problem(f, f, optim.SGD(lr=0.1), steps=2)
    h = {"lam": torch.tensor(0.1, requires_grad=True)}
    with pytest.raises(RuntimeError, match="dtype") as info:
        bilevel.hypergrad(pb, {"w": torch.zeros(3)}, h, (X, y), (X, y), strategy="forward")
    assert "torch 2.13" not in str(info.value)
