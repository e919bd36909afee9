"""metagrad.compat.higher: higher's API and semantics on metagrad's engine.

Checked in float64:

* every differentiable optimizer's iterates equal ``torch.optim``'s for 20 steps (1e-12), with
  two parameter groups, weight sharing and partially used parameters;
* hypergradients through 5 steps (with respect to the initial weights and to tensor learning
  rates given by ``override``) equal an independent unrolled ``create_graph`` loop with
  hand-written torch update rules (1e-10) and central finite differences (1e-6);
* higher's MAML-Omniglot example (its training step rewritten on tiny random data) runs with
  the import changed and gives ``mg.MAML``'s meta-gradients;
* 1,000 ``innerloop_ctx`` iterations keep the resident memory flat (higher's issue #6);
* higher's documented API: ``monkeypatch``, fast weights and their history, ``params=``,
  submodule calls, ``make_functional``/``buffer_sync``, ``get_diff_optim``/``create_diff_optim``/
  ``register_optim``, ``grad_callback``, state copied from the torch optimizer, errors.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metagrad as mg
import metagrad.compat.higher as higher

STEPS = 5
Params = dict[str, Tensor]


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------------------- models
class Net(nn.Module):
    """Weight sharing (l3 is l2), a head used on even steps only (b), an unused parameter (c)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 4)
        self.l3 = self.l2
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2, bias=False)
        self.c = nn.Parameter(torch.randn(2))

    def forward(self, x: Tensor, use_b: bool = True) -> Tensor:
        h = torch.tanh(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x))))))
        out = self.a(h)
        return out + self.b(h) if use_b else out


def net_forward(w: Params, x: Tensor, use_b: bool = True) -> Tensor:
    h = torch.tanh(F.linear(x, w["l1.weight"], w["l1.bias"]))
    for _ in range(2):  # the shared layer, twice
        h = torch.tanh(F.linear(h, w["l2.weight"], w["l2.bias"]))
    out = F.linear(h, w["a.weight"], w["a.bias"])
    return out + F.linear(h, w["b.weight"]) if use_b else out


def plain_forward(w: Params, x: Tensor, use_b: bool = True) -> Tensor:
    return F.linear(torch.tanh(F.linear(x, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])


SCENARIOS: dict[str, tuple[Callable[[], nn.Module], Callable[..., Tensor]]] = {
    "plain": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), plain_forward),
    "shared+partial+groups": (Net, net_forward),
}


def step_kwargs(scenario: str, t: int) -> dict[str, Any]:
    return {"use_b": t % 2 == 0} if scenario != "plain" else {}


def data(steps: int) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)) for _ in range(steps)
    ]
    return batches, (torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g))


# ------------------------------------------------------- optimizers and their settings
O = torch.optim
CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], dict[str, Any]]] = {
    "SGD": (O.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
            {"lr": 0.05, "momentum": 0.5, "nesterov": True}),
    "Adam": (O.Adam, {"lr": 0.01, "weight_decay": 0.01}, {"lr": 0.02, "amsgrad": True, "betas": (0.8, 0.99)}),
    "AdamW": (O.AdamW, {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.02, "amsgrad": True}),
    "Adadelta": (O.Adadelta, {"lr": 1.0, "rho": 0.9, "weight_decay": 0.01}, {"lr": 0.5}),
    "Adagrad": (O.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
                {"lr": 0.05, "weight_decay": 0.01}),
    "Adamax": (O.Adamax, {"lr": 0.02, "weight_decay": 0.01}, {"lr": 0.01, "betas": (0.8, 0.99)}),
    "ASGD": (O.ASGD, {"lr": 0.05, "lambd": 0.01, "t0": 2.0}, {"lr": 0.02, "alpha": 0.5, "weight_decay": 0.01}),
    "RMSprop": (O.RMSprop, {"lr": 0.01, "momentum": 0.5}, {"lr": 0.005, "centered": True, "weight_decay": 0.01}),
    "Rprop": (O.Rprop, {"lr": 0.01}, {"lr": 0.02, "etas": (0.4, 1.3), "step_sizes": (1e-4, 1.0)}),
}  # fmt: skip
EXTRA = {
    "SGD-maximize": (O.SGD, {"lr": 0.01, "maximize": True}, {"lr": 0.01, "momentum": 0.9, "maximize": True}),
    "Adam-decoupled": (O.Adam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
                       {"lr": 0.02, "weight_decay": 0.2, "decoupled_weight_decay": True}),
    "Adam-maximize": (O.Adam, {"lr": 0.01, "maximize": True}, {"lr": 0.02}),
}  # fmt: skip


