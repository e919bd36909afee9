"""``Problem(prepare=...)``: hyperparameters transformed once, gradients still w.r.t. the raw ``h``.

Reference: the same problem with the transform written inside the objectives (evaluated at every
step), which every strategy already differentiates; both must agree to float64 round-off, and
the transform must run once per problem on the strategies that share it across steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor

from metagrad import bilevel, optim

D = torch.float64


def _data(P: int | None) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    shape = (20, 3) if P is None else (P, 20, 3)
    x = torch.randn(*shape, generator=g, dtype=D)
    y = torch.randn(*shape[:-1], generator=g, dtype=D)
    return (x, y), (x + 0.1, y)


def _objectives(transformed: bool) -> tuple[Any, Any, Any]:
    def rates(h: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"lam": h["log_lam"].exp(), "lr": 0.05 + torch.sigmoid(h["a"]) * 0.1}

    get = (lambda h: h) if transformed else rates

    def f(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        r = get(h)
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + r["lam"] * (w["w"] ** 2).sum()

    def g(w: dict[str, Tensor], h: dict[str, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
        return ((b[0] @ w["w"] - b[1]) ** 2).mean() + 0.1 * get(h)["lam"]

    def lr(h: dict[str, Tensor], step: int, name: str) -> Tensor:
        return get(h)["lr"]

    return f, g, lr


def _problem(transformed: bool, calls: list[int] | None = None, steps: int = 4) -> bilevel.Problem:
    f, g, lr = _objectives(transformed)

    def prepare(h: dict[str, Tensor]) -> dict[str, Tensor]:
        if calls is not None:
            calls.append(1)
        return {"lam": h["log_lam"].exp(), "lr": 0.05 + torch.sigmoid(h["a"]) * 0.1}

    return bilevel.Problem(
        f,
        g,
        optim.SGD(lr=1.0, momentum=0.5),
        steps,
        lr=lr,
        prepare=prepare if transformed else None,
    )


def _h() -> dict[str, Tensor]:
    return {
        "log_lam": torch.tensor(-1.0, dtype=D, requires_grad=True),
        "a": torch.tensor(0.3, dtype=D, requires_grad=True),
    }


def _rel(a: list[Tensor | None], b: list[Tensor | None]) -> float:
    assert [x is None for x in a] == [y is None for y in b]
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return num / sum(float(y.norm() ** 2) for y in b) ** 0.5


@pytest.mark.parametrize(
    "strategy", ["unroll", "adjoint", "checkpoint", "forward", "implicit", "auto"]
)
def test_prepare_gives_the_gradient_of_the_raw_hyperparameters(strategy: str) -> None:
    inner, outer = _data(None)
    w0 = {"w": torch.zeros(3, dtype=D, requires_grad=True)}
    steps = 200 if strategy == "implicit" else 4
    out = []
    for transformed in (False, True):
        h = _h()
        pb = _problem(transformed, steps=steps)
        res = bilevel.hypergrad(pb, w0, h, inner, outer, strategy=strategy)
        out.append([res.grads.h["log_lam"], res.grads.h["a"], res.grads.w0["w"]])
        assert res.foreign == []
    tol = 1e-6 if strategy == "implicit" else 1e-12
    assert _rel(out[1], out[0]) < tol


def test_prepare_under_vmap_and_truncation() -> None:
    inner, outer = _data(3)
    w0 = {"w": torch.zeros(3, dtype=D, requires_grad=True)}
    for kw in ({"strategy": "vmap"}, {"strategy": "truncated", "truncate": 2}):
        out = []
        for transformed in (False, True):
            res = bilevel.hypergrad(
                _problem(transformed), w0, _h(), inner, outer, batched=True, **kw
            )
            out.append([res.grads.h["log_lam"], res.grads.h["a"]])
        assert _rel(out[1], out[0]) < 1e-12, kw


def test_prepare_runs_once_per_problem_in_the_unrolled_loop() -> None:
    inner, outer = _data(None)
    w0 = {"w": torch.zeros(3, dtype=D)}
    calls: list[int] = []
    pb = _problem(True, calls, steps=10)
    bilevel.hypergrad(pb, w0, _h(), inner, outer, strategy="unroll")
    assert len(calls) == 1


def test_prepare_matches_finite_differences() -> None:
    inner, outer = _data(None)
    w0 = {"w": torch.zeros(3, dtype=D)}
    pb = _problem(True)
    h = _h()
    res = bilevel.hypergrad(pb, w0, h, inner, outer, strategy="unroll")
    eps = 1e-6
    for key in h:
        hp = {k: v.detach().clone() for k, v in h.items()}
        hm = {k: v.detach().clone() for k, v in h.items()}
        hp[key] += eps
        hm[key] -= eps
        vp = bilevel.hypergrad(pb, w0, hp, inner, outer).value
        vm = bilevel.hypergrad(pb, w0, hm, inner, outer).value
        fd = (vp - vm) / (2 * eps)
        assert abs(float(fd - res.grads.h[key])) < 1e-7 * max(1.0, abs(float(fd)))


def test_prepare_must_be_callable() -> None:
    with pytest.raises(TypeError, match="prepare=3 must be a callable"):
        dataclasses.replace(_problem(False), prepare=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ["unroll", "adjoint", "auto"])
def test_tensor_closed_over_by_prepare_gets_its_gradient(strategy: str) -> None:
    """A tensor that requires grad and enters only through ``prepare`` is found and gets the
    same gradient as when the objectives use it directly."""
    inner, outer = _data(None)
    w0 = {"w": torch.zeros(3, dtype=D)}
    f, g, lr = _objectives(True)
    scale = torch.tensor(1.5, dtype=D, requires_grad=True)

    def prepare(h: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"lam": scale * h["log_lam"].exp(), "lr": 0.05 + torch.sigmoid(h["a"]) * 0.1}

    pb = bilevel.Problem(f, g, optim.SGD(lr=1.0, momentum=0.5), 4, lr=lr, prepare=prepare)
    res = bilevel.hypergrad(pb, w0, _h(), inner, outer, strategy=strategy)
    assert len(res.foreign) == 1 and res.foreign[0][0] is scale
    # reference: the same value as a hyperparameter of its own (in h, not closed over)
    pb2 = bilevel.Problem(
        f,
        g,
        optim.SGD(lr=1.0, momentum=0.5),
        4,
        lr=lr,
        prepare=lambda h: {
            "lam": h["scale"] * h["log_lam"].exp(),
            "lr": 0.05 + torch.sigmoid(h["a"]) * 0.1,
        },
    )
    h2 = {**_h(), "scale": torch.tensor(1.5, dtype=D, requires_grad=True)}
    ref = bilevel.hypergrad(pb2, w0, h2, inner, outer, strategy="unroll")
    assert _rel([res.foreign[0][1]], [ref.grads.h["scale"]]) < 1e-12
