"""Channels-last activations: resolution of ``memory_format`` and exactness of the fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from meta_helpers import MODELS
from torch import Tensor, nn

import metagrad as mg
from metagrad.functional import FunctionalModel
from metagrad.functional._rewrites import pool_before_relu, to_channels_last

F64 = torch.float64


def test_one_channel_batch_gets_unambiguous_nhwc_strides() -> None:
    x = torch.randn(5, 1, 6, 7, dtype=F64)
    # The trap: for C = 1 plain contiguous() keeps NCHW strides, and oneDNN then runs NCHW.
    assert x.contiguous(memory_format=torch.channels_last).stride() == (42, 42, 7, 1)
    y = to_channels_last(x)
    assert y.stride() == (42, 1, 7, 1)
    assert torch.equal(y, x)


def test_multi_channel_batch_is_copied_to_nhwc() -> None:
    x = torch.randn(2, 3, 4, 5)
    y = to_channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride(1) == 1
    assert torch.equal(y, x)


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(3, 4),
        torch.randint(0, 3, (2, 1, 4, 4)),
        torch.randn(2, 1, 3, 3).requires_grad_(),
    ],
    ids=["2d", "integer", "requires-grad"],
)
def test_other_tensors_pass_through(x: Tensor) -> None:
    assert to_channels_last(x) is x


class CustomConv(nn.Module):
    """A custom forward: may call .view, so "auto" must leave its layout alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize(
    ("make", "fmt", "want"),
    [
        (MODELS["conv_bn"], "auto", "cpu"),
        (MODELS["conv_bn"], "preserve", None),
        (MODELS["conv_bn"], "channels_last", "any"),
        (MODELS["mlp"], "auto", None),
        (CustomConv, "auto", None),
        (CustomConv, "channels_last", "any"),
    ],
)
def test_memory_format_resolution(make, fmt: str, want: str | None) -> None:  # type: ignore[no-untyped-def]
    assert FunctionalModel.from_module(make(), memory_format=fmt).channels_last == want


def test_bad_memory_format_names_function_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"metagrad\.MAML: memory_format='nhwc'.*channels_last"):
        mg.MAML(MODELS["conv_bn"](), F.cross_entropy, memory_format="nhwc")


def test_auto_runs_the_network_channels_last() -> None:
    fm = FunctionalModel.from_module(MODELS["conv_bn"]())
    seen: list[Tensor] = []
    fm.template[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    fm.forward(fm.params(), fm.buffers(), torch.randn(4, 1, 8, 8, dtype=F64))
    assert seen[0].stride(1) == 1  # NHWC: channels innermost


def test_custom_forward_with_view_still_works_under_auto() -> None:
    learner = mg.MAML(CustomConv().to(F64), F.cross_entropy, inner_lr=0.1)
    xs, xq = torch.randn(2, 3, 1, 6, 6, dtype=F64), torch.randn(2, 6, 1, 6, 6, dtype=F64)
    ys, yq = torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2, 6))
    learner.meta_loss(xs, ys, xq, yq).backward()
    assert all(p.grad is not None for p in learner.module.parameters())


@pytest.mark.parametrize("steps", [1, 2])
def test_channels_last_meta_gradient_equals_nchw_in_float64(steps: int) -> None:
    torch.manual_seed(0)
    model = MODELS["conv_bn"]()
    xs, xq = torch.randn(3, 6, 1, 8, 8, dtype=F64), torch.randn(3, 9, 1, 8, 8, dtype=F64)
    ys, yq = torch.randint(0, 3, (3, 6)), torch.randint(0, 3, (3, 9))
    grads = {}
    for fmt in ("preserve", "channels_last"):
        learner = mg.MAML(
            model, F.cross_entropy, inner_lr=0.3, inner_steps=steps, memory_format=fmt
        )
        grads[fmt] = learner.meta_grad(xs, ys, xq, yq)
    for name, want in grads["preserve"].items():
        got = grads["channels_last"][name]
        assert want is not None and got is not None
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_pool_before_relu_swaps_pairs_and_keeps_the_function() -> None:
    torch.manual_seed(1)
    model = MODELS["conv_bn"]().train()
    fm = FunctionalModel.from_module(model, memory_format="channels_last")
    kinds = [type(m).__name__ for m in fm.template]
    assert kinds[2:4] == ["MaxPool2d", "ReLU"]
    assert kinds[6:8] == ["MaxPool2d", "ReLU"]
    assert [type(m).__name__ for m in model][2:4] == ["ReLU", "MaxPool2d"]  # user's untouched
    x = torch.randn(6, 1, 8, 8, dtype=F64)
    torch.testing.assert_close(fm.forward(fm.params(), fm.buffers(), x), model(x))


def test_preserve_turns_every_rewrite_off() -> None:
    model = MODELS["conv_bn"]().train()
    fm = FunctionalModel.from_module(model, memory_format="preserve")
    assert fm.channels_last is None
    assert [type(m) for m in fm.template] == [type(m) for m in model]  # layer for layer


def test_pool_before_relu_leaves_hooked_modules_alone() -> None:
    model = MODELS["conv_bn"]()
    model[2].register_forward_hook(lambda m, i, o: None)
    assert pool_before_relu(model) == 1  # only the second block's pair
    assert type(model[2]) is nn.ReLU and type(model[6]) is nn.MaxPool2d


def test_auto_strategy_runs_conv_nets_as_the_nhwc_loop_on_cpu() -> None:
    from metagrad.algorithms._task import resolve_strategy

    cpu = torch.device("cpu")
    conv_gn = MODELS["conv_gn"]  # not vmap-safe (norm layer): loop everywhere
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    nhwc = FunctionalModel.from_module(plain)
    nchw = FunctionalModel.from_module(plain, memory_format="preserve")
    assert nhwc.vmap_safe() and nchw.vmap_safe()
    assert resolve_strategy("auto", nhwc, "t", 2, cpu) == "loop"  # measured 2x faster on CPU
    assert resolve_strategy("auto", nchw, "t", 2, cpu) == "vmap"
    assert resolve_strategy("auto", FunctionalModel.from_module(MODELS["mlp"]()), "t") == "vmap"
    assert resolve_strategy("auto", FunctionalModel.from_module(conv_gn()), "t") == "loop"
    with pytest.raises(ValueError, match="compile=True needs the vmap strategy"):
        mg.MAML(plain, F.cross_entropy, compile=True)