def torch_optimizer(name: str, model: nn.Module, scenario: str) -> torch.optim.Optimizer:
    cls, g0, g1 = {**CONFIGS, **EXTRA}[name]
    if scenario == "plain":
        return cls(model.parameters(), **g0)
    first = [p for n, p in model.named_parameters() if n.startswith(("l1.", "l2."))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("l1.", "l2."))]
    return cls([{"params": first, **g0}, {"params": rest, **g1}])


# ----------------------------------------- independent reference: torch's rules by hand
def _sgd(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any]) -> Tensor:
    g = -g if h["maximize"] else g
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    if h["momentum"]:
        buf = g if st["t"] == 1 else h["momentum"] * st["buf"] + (1 - h["dampening"]) * g
        st["buf"] = buf
        g = g + h["momentum"] * buf if h["nesterov"] else buf
    return p - h["lr"] * g


def _adam(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any], decoupled: bool) -> Tensor:
    t, (b1, b2) = st["t"], h["betas"]
    g = -g if h["maximize"] else g
    if decoupled or h.get("decoupled_weight_decay"):
        p = p * (1 - h["lr"] * h["weight_decay"])
    elif h["weight_decay"]:
        g = g + h["weight_decay"] * p
    m = b1 * st.get("m", 0) + (1 - b1) * g
    v = b2 * st.get("v", 0) + (1 - b2) * g * g
    st["m"], st["v"] = m, v
    if h["amsgrad"]:
        v = torch.maximum(st.get("vmax", torch.zeros_like(v)), v)
        st["vmax"] = v
    denom = v.sqrt() / math.sqrt(1 - b2**t) + h["eps"]
    return p - h["lr"] / (1 - b1**t) * m / denom


def _adadelta(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any]) -> Tensor:
    rho, eps = h["rho"], h["eps"]
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    sq = rho * st.get("sq", 0) + (1 - rho) * g * g
    delta = (st.get("acc", torch.zeros_like(p)) + eps).sqrt() / (sq + eps).sqrt() * g
    st["sq"], st["acc"] = sq, rho * st.get("acc", 0) + (1 - rho) * delta * delta
    return p - h["lr"] * delta


def _adagrad(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any]) -> Tensor:
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    clr = h["lr"] / (1 + (st["t"] - 1) * h["lr_decay"])
    s = st.get("sum", h["initial_accumulator_value"]) + g * g
    st["sum"] = s
    return p - clr * g / (s.sqrt() + h["eps"])


def _adamax(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any]) -> Tensor:
    b1, b2 = h["betas"]
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    m = b1 * st.get("m", 0) + (1 - b1) * g
    u = torch.maximum(b2 * st.get("u", torch.zeros_like(p)), g.abs() + h["eps"])
    st["m"], st["u"] = m, u
    return p - h["lr"] / (1 - b1 ** st["t"]) * m / u


def _asgd(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any]) -> Tensor:
    t, lr, lambd = st["t"], h["lr"], h["lambd"]
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    eta = lr / (1 + lambd * lr * (t - 1)) ** h["alpha"]
    return p * (1 - lambd * eta) - eta * g


def _rmsprop(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any]) -> Tensor:
    alpha = h["alpha"]
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    sq = alpha * st.get("sq", 0) + (1 - alpha) * g * g
    st["sq"] = sq
    if h["centered"]:
        ga = alpha * st.get("ga", 0) + (1 - alpha) * g
        st["ga"] = ga
        sq = sq - ga * ga
    d = g / (sq.sqrt() + h["eps"])
    if h["momentum"]:
        d = h["momentum"] * st.get("buf", 0) + d
        st["buf"] = d
    return p - h["lr"] * d


