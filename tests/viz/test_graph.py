"""The meta-graph: second-order nodes by provenance, labels, clusters, summarization, CLI."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metagrad.algorithms import MAML, MetaSGD
from metagrad.viz import conv4, meta_graph, mlp, render, summarize, to_dot, toy_graph
from metagrad.viz._cli import add_graph_parser

RED = "#d00000"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metagrad")
    add_graph_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(["graph", *argv])
    code: int = args.func(args)
    assert args.handler is args.func
    return code


def _node_count(dot: str) -> int:
    return len(re.findall(r"^\s+\w+ \[label=", dot, flags=re.M)) - ("legend [" in dot)


def test_toy_second_order_has_gradient_of_gradient_nodes() -> None:
    g1, g2 = toy_graph(order=1), toy_graph(order=2)
    assert g1.second_order_ops() == []
    # Ordinary op names: PyTorch records the double backward with the same ops as a forward.
    assert set(g2.second_order_ops()) >= {"TBackward0", "MmBackward0", "MulBackward0"}
    dot1, dot2 = to_dot(g1), to_dot(g2)
    assert RED not in dot1.split("legend [")[0]
    assert 'fillcolor="#ffd5d5"' in dot2 and f'color="{RED}", penwidth' in dot2
    # The difference of the two graphs' op multisets is the red part.
    ops1 = sorted(op for n in g1.nodes.values() for op in n.ops if n.kind != "detached")
    ops2 = sorted(op for n in g2.nodes.values() for op in n.ops)
    rest = list(ops2)
    for op in ops1:
        rest.remove(op)
    assert sorted(rest) == g2.second_order_ops()


def test_toy_labels() -> None:
    for order in (1, 2):
        dot = to_dot(toy_graph(order=order))
        for text in ('"w\\n', '"b\\n', "w1: fast weight", "b1: fast weight", "L_s support loss"):
            assert text in dot, (order, text)
        assert "L_q query loss = meta-loss" in dot
    assert "constant: detached" in to_dot(toy_graph(order=1))


def test_side_by_side_has_two_clusters() -> None:
    dot = to_dot([toy_graph(order=1), toy_graph(order=2)])
    assert dot.count("subgraph cluster_") == 2
    assert "create_graph=False" in dot and "create_graph=True" in dot
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")


def test_learned_rates_are_labelled_and_first_order_keeps_their_path() -> None:
    learner = MetaSGD(torch.nn.Linear(2, 1), F.mse_loss, 0.1, 2, 1)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    g = meta_graph(learner, x, y, x, y, order=1)
    assert any(n.kind == "extra" and n.label.startswith("lr.weight") for n in g.nodes.values())
    assert g.second_order_ops() == []
    assert any(n.kind == "fast" and "step 2" in n.label for n in g.nodes.values())


def test_conv4_summary_fits_budget() -> None:
    learner = MAML(conv4(hidden=8, image_size=16), F.cross_entropy, 0.1, 1, 2)
    x = torch.randn(5, 1, 16, 16)
    y = torch.arange(5)
    g = meta_graph(learner, x, y, x, y)
    small = summarize(g, 40)
    assert g.count() > 40 >= small.count() and small.summary >= 1
    assert small.second_order_ops() == g.second_order_ops()
    assert _node_count(to_dot(g, max_nodes=40)) <= 40


def test_mlp_and_errors() -> None:
    learner = MAML(mlp(8), F.mse_loss, 0.1, 1, 2)
    with pytest.raises(ValueError, match="order"):
        meta_graph(
            learner,
            torch.randn(3, 1),
            torch.randn(3, 1),
            torch.randn(3, 1),
            torch.randn(3, 1),
            order=3,
        )
    with pytest.raises(TypeError, match="metagrad learner"):
        meta_graph(
            mlp(), torch.randn(3, 1), torch.randn(3, 1), torch.randn(3, 1), torch.randn(3, 1)
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_nodes"):
        summarize(toy_graph(), 0)


def test_cli_dot_to_stdout_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["--toy", "--order", "both", "--w0=-0.3", "--support", "1,0.5"]) == 0
    assert capsys.readouterr().out.count("subgraph cluster_") == 2
    out = tmp_path / "g.dot"
    assert _run(["--model", "mlp", "--order", "2", "--output", str(out)]) == 0
    assert "ThresholdBackwardBackward0" in out.read_text() or RED in out.read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "nope"],
        ["--model", "no_such_module_xyz:f"],
        ["--format", "png"],
    ],
)
def test_cli_bad_input_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("metagrad graph: error:") and "Traceback" not in err


def test_cli_bad_support_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["graph", "--toy", "--support", "1"])
    assert exc.value.code == 2
    assert "X,Y" in capsys.readouterr().err


def test_cli_png_without_dot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    assert _run(["--toy", "--output", str(tmp_path / "g.png")]) == 2
    assert "apt-get install graphviz" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` not installed")
def test_render_png(tmp_path: Path) -> None:
    out = render(to_dot(toy_graph(order=2)), tmp_path / "toy.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _run(["--toy", "--format", "svg", "--output", str(tmp_path / "t.svg")]) == 0
    assert "<svg" in (tmp_path / "t.svg").read_text()
