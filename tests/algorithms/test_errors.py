"""Bad input: each error names the public function, the value received and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import MODELS, tasks
from torch import Tensor, nn

from metagrad._errors import NonFiniteError
from metagrad.algorithms import ANIL, MAML, MetaSGD, Reptile
from metagrad.algorithms._task import STRATEGIES

ENGINES = ["loop", "vmap"] + [s for s in ("hvp_chain",) if s in STRATEGIES]

F64 = torch.float64
LEARNERS = {
    "maml-loop": lambda m: MAML(m, F.mse_loss, 0.1, 2, strategy="loop"),
    "maml-vmap": lambda m: MAML(m, F.mse_loss, 0.1, 2, strategy="vmap"),
    "reptile": lambda m: Reptile(m, F.mse_loss, 0.1, 2),
}


@pytest.fixture(params=list(LEARNERS))
def learner(request: pytest.FixtureRequest) -> nn.Module:
    return LEARNERS[request.param](MODELS["mlp"]())


def test_mismatched_task_counts(learner: nn.Module) -> None:
    xs, ys, xq, yq = tasks("mlp", T=3)
    with pytest.raises(
        ValueError, match=r"meta_loss: the leading \(task\) dimensions differ.*'ys': 2"
    ):
        learner.meta_loss(xs, ys[:2], xq, yq)


def test_mismatched_examples_between_inputs_and_targets(learner: nn.Module) -> None:
    xs, ys, xq, yq = tasks("mlp")
    with pytest.raises(ValueError, match=r"meta_loss: xs has 5 examples per task but ys has 4"):
        learner.meta_loss(xs, ys[:, :4], xq, yq)


def test_empty_support(learner: nn.Module) -> None:
    xs, ys, xq, yq = tasks("mlp")
    with pytest.raises(ValueError, match=r"meta_loss: the support set is empty.*at least one"):
        learner.meta_loss(xs[:, :0], ys[:, :0], xq, yq)


def test_wrong_dtype(learner: nn.Module) -> None:
    xs, ys, xq, yq = tasks("mlp")
    with pytest.raises(
        TypeError,
        match=r"meta_loss: xs has dtype torch.float32 but the model's parameters are torch.float64; cast with xs.to",
    ):
        learner.meta_loss(xs.float(), ys, xq, yq)
    with pytest.raises(TypeError, match=r"adapt: x has dtype torch.float32"):
        learner.adapt(xs[0].float(), ys[0])


def test_adapt_messages_name_x_and_y(learner: nn.Module) -> None:
    xs, ys, _, _ = tasks("mlp")
    with pytest.raises(TypeError, match=r"adapt: x must be one task's torch.Tensor .* got list"):
        learner.adapt([xs[0]], ys[0])
    with pytest.raises(ValueError, match=r"adapt: x has 5 examples but y has 4"):
        learner.adapt(xs[0], ys[0, :4])
    with pytest.raises(ValueError, match=r"adapt: the support set is empty \(x.shape=\(0, 1\)\)"):
        learner.adapt(xs[0, :0], ys[0, :0])


def test_non_tensor_input(learner: nn.Module) -> None:
    xs, ys, xq, yq = tasks("mlp")
    with pytest.raises(
        TypeError, match=r"meta_loss: xq must be a torch.Tensor .* got list.*torch.stack"
    ):
        learner.meta_loss(xs, ys, [xq[0], xq[1]], yq)
    with pytest.raises(
        ValueError,
        match=r"meta_loss: xs has shape \(5,\); expected \[tasks, examples, ...\].*unsqueeze\(0\)",
    ):
        learner.meta_loss(xs[0, :, 0], ys, xq, yq)


def test_non_scalar_loss(learner: nn.Module) -> None:
    """Used to surface as autograd's 'grad can be implicitly created only for scalar outputs'."""
    learner.loss_fn = lambda p, y: (p - y) ** 2
    with pytest.raises(
        ValueError, match=r"loss_fn must return a scalar tensor .* got \(5, 1\).*mean"
    ):
        learner.meta_loss(*tasks("mlp"))


@pytest.mark.parametrize("strategy", ENGINES)
@pytest.mark.parametrize(
    ("tensor", "index", "value", "match", "task", "step"),
    [
        (0, (2, 1), float("nan"), r"support loss at task 2, inner step 0", 2, 0),  # xs
        (3, (1, 0), float("inf"), r"query loss at task 1", 1, None),  # yq
    ],
    ids=["nan-in-support-data-names-task-and-step", "inf-in-query-data-names-task"],
)
def test_non_finite_data_names_task_and_step(
    strategy: str,
    tensor: int,
    index: tuple[int, int],
    value: float,
    match: str,
    task: int,
    step: int | None,
) -> None:
    learner = MAML(MODELS["mlp"](), F.mse_loss, 0.1, 2, strategy=strategy)
    data = tasks("mlp", T=3)  # xs, ys, xq, yq
    data[tensor][index] = value
    with pytest.raises(NonFiniteError, match=match) as info:
        learner.meta_loss(*data)
    assert (info.value.task, info.value.step) == (task, step)


@pytest.mark.parametrize("strategy", ENGINES)
def test_divergence_names_task_and_step(strategy: str) -> None:
    """w' = w (1 - 2 s^2) with 2 s^2 = 1e100 + 1 for task 1: loss 5e99 at step 0, 5e299 at
    step 1, overflow (inf) at step 2. Task 0 (s = 1) stays finite."""
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    learner = MAML(model, F.mse_loss, 1.0, 3, strategy=strategy)
    s = torch.tensor([1.0, (0.5e100 + 0.5) ** 0.5], dtype=F64)
    xs = s.reshape(2, 1, 1)
    zeros = torch.zeros(2, 1, 1, dtype=F64)
    with pytest.raises(NonFiniteError, match=r"task 1, inner step 2") as info:
        learner.meta_loss(xs, zeros, xs, zeros)
    assert (info.value.task, info.value.step) == (1, 2)