def _rprop(p: Tensor, g: Tensor, st: dict[str, Any], h: dict[str, Any]) -> Tensor:
    (eta_minus, eta_plus), (s_min, s_max) = h["etas"], h["step_sizes"]
    one = torch.ones_like(p)
    s_prev = st.get("s", one * h["lr"])
    sign = torch.sign(g * st.get("prev", torch.zeros_like(p)))
    factor = torch.where(sign > 0, eta_plus * one, torch.where(sign < 0, eta_minus * one, one))
    s = torch.clamp(s_prev * factor, s_min, s_max)
    g = torch.where(sign < 0, torch.zeros_like(g), g)
    st["s"], st["prev"] = s, g
    return p - torch.sign(g) * s


RULES: dict[str, Callable[..., Tensor]] = {
    "SGD": _sgd,
    "Adam": lambda *a: _adam(*a, decoupled=False),
    "AdamW": lambda *a: _adam(*a, decoupled=True),
    "Adadelta": _adadelta,
    "Adagrad": _adagrad,
    "Adamax": _adamax,
    "ASGD": _asgd,
    "RMSprop": _rmsprop,
    "Rprop": _rprop,
}


def reference_meta(
    name: str, scenario: str, model: nn.Module, lrs: list[Tensor] | None
) -> tuple[Tensor, Params]:
    """The outer loss after 5 unrolled steps, by hand; the initial weights are fresh leaves."""
    forward = SCENARIOS[scenario][1]
    opt = torch_optimizer(name, model, scenario)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [([names[id(p)] for p in g["params"]], dict(g)) for g in opt.param_groups]
    for _, cfg in groups:
        if "initial_accumulator_value" in cfg:
            # torch.optim.Adagrad fills every group's accumulators with the constructor's
            # value, not the group's.
            cfg["initial_accumulator_value"] = opt.defaults["initial_accumulator_value"]
    if lrs is not None:
        for (_, cfg), lr in zip(groups, lrs):
            cfg["lr"] = lr
    w0 = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    w, state = dict(w0), {n: {"t": 0} for n in w0}
    batches, (xv, yv) = data(STEPS)
    for t, (x, y) in enumerate(batches):
        loss = F.mse_loss(forward(w, x, **step_kwargs(scenario, t)), y)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True, allow_unused=True)
        by_name = dict(zip(w, grads))
        new = dict(w)
        for group_names, cfg in groups:
            for n in group_names:
                if by_name[n] is None:
                    continue  # torch.optim skips a parameter without gradient
                state[n]["t"] += 1
                new[n] = RULES[name](w[n], by_name[n], state[n], cfg)
        w = new
    return F.mse_loss(forward(w, xv), yv), w0


def compat_meta(name: str, scenario: str, model: nn.Module, lrs: list[Tensor] | None) -> Tensor:
    """The same outer loss through metagrad.compat.higher.innerloop_ctx."""
    opt = torch_optimizer(name, model, scenario)
    override = None if lrs is None else {"lr": list(lrs)}
    batches, (xv, yv) = data(STEPS)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (
        fmodel,
        diffopt,
    ):
        for t, (x, y) in enumerate(batches):
            diffopt.step(F.mse_loss(fmodel(x, **step_kwargs(scenario, t)), y))
        return F.mse_loss(fmodel(xv), yv)


def lr_tensors(name: str, scenario: str) -> list[Tensor] | None:
    if scenario == "plain":
        return None
    _, g0, g1 = CONFIGS[name]
    return [torch.tensor(g["lr"], requires_grad=True) for g in (g0, g1)]


# ------------------------------------------------------------------------ iterates
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", [*CONFIGS, *EXTRA])
def test_iterates_equal_torch_optim_for_20_steps(name: str, scenario: str) -> None:
    model = SCENARIOS[scenario][0]()
    twin = copy.deepcopy(model)
    batches, _ = data(20)
    with higher.innerloop_ctx(model, torch_optimizer(name, model, scenario)) as (fmodel, diffopt):
        for t, (x, y) in enumerate(batches):
            diffopt.step(F.mse_loss(fmodel(x, **step_kwargs(scenario, t)), y))
        fast = dict(zip([n for n, _ in model.named_parameters()], fmodel.fast_params))
    ref = torch_optimizer(name, twin, scenario)
    for t, (x, y) in enumerate(batches):
        ref.zero_grad()
        F.mse_loss(twin(x, **step_kwargs(scenario, t)), y).backward()
        ref.step()
    for n, p in twin.named_parameters():
        torch.testing.assert_close(fast[n].detach(), p.detach(), rtol=0, atol=1e-12, msg=n)
    if scenario != "plain":
        assert torch.equal(fast["c"], model.c)  # never used: never updated


