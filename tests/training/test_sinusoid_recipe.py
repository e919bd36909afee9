"""The sinusoid recipe's settings: step-weighted meta-objective, reference-code init, preset."""

from __future__ import annotations

import pytest
import torch
from mg_cli import run_cli

from metagrad.models import sinusoid_mlp
from metagrad.training import ConfigError, Trainer, preset
from metagrad.training._build import StepWeightedMAML, make_learner, make_model
from metagrad.training._config import validate


def test_multistep_preset_is_the_papers_setting_with_a_step_weighted_objective() -> None:
    cfg = validate(preset("sinusoid-multistep"))
    paper = preset("sinusoid")
    assert (cfg.inner_steps, cfg.step_weights) == (5, [0.5, 0.0, 0.0, 0.0, 0.5])
    same = ("inner_lr", "shots", "eval_shots", "meta_lr", "meta_batch", "test_steps", "init")
    assert all(getattr(cfg, k) == getattr(paper, k) for k in same)
    assert cfg.inner_lr == 0.01 and cfg.eval_shots == 5 and cfg.shots == 10


def test_step_weights_enter_the_training_objective_only() -> None:
    cfg = preset("sinusoid").replace(inner_steps=3, step_weights=[0.5, 0.0, 0.5])
    learner = make_learner(cfg, make_model(cfg, None))
    assert isinstance(learner, StepWeightedMAML)
    assert learner.inner_spec(3, 2, training=True).step_weights == (0.5, 0.0, 0.5)
    assert learner.inner_spec(10, 2, training=False).step_weights is None
    plain = make_learner(preset("sinusoid"), make_model(preset("sinusoid"), None))
    assert type(plain).__name__ == "MAML"


def test_step_weighted_meta_loss_is_the_weighted_sum_of_query_losses() -> None:
    torch.manual_seed(0)
    cfg = preset("sinusoid").replace(inner_steps=2, step_weights=[0.25, 0.75])
    model = make_model(cfg, None).double()
    learner = make_learner(cfg, model)
    xs, ys, xq, yq = (torch.randn(3, 5, 1, dtype=torch.float64) for _ in range(4))
    got = learner.meta_loss(xs, ys, xq, yq)
    learner.eval()
    per = []
    for k in (1, 2):
        losses = []
        for i in range(3):
            p = learner.adapt(xs[i], ys[i], steps=k)
            losses.append(learner.loss_fn(learner.predict(p, xq[i]), yq[i]))
        per.append(torch.stack(losses).mean())
    assert float(got.detach()) == pytest.approx(float(0.25 * per[0] + 0.75 * per[1]), rel=1e-10)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"inner_steps": 2, "step_weights": [1.0]}, "one finite weight >= 0 per inner step"),
        ({"inner_steps": 1, "step_weights": [0.0]}, "not all zero"),
        ({"inner_steps": 1, "step_weights": [-1.0]}, "finite weight >= 0"),
        ({"algorithm": "metasgd", "step_weights": [1.0]}, "applies to maml and fomaml"),
        ({"init": "xavier"}, "init='xavier' is not known"),
        ({"task": "omniglot", "data": "x", "init": "maml"}, "sinusoid MLP only"),
    ],
)
def test_invalid_settings_are_refused(changes: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=match):
        validate(preset("sinusoid").replace(**changes))


def test_reference_code_init() -> None:
    torch.manual_seed(0)
    net = sinusoid_mlp(init="maml")
    weights = [m.weight for m in net if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in net if isinstance(m, torch.nn.Linear)]
    assert all(float(b.detach().abs().max()) == 0.0 for b in biases)
    w = torch.cat([x.detach().flatten() for x in weights])
    assert float(w.abs().max()) <= 0.02 and 0.007 < float(w.std()) < 0.0095  # truncated at 2 std
    with pytest.raises(ValueError, match="init="):
        sinusoid_mlp(init="nope")
    t = Trainer(preset("sinusoid").replace(init="maml", iterations=1, meta_batch=2), progress=False)
    assert float(t.model[0].bias.detach().abs().max()) == 0.0  # type: ignore[index]


def test_cli_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    argv = ["train", "sinusoid", "--output", str(out), "--iterations", "2", "--meta-batch", "2",
            "--eval-tasks", "2", "--test-steps", "0,2", "--no-progress", "--no-plots",
            "--inner-steps", "2", "--step-weights", "0.5,0.5", "--init", "maml"]  # fmt: skip
    assert run_cli(argv) == 0
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["config"]["step_weights"] == [0.5, 0.5] and res["config"]["init"] == "maml"
    assert res["environment"]["torch"] == torch.__version__
    assert (out / "test_losses.csv").read_text().startswith("task,loss_0,loss_2\n")
    with pytest.raises(SystemExit):
        run_cli(["train", "sinusoid", "--step-weights", "a,b"])