def test_check_finite_false_lets_nan_through() -> None:
    learner = MAML(MODELS["mlp"](), F.mse_loss, 0.1, 1, check_finite=False)
    xs, ys, xq, yq = tasks("mlp")
    xs[0, 0] = float("nan")
    assert torch.isnan(learner.meta_loss(xs, ys, xq, yq))


def test_vmap_finiteness_check_with_a_parameter_frozen_after_building() -> None:
    # The vmapped meta-gradient returns one finiteness flag per gradient, including one for a
    # parameter frozen after the learner was built (its gradient is returned as None); only the
    # flags of returned gradients decide, so a finite result passes the check.
    model = MODELS["mlp"]()
    learner = MAML(model, F.mse_loss, 0.1, 1, strategy="vmap")
    model[0].weight.requires_grad_(False)
    grads = learner.meta_grad(*tasks("mlp", T=3))
    assert grads["module.0.weight"] is None
    assert all(bool(torch.isfinite(g).all()) for g in grads.values() if g is not None)


class InPlace(nn.Module):
    """sigmoid saves its output for backward; mul_ then overwrites it."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(1, 8, dtype=F64))
        self.V = nn.Parameter(torch.randn(8, 1, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.sigmoid(x @ self.W)
        h.mul_(2)
        return h @ self.V


@pytest.mark.parametrize("order", [1, 2])
def test_in_place_op_is_explained(order: int) -> None:
    learner = MAML(InPlace(), F.mse_loss, 0.1, 1, order)
    with pytest.raises(
        RuntimeError,
        match=rf"MAML: the model's forward modifies a tensor in place .*order={order}.*out-of-place",
    ):
        learner.meta_loss(*tasks("mlp"))


class Unused(nn.Sequential):
    """A stock container (so vmap is allowed) whose last layer never reaches the output."""

    def forward(self, x: Tensor) -> Tensor:
        return self[2](self[1](self[0](x)))


@pytest.mark.parametrize("strategy", [*ENGINES, "auto"])
def test_parameter_not_reaching_support_loss(strategy: str) -> None:
    model = Unused(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(3, 3)).double()
    learner = MAML(model, F.mse_loss, 0.1, 1, strategy=strategy)
    with pytest.raises(
        ValueError,
        match=r"\['3.weight', '3.bias'\] do not reach the support loss.*allow_unused=True",
    ):
        learner.meta_loss(*tasks("mlp"))
    ok = MAML(model, F.mse_loss, 0.1, 1, strategy=strategy, allow_unused=True)
    assert torch.isfinite(ok.meta_loss(*tasks("mlp")))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"strategy": "fast"}, r"MAML: strategy='fast' is not known; use one of"),
        ({"bn": "batch"}, r"MAML: bn='batch' is not a BatchNorm policy"),
        (
            {"learn_inner_lr": "per_layer"},
            r"MAML: learn_inner_lr='per_layer' is not known.*'per_param'",
        ),
        (
            {"inner_optimizer": "rmsprop"},
            r"MAML: inner_optimizer='rmsprop' is not known; use 'sgd'",
        ),
        ({"order": 3}, r"MAML: order=3 must be 1"),
        ({"inner_lr": -1.0}, r"MAML: inner_lr=-1.0 must be a finite number >= 0"),
        ({"inner_steps": -1}, r"MAML: inner_steps=-1 must be an int >= 0"),
        ({"adapt": "nope"}, r"MAML: adapt=\['nope'\] matches no trainable parameter"),
        (
            {"per_step_bn": True},
            r"MAML: per_step_bn=True but the model has no trainable normalization",
        ),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises((ValueError, TypeError), match=pattern):
        MAML(MODELS["mlp"](), F.mse_loss, **kwargs)


def test_inner_optimizer_object_without_update() -> None:
    with pytest.raises(TypeError, match=r"inner_optimizer=.* has no init/update methods"):
        MAML(MODELS["mlp"](), F.mse_loss, inner_optimizer=object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("head", "pattern"),
    [
        ("classifier", r"ANIL: adapt=\['classifier'\] matches no trainable parameter; names are"),
        (["4", "missing"], r"ANIL: adapt=\['missing'\] matches no trainable parameter"),
        (lambda n: n.startswith("zz"), r"ANIL: adapt=<function .*> selects no trainable parameter"),
        (None, r"ANIL: head=None would adapt every parameter"),
    ],
)
def test_anil_selector_matching_nothing(head: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ANIL(MODELS["mlp"](), F.mse_loss, head)  # type: ignore[arg-type]


def test_model_and_loss_must_be_right_kinds() -> None:
    with pytest.raises(TypeError, match=r"MAML: model must be a torch.nn.Module, got function"):
        MAML(lambda x: x, F.mse_loss)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"MetaSGD: loss_fn must be callable"):
        MetaSGD(MODELS["mlp"](), "mse")  # type: ignore[arg-type]
    frozen = MODELS["mlp"]().requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"Reptile: the model has no parameter with requires_grad=True"
    ):
        Reptile(frozen, F.mse_loss)


def test_predict_rejects_incomplete_params() -> None:
    learner = MAML(MODELS["mlp"](), F.mse_loss)
    x = tasks("mlp")[0][0]
    params = learner.adapt(x, torch.zeros_like(x))
    del params["4.bias"]
    with pytest.raises(ValueError, match=r"predict: params lacks \['4.bias'\]"):
        learner.predict(params, x)
    with pytest.raises(TypeError, match=r"predict: params must be the dict returned by adapt"):
        learner.predict(list(params.values()), x)  # type: ignore[arg-type]