# ------------------------------------------------------------------- hypergradients
def compat_backward(name: str, scenario: str) -> tuple[nn.Module, list[Tensor] | None]:
    """A fresh model of ``scenario`` and its learning-rate tensors, after ``backward()`` of
    the compat meta-loss (gradients in ``.grad``)."""
    model = SCENARIOS[scenario][0]()
    lrs = lr_tensors(name, scenario)
    compat_meta(name, scenario, model, lrs).backward()
    return model, lrs


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hypergradients_equal_unrolled_reference(name: str, scenario: str) -> None:
    model, lrs = compat_backward(name, scenario)
    ref_lrs = None if lrs is None else [lr.detach().clone().requires_grad_() for lr in lrs]
    ref_loss, w0 = reference_meta(name, scenario, model, ref_lrs)
    leaves = [*w0.values(), *(ref_lrs or [])]
    ref = torch.autograd.grad(ref_loss, leaves, allow_unused=True)
    got = [p.grad for p in model.parameters()] + [lr.grad for lr in lrs or []]
    for (n, _), g, r in zip([*w0.items(), *[("lr", None)] * len(lrs or [])], got, ref):
        if r is None:
            assert g is None, n  # the unused parameter gets no gradient
        else:
            assert g is not None, n
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=n)
    assert any(float(g.abs().max()) > 1e-3 for g in got if g is not None)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hypergradients_equal_finite_differences(name: str, scenario: str) -> None:
    model, lrs = compat_backward(name, scenario)
    eps = 1e-6
    direction = [torch.randn_like(p) for p in model.parameters()]

    def value(shift: float, lr_shift: float) -> float:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(m.parameters(), direction):
                p.add_(shift * d)
        shifted = None
        if lrs is not None:
            shifted = [torch.tensor(float(lrs[0].detach()) + lr_shift), lrs[1].detach()]
        return float(compat_meta(name, scenario, m, shifted).detach())

    fd = (value(eps, 0.0) - value(-eps, 0.0)) / (2 * eps)
    analytic = sum(
        float((p.grad * d).sum())
        for p, d in zip(model.parameters(), direction)
        if p.grad is not None
    )
    assert abs(fd - analytic) < 1e-6 * max(1.0, abs(analytic)), (fd, analytic)
    if lrs is not None:
        fd_lr = (value(0.0, eps) - value(0.0, -eps)) / (2 * eps)
        assert lrs[0].grad is not None
        g_lr = float(lrs[0].grad)
        assert abs(fd_lr - g_lr) < 1e-6 * max(1.0, abs(g_lr)), (fd_lr, g_lr)


def test_adam_zero_gradients_give_finite_meta_gradients() -> None:
    # Input column 0 is always 0, so the weights reading it get exactly zero gradients:
    # sqrt(v) at v = 0 has an infinite derivative; higher masks it, so must we.
    model = nn.Linear(3, 1)
    x = torch.randn(8, 3)
    x[:, 0] = 0
    y = torch.randn(8, 1)
    for cls in (O.Adam, O.AdamW, O.Adagrad, O.RMSprop):
        model.zero_grad()
        opt = cls(model.parameters(), lr=0.1)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(x), y))
            F.mse_loss(fmodel(x), y).backward()
        assert torch.isfinite(model.weight.grad).all(), cls.__name__
        assert float(model.weight.grad[0, 1:].abs().sum()) > 0


# ------------------------------------------------------------ higher's MAML-Omniglot
class Flatten(nn.Module):
    """The example's own Flatten (a custom module: the net is not all torch.nn)."""

    def forward(self, input: Tensor) -> Tensor:
        return input.view(input.size(0), -1)


