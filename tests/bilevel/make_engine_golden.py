"""Record meta-gradients of the pre-bilevel engine (metagrad 0.1.0, commit d34e80b) as goldens.

Run once before the engine was rebuilt on ``metagrad.bilevel``:
``python tests/bilevel/make_engine_golden.py``. The file it writes stores each case's model
state, task tensors and meta-gradient, so ``test_engine_golden.py`` can check that the rebuilt
engine reproduces the old one to 1e-12 on MLP, conv+BN, LayerNorm, GroupNorm and GRU models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "algorithms"))

from meta_helpers import LOSSES, MODELS, tasks  # noqa: E402

import metagrad as mg  # noqa: E402

CASES = {
    # id: (model, learner kwargs)
    "mlp-maml2": ("mlp", dict(inner_lr=0.1, inner_steps=2, strategy="loop")),
    "mlp-maml2-vmap": ("mlp", dict(inner_lr=0.1, inner_steps=2, strategy="vmap")),
    "mlp-maml2-hvp": ("mlp", dict(inner_lr=0.1, inner_steps=3, strategy="hvp_chain")),
    "mlp-maml2-ckpt": ("mlp", dict(inner_lr=0.1, inner_steps=4, strategy="checkpoint")),
    "mlp-fomaml": ("mlp", dict(inner_lr=0.1, inner_steps=2, order=1, strategy="loop")),
    "mlp-metasgd": ("mlp", dict(inner_lr=0.1, inner_steps=2, learn_inner_lr="per_param")),
    "mlp-lslr-msl": (
        "mlp",
        dict(inner_lr=0.1, inner_steps=3, learn_inner_lr="per_step", multi_step_loss=True),
    ),
    "mlp-adam": ("mlp", dict(inner_lr=0.05, inner_steps=2, inner_optimizer="adam")),
    "mlp-momentum": ("mlp", dict(inner_lr=0.05, inner_steps=2, inner_optimizer="momentum")),
    "mlp-anil": ("mlp", dict(inner_lr=0.1, inner_steps=2, adapt="4")),
    "conv_bn-maml2": ("conv_bn", dict(inner_lr=0.1, inner_steps=2)),
    "conv_bn-maml2-hvp": ("conv_bn", dict(inner_lr=0.1, inner_steps=2, strategy="hvp_chain")),
    "conv_bn-perstep": ("conv_bn", dict(inner_lr=0.1, inner_steps=2, per_step_bn=True)),
    "conv_gn-maml2": ("conv_gn", dict(inner_lr=0.1, inner_steps=2)),
    "mlp_ln-maml2": ("mlp_ln", dict(inner_lr=0.1, inner_steps=2)),
    "gru-maml2": ("gru", dict(inner_lr=0.1, inner_steps=2)),
}


def main() -> None:
    out = {}
    for i, (cid, (kind, kw)) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        model = MODELS[kind]()
        batch = tasks(kind)
        learner = mg.MAML(model, LOSSES[kind], **kw)  # type: ignore[arg-type]
        grads = learner.meta_grad(*batch)
        loss = learner.meta_loss(*batch).detach()
        out[cid] = {
            "kind": kind,
            "kwargs": kw,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "tasks": batch,
            "grads": {k: None if g is None else g.detach().clone() for k, g in grads.items()},
            "loss": loss,
        }
    torch.save(out, HERE / "data" / "engine_v1_grads.pt")
    print(f"wrote {len(out)} cases")


if __name__ == "__main__":
    main()
