"""The MAML family on the bilevel core reproduces the pre-bilevel engine (goldens, float64).

``data/engine_v1_grads.pt`` was written by ``make_engine_golden.py`` with the engine as it was
before it was rebuilt on :mod:`metagrad.bilevel` (commit d34e80b): model state, task tensors and
meta-gradient of 16 cases (MLP, conv+BN, GroupNorm, LayerNorm, GRU; loop, vmap, hvp_chain,
checkpoint; first order, Meta-SGD, LSLR + multi-step loss, Adam, momentum, ANIL, per-step BN).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent

from meta_helpers import LOSSES, MODELS, rel_err  # noqa: E402

import metagrad as mg  # noqa: E402

GOLDEN = torch.load(HERE / "data" / "engine_v1_grads.pt", weights_only=True)


@pytest.mark.parametrize("case", sorted(GOLDEN), ids=str)
def test_rebuilt_engine_matches_the_old_one(case: str) -> None:
    rec = GOLDEN[case]
    model = MODELS[rec["kind"]]()
    model.load_state_dict(rec["state"])
    learner = mg.MAML(model, LOSSES[rec["kind"]], **rec["kwargs"])
    grads = learner.meta_grad(*rec["tasks"])
    assert rel_err(grads, rec["grads"]) < 1e-12
    loss = learner.meta_loss(*rec["tasks"]).detach()
    assert abs(float(loss) - float(rec["loss"])) <= 1e-12 * abs(float(rec["loss"]))