def omniglot_net(n_way: int, ch: int = 8) -> nn.Module:
    def block(c_in: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, ch, 3),
            nn.BatchNorm2d(ch, momentum=1, affine=True),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        ]

    return nn.Sequential(*block(1), *block(ch), *block(ch), Flatten(), nn.Linear(ch, n_way))


def maml_train_step(
    hi: Any,
    net: nn.Module,
    meta_opt: torch.optim.Optimizer,
    x_spt: Tensor,
    y_spt: Tensor,
    x_qry: Tensor,
    y_qry: Tensor,
) -> tuple[Params, list[Tensor]]:
    """higher's examples/maml-omniglot.py ``train`` body, one batch; ``hi`` is the module."""
    net.train()
    task_num = x_spt.size(0)
    n_inner_iter = 5
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
    qry_losses = []
    meta_opt.zero_grad()
    for i in range(task_num):
        with hi.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(n_inner_iter):
                spt_logits = fnet(x_spt[i])
                spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                diffopt.step(spt_loss)
            qry_logits = fnet(x_qry[i])
            qry_loss = F.cross_entropy(qry_logits, y_qry[i])
            qry_losses.append(qry_loss.detach())
            qry_loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    meta_opt.step()
    return grads, qry_losses


def omniglot_batch(
    task_num: int, n_way: int, k_spt: int, k_qry: int, seed: int
) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x_spt = torch.rand(task_num, n_way * k_spt, 1, 28, 28, generator=g)
    x_qry = torch.rand(task_num, n_way * k_qry, 1, 28, 28, generator=g)
    y_spt = torch.arange(n_way).repeat_interleave(k_spt).repeat(task_num, 1)
    y_qry = torch.arange(n_way).repeat_interleave(k_qry).repeat(task_num, 1)
    return x_spt, y_spt, x_qry, y_qry


def test_maml_omniglot_example_matches_mg_maml() -> None:
    n_way, task_num = 5, 2
    net = omniglot_net(n_way)
    twin = copy.deepcopy(net)
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    learner = mg.MAML(twin, F.cross_entropy, 0.1, 5, order=2)
    buffers = copy.deepcopy(dict(net.named_buffers()))
    for it in range(2):  # two meta-steps: nothing carries over between them but the weights
        x_spt, y_spt, x_qry, y_qry = omniglot_batch(task_num, n_way, 1, 2, seed=it)
        grads, _ = maml_train_step(higher, net, meta_opt, x_spt, y_spt, x_qry, y_qry)
        expected = learner.meta_grad(x_spt, y_spt, x_qry, y_qry)
        for n, g in grads.items():
            ref = expected[f"module.{n}"]
            assert ref is not None
            torch.testing.assert_close(g / task_num, ref, rtol=0, atol=1e-10, msg=n)
        twin_opt.zero_grad()
        for n, p in twin.named_parameters():
            p.grad = expected[f"module.{n}"] * task_num  # the example sums the task losses
        twin_opt.step()
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n  # the net's BatchNorm statistics are untouched


def test_maml_omniglot_example_matches_real_higher() -> None:
    real = pytest.importorskip("higher")
    n_way = 5
    net = omniglot_net(n_way)
    twin = copy.deepcopy(net)
    batch = omniglot_batch(2, n_way, 1, 2, seed=5)
    ours, _ = maml_train_step(higher, net, torch.optim.SGD(net.parameters(), lr=0.0), *batch)
    theirs, _ = maml_train_step(real, twin, torch.optim.SGD(twin.parameters(), lr=0.0), *batch)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=1e-10, msg=n)


# --------------------------------------------------------------------------- memory
def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_memory_stays_flat_over_1000_iterations() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meta = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def iteration() -> None:
        meta.zero_grad()
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.mse_loss(fmodel(x), y))
            F.mse_loss(fmodel(x), y).backward()
        meta.step()

    gc.collect()
    gc.disable()  # flat by reference counting alone: no cycles to wait for
    try:
        for _ in range(100):  # warm-up: allocator pools, lazy initializations
            iteration()
        start = _rss_kb()
        for _ in range(1000):
            iteration()
        growth = _rss_kb() - start
    finally:
        gc.enable()
    assert growth < 2048, f"RSS grew by {growth} kB over 1,000 iterations"


