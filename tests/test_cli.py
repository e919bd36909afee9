"""The ``metagrad`` command line: ``explain`` output (text and JSON) and usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from metagrad.cli import build_parser, main

_SRC = Path(__file__).resolve().parents[1] / "src"


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(argv) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_explain_json_both_orders_seed_000(capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(capsys, ["explain", "--w0", "-0.5258", "--order", "both", "--json"])
    assert set(out) == {"first", "second"}
    first, second = out["first"], out["second"]
    for key in ("w0", "b0", "support_grad_w", "support_grad_b", "w1", "b1", "w0_updated"):
        assert key in first and key in second
    assert first["order"] == 1 and second["order"] == 2
    assert first["support_grad_w"] == pytest.approx(-1.0516, rel=1e-12)
    assert first["support_grad_b"] == pytest.approx(-1.0516, rel=1e-12)
    assert first["w1"] == pytest.approx(0.5258, rel=1e-12)
    assert first["b1"] == pytest.approx(1.0516, rel=1e-12)
    # -16 w0 and 32 w0; the seed prints 8.413 and -16.826 from an unrounded w0.
    assert first["meta_grad_w_autograd"] == pytest.approx(8.4128, rel=1e-12)
    assert first["meta_grad_w_manual"] == pytest.approx(8.413, abs=1e-3)
    assert second["meta_grad_w_autograd"] == pytest.approx(-16.8256, rel=1e-12)
    assert second["meta_grad_w_manual"] == pytest.approx(-16.826, abs=2e-3)


@pytest.mark.parametrize(
    ("argv", "grad", "updated"),
    [
        (["--w0", "-1.9347891807556152", "--order", "1"], 30.956626892089844, -32.89141607284546),
        (["--w0=-0.7597505450248718", "--order", "2"], -24.3120174407959, 23.552266895771027),
    ],
)
def test_explain_json_seed_001(
    capsys: pytest.CaptureFixture[str], argv: list[str], grad: float, updated: float
) -> None:
    out = _json(capsys, ["explain", *argv, "--json"])
    assert out["meta_grad_w_autograd"] == pytest.approx(grad, rel=1e-9)
    assert out["meta_grad_w_manual"] == pytest.approx(grad, rel=1e-9)
    assert out["w0_updated"] == pytest.approx(updated, rel=1e-9)
    assert out["dtype"] == "float64"


def test_explain_json_float32(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--w0", "-0.7597505450248718", "--order", "2", "--dtype", "float32"]
    out = _json(capsys, [*argv, "--json"])
    assert out["meta_grad_w_autograd"] == pytest.approx(-24.312015533447266, rel=1e-5)
    assert out["dtype"] == "float32"


def test_explain_json_custom_problem(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--w0", "0.3", "--b0", "-0.2", "--support", "-1.5,0.7"]
    argv += ["--query", "-0.4,2", "--inner-lr", "0.3", "--meta-lr", "0.1", "--order", "2"]
    out = _json(capsys, [*argv, "--json"])
    assert out["support"] == [-1.5, 0.7] and out["query"] == [-0.4, 2.0]
    assert out["inner_lr"] == 0.3 and out["meta_lr"] == 0.1
    assert out["meta_grad_w_autograd"] == pytest.approx(out["meta_grad_w_manual"], rel=1e-12)
    assert out["w0_updated"] == pytest.approx(0.3 - 0.1 * out["meta_grad_w_autograd"])


def test_explain_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--w0", "-0.5258"]) == 0
    text = capsys.readouterr().out
    for snippet in (
        "w0 = -0.5258",
        "dL_s/dw0 = 2*r_s*x_s              = -1.0516",
        "w1 = w0 - alpha*dL_s/dw0          = 0.5258",
        "b1 = b0 - alpha*dL_s/db0          = 1.0516",
        "First-order meta-gradient",
        "g_w  autograd = 8.4128    manual = 8.4128",
        "Second-order meta-gradient",
        "g_w  autograd = -16.8256    manual = -16.8256",
        "w0' = w0 - beta*g_w = -0.5258 - 1*(-16.8256) = 16.2998",
    ):
        assert snippet in text


def test_explain_text_single_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--order", "1"]) == 0
    text = capsys.readouterr().out
    assert "First-order meta-gradient" in text
    assert "Second-order meta-gradient" not in text


def test_negative_values_parse_in_every_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--w0", "-1e-1", "--b0=-0.5", "--support", "-1,0", "--query", "-.5,-2"]
    out = _json(capsys, [*argv, "--order", "1", "--json"])
    assert (out["w0"], out["b0"]) == (-0.1, -0.5)
    assert out["support"] == [-1.0, 0.0] and out["query"] == [-0.5, -2.0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--support", "1"], ["argument --support", "X,Y", "'1'"]),
        (["--query", "1,a"], ["argument --query", "X,Y", "'1,a'"]),
        (["--w0", "abc"], ["argument --w0", "expected a number", "'abc'"]),
        (["--w0", "nan"], ["argument --w0", "finite"]),
        (["--inner-lr", "-0.1"], ["argument --inner-lr", ">= 0"]),
        (["--order", "3"], ["argument --order", "invalid choice"]),
        (["--dtype", "float16"], ["argument --dtype", "invalid choice"]),
    ],
)
def test_bad_flags_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str]
) -> None:
    err = _usage_error(capsys, ["explain", *argv])
    for snippet in expected:
        assert snippet in err


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "COMMAND" in _usage_error(capsys, [])


def test_subcommands_are_registered() -> None:
    help_text = build_parser().format_help()
    assert "explain" in help_text


def test_python_dash_m_explain_json() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(_SRC)}
    argv = ["explain", "--w0", "-0.5258", "--order", "both", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "metagrad", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["first"]["meta_grad_w_autograd"] == pytest.approx(8.4128, rel=1e-12)
    assert out["second"]["meta_grad_w_autograd"] == pytest.approx(-16.8256, rel=1e-12)
    assert out["second"]["w0_updated"] == pytest.approx(16.2998, rel=1e-12)


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import metagrad.cli as cli

    def boom(args):  # type: ignore[no-untyped-def]
        raise KeyError("something deep broke")

    monkeypatch.setattr(cli, "_run_explain", lambda args, parser: boom(args))
    assert cli.main(["explain"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "explain"])
    assert "METAGRAD_DEBUG" not in __import__("os").environ  # nothing leaks into later calls


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["check", "--inner-steps", "-1"], "argument --inner-steps: expected an integer >= 0"),
        (["check", "--seed", "x"], "argument --seed: expected an integer"),
        (["graph", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
    ],
)
def test_integer_flags_use_the_shared_parsers(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert expected in _usage_error(capsys, argv)


def test_check_offers_every_strategy_and_shows_the_factory_form(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from metagrad.algorithms._task import STRATEGIES
    from metagrad.cli import build_parser

    assert build_parser().parse_args(["check", "--strategy", "checkpoint"]).strategy == "checkpoint"
    assert "checkpoint" in STRATEGIES
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    assert "pkg.mod:build(hidden=32)" in " ".join(capsys.readouterr().out.split())


def test_quiet_and_verbose_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert "not allowed with" in _usage_error(capsys, ["--quiet", "--verbose", "explain"])


def test_end_of_run_table_names_the_algorithms_own_paper() -> None:
    """The table's paper column is MAML's; a non-MAML run also prints its own paper's number."""
    from metagrad.training._cli import _own_paper
    from metagrad.training._config import preset

    omni = preset("omniglot")
    assert _own_paper(omni.replace(algorithm="imaml"), 1) == (
        "99.16% +- 0.35% (Rajeswaran et al. 2019, iMAML-GD)"
    )
    assert (
        _own_paper(omni.replace(algorithm="mamlpp", n_way=20), 1) == "97.65% (Antoniou et al. 2019)"
    )
    assert _own_paper(omni, 1) is None  # MAML: the table already shows it
    assert _own_paper(omni.replace(algorithm="anil"), 1) is None  # no 5-way number listed