# ------------------------------------------------------------------ patch semantics
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_monkeypatch_forward_history_and_manual_unroll() -> None:
    model = _mlp()
    fmodel = higher.monkeypatch(model)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fmodel(x), model(x))
    params0 = list(fmodel.parameters())
    assert all(p.is_leaf and p.requires_grad for p in params0)  # copy_initial_weights=True
    for _ in range(3):
        loss = fmodel(x).pow(2).sum()
        grads = torch.autograd.grad(loss, fmodel.parameters(), create_graph=True)
        fmodel.fast_params = [p - 0.1 * g for p, g in zip(fmodel.parameters(), grads)]
    assert len(fmodel._fast_params) == 4
    final = torch.autograd.grad(fmodel(x).sum(), fmodel.parameters(time=0))
    assert all(g is not None for g in final)
    assert fmodel.init_fast_params[0] is params0[0]
    new = [torch.zeros_like(p) for p in params0]
    assert torch.equal(fmodel(x, params=new), torch.zeros(5, 2))
    assert fmodel.fast_params[0] is new[0]  # params= become the latest fast weights
    fmodel.update_params(params0)
    torch.testing.assert_close(fmodel(x), model(x))
    with pytest.raises(ValueError, match="2 tensors for the model's 4 parameters"):
        fmodel.update_params(params0[:2])


def test_copy_initial_weights_false_reaches_the_model() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(x).pow(2).sum())
        total = sum(p.sum() for p in fmodel.parameters())
        expected = torch.autograd.grad(total, fmodel.parameters(time=0), retain_graph=True)
        total.backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_track_higher_grads_false_is_test_mode() -> None:
    model = _mlp()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False) as (
        fmodel,
        diffopt,
    ):
        init = list(fmodel.parameters(time=0))
        for _ in range(3):
            new = diffopt.step(fmodel(x).pow(2).sum())
        assert all(p.grad_fn is None for p in new)
        assert not new[1].requires_grad  # frozen stays frozen
        assert torch.equal(new[1], model[0].bias)
        total = sum(p.sum() for p in fmodel.parameters())
        grads = torch.autograd.grad(total, [p for p in init if p.requires_grad], allow_unused=True)
        with pytest.raises(ValueError, match="not kept when track_higher_grads=False"):
            fmodel.init_fast_params  # noqa: B018
        with pytest.raises(ValueError, match="only the latest"):
            fmodel.parameters(time=2)
    assert all(g is None for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_module_is_never_modified() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).train()
    with torch.no_grad():
        model(torch.randn(6, 4))
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.randn(6, 4)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(x).pow(2).mean())
        own = dict(fmodel.named_buffers())
        assert int(own["1.num_batches_tracked"]) == before["1.num_batches_tracked"] + 3
        assert not torch.equal(own["1.running_mean"], before["1.running_mean"])
        fmodel.eval()
        assert fmodel.training is False and model.training is True
        fmodel(x).pow(2).mean().backward()
    assert type(model) is nn.Sequential and not hasattr(model, "fast_params")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training for m in model.modules())


def test_submodules_methods_and_attributes_use_fast_weights() -> None:
    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(3, 4)
            self.scale = 2.0

        def embed(self, x: Tensor) -> Tensor:
            return self.scale * self.f(x)

        def forward(self, x: Tensor) -> Tensor:
            return self.embed(x).sum(-1)

    model = Enc()
    fmodel = higher.monkeypatch(model)
    x = torch.randn(2, 3)
    assert torch.equal(fmodel.f(x), model.f(x))  # higher's direct submodule call
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    fmodel.fast_params = zeros
    assert torch.equal(fmodel.f(x), torch.zeros(2, 4))
    assert torch.equal(fmodel.embed(x), torch.zeros(2, 4))
    assert fmodel.scale == 2.0 and fmodel.f.weight is zeros[0]
    seq = higher.monkeypatch(_mlp())
    expected = seq.fast_params[-2].sum(1) + seq.fast_params[-1]
    torch.testing.assert_close(seq[2](torch.ones(1, 3)), expected.unsqueeze(0))


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_modules(cls: type[nn.RNNBase]) -> None:
    rnn = cls(5, 6, 2)
    frnn = higher.monkeypatch(rnn)
    x = torch.randn(4, 3, 5)
    out, _ = rnn(x)
    fout, _ = frnn(x)
    torch.testing.assert_close(fout, out)
    grads = torch.autograd.grad(fout.sum(), frnn.parameters(), create_graph=True)
    frnn.fast_params = [p - 0.1 * g for p, g in zip(frnn.parameters(), grads)]
    final = torch.autograd.grad(frnn(x)[0].sum(), frnn.parameters(time=0))
    assert all(g is not None for g in final)


def test_make_functional_and_buffer_sync() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
    fmodule = higher.patch.make_functional(model)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no fast weights of its own"):
        fmodule(x)
    params = higher.utils.get_func_params(model)
    torch.testing.assert_close(fmodule(x, params=params), model(x))
    with torch.no_grad():
        model[1].running_mean.add_(1.0)
    higher.patch.buffer_sync(model, fmodule)
    torch.testing.assert_close(fmodule(x), model(x))


# ------------------------------------------------------------------- optim semantics
def test_step_with_explicit_params_and_no_fmodel() -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    diffopt = higher.get_diff_optim(opt, model.parameters())
    fmodel = higher.patch.make_functional(model)
    params = higher.utils.get_func_params(model)
    x = torch.randn(5, 4)
    for _ in range(3):
        params = diffopt.step(fmodel(x, params=params).pow(2).sum(), params=params)
    ref = torch.optim.Adam(twin.parameters(), lr=0.05)
    for _ in range(3):
        ref.zero_grad()
        twin(x).pow(2).sum().backward()
        ref.step()
    for p, q in zip(params, twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="params must be given"):
        diffopt.step(fmodel(x, params=params).sum())


def test_create_diff_optim() -> None:
    model = _mlp()
    fmodel = higher.monkeypatch(model)
    diffopt = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, fmodel=fmodel)
    x = torch.randn(5, 4)
    diffopt.step(fmodel(x).pow(2).sum())
    assert len(fmodel._fast_params) == 2
    groups = [
        {"params": list(fmodel.parameters())[:2], "lr": 0.5},
        {"params": list(fmodel.parameters())[2:]},
    ]
    diffopt = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1}, params=groups, fmodel=fmodel)
    assert [g["lr"] for g in diffopt.param_groups] == [0.5, 0.1]
    with pytest.raises(ValueError, match=r"params=.*or fmodel="):
        higher.create_diff_optim(torch.optim.SGD, {"lr": 0.1})


def test_state_of_the_torch_optimizer_is_carried_over() -> None:
    model = _mlp()
    x = torch.randn(5, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    twin_opt.load_state_dict(opt.state_dict())
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(fmodel(x).pow(2).sum())
        assert diffopt.state[0][0]["step"] == 5
        fast = list(fmodel.parameters())
    for _ in range(2):
        twin_opt.zero_grad()
        twin(x).pow(2).sum().backward()
        twin_opt.step()
    for p, q in zip(fast, twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


def test_override_and_grad_callback() -> None:
    model = _mlp()
    x = torch.randn(5, 4)
    lr = torch.tensor(0.1, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def clip(grads: list[Tensor | None]) -> list[Tensor | None]:
        return [None if g is None else g.clamp(-0.01, 0.01) for g in grads]

    with higher.innerloop_ctx(model, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        start = list(fmodel.parameters())
        new = diffopt.step(fmodel(x).pow(2).sum(), grad_callback=clip)
        moved = max(float((a - b).detach().abs().max()) for a, b in zip(new, start))
        assert moved <= 0.1 * 0.01 + 1e-15
        lr2 = torch.tensor(0.2, requires_grad=True)
        diffopt.step(fmodel(x).pow(2).sum(), override={"lr": lr2})
        assert diffopt.param_groups[0]["lr"] is lr2
        fmodel(x).pow(2).sum().backward()
    assert lr.grad is not None and lr2.grad is not None
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="override names 'lrr'"):
            diffopt.step(fmodel(x).sum(), override={"lrr": [lr]})
        with pytest.raises(ValueError, match="3 values for 1 parameter groups"):
            diffopt.step(fmodel(x).sum(), override={"lr": [lr, lr, lr]})
        with pytest.raises(ValueError, match=r"scalar tensor, got shape \(5, 2\)"):
            diffopt.step(fmodel(x))


def test_trainable_opt_params_round_trip() -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    override = higher.optim.get_trainable_opt_params(opt)
    assert set(override) >= {"lr", "betas", "eps", "weight_decay"} and "amsgrad" not in override
    assert override["lr"][0].requires_grad and len(override["betas"][0]) == 2
    with torch.no_grad():
        override["lr"][0].fill_(0.05)
    higher.optim.apply_trainable_opt_params(opt, override)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert isinstance(opt.param_groups[0]["betas"][0], float)


def test_register_optim_with_a_higher_style_subclass() -> None:
    class SignSGD(torch.optim.SGD):
        """A torch optimizer higher does not know."""

    class DifferentiableSignSGD(higher.optim.DifferentiableOptimizer):
        # Written the way higher's README says: mutate group["params"] and state.
        def _update(self, grouped_grads: Any, **kwargs: Any) -> None:
            for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                for pi, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is None:
                        continue
                    self.state[gi][pi]["n"] = self.state[gi][pi].get("n", 0) + 1
                    group["params"][pi] = p - group["lr"] * torch.tanh(g)

    model = _mlp()
    opt = SignSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="register_optim"):
        with higher.innerloop_ctx(model, opt):
            pass
    higher.register_optim(SignSGD, DifferentiableSignSGD)
    x = torch.randn(5, 4)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        start = list(fmodel.parameters())
        loss = fmodel(x).pow(2).sum()
        grads = torch.autograd.grad(loss, start, retain_graph=True)
        new = diffopt.step(loss)
        for p, q, g in zip(new, start, grads):
            torch.testing.assert_close(p, q - 0.1 * torch.tanh(g))
        assert diffopt.state[0][0]["n"] == 1
        fmodel(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError, match="subclass of"):
        higher.register_optim(SignSGD, object)  # type: ignore[arg-type]


def test_unsupported_optimizer_and_bad_arguments() -> None:
    model = _mlp()
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(
        ValueError, match=r"innerloop_ctx: optimizer type torch\.optim\.lbfgs\.LBFGS"
    ):
        with higher.innerloop_ctx(model, lbfgs):
            pass
    with pytest.raises(TypeError, match=r"metagrad\.bilevel\.innerloop"):
        with higher.innerloop_ctx(model, mg.optim.SGD(lr=0.1)):  # type: ignore[arg-type]
            pass
    other = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not in reference_params"):
        higher.get_diff_optim(other, model.parameters())
    with pytest.raises(ValueError, match="track_higher_grads must be True or False"):
        higher.monkeypatch(model).track_higher_grads = 1  # type: ignore[assignment]


def test_utils() -> None:
    model = _mlp()
    copies = higher.utils.get_func_params(model)
    assert all(
        c.is_leaf and c.requires_grad and c.data_ptr() != p.data_ptr()
        for c, p in zip(copies, model.parameters())
    )
    assert higher.utils.flatten({"a": [1, (2, 3)], "b": {"c": 4}}) == [1, 2, 3, 4]
    shared = Net()
    # Root parameters first (c), then submodules depth-first; l3 repeats l2's indices.
    assert higher.utils._get_param_mapping(shared, [], []) == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert higher.utils._find_param_in_list(shared.b.weight, shared.parameters()) == 7


def test_attention_layers_at_second_order() -> None:
    # higher 0.2.1 fails here: PyTorch's fused CPU attention has no double backward.
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model.eval()
    x = torch.randn(3, 5, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(fmodel(x).pow(2).mean())
        fmodel(x).pow(2).mean().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with mg.bilevel.innerloop(model, mg.optim.SGD(lr=0.1)) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(fmodel(x).pow(2).mean())
        fmodel(x).pow(2).mean().backward()
    for g, p in zip(ours, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-12)
