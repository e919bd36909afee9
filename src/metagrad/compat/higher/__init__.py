"""higher 0.2's API on metagrad: change only the import.

.. code-block:: python

    import metagrad.compat.higher as higher  # was: import higher

    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in inner_batches:
            diffopt.step(F.cross_entropy(fmodel(x), y))
        F.cross_entropy(fmodel(xv), yv).backward()  # meta-gradient in model's .grad

Provided: ``innerloop_ctx``, ``monkeypatch``, ``get_diff_optim``, ``create_diff_optim``,
``register_optim`` at top level; ``patch`` (``monkeypatch``, ``make_functional``,
``buffer_sync``, the functional module with ``fast_params``, ``parameters(time=...)``,
``update_params``, ``init_fast_params``, ``track_higher_grads``, calls with ``params=``);
``optim`` (``DifferentiableOptimizer`` and ``DifferentiableSGD``, ``Adam``, ``AdamW``,
``Adadelta``, ``Adagrad``, ``Adamax``, ``ASGD``, ``RMSprop``, ``Rprop``, with per-group
hyperparameters, ``override`` and ``grad_callback``; ``get_trainable_opt_params``,
``apply_trainable_opt_params``); ``utils`` (``get_func_params``, ``flatten`` and the helpers).

Differences from higher, deliberate:

* **The module is never patched.** ``fmodel`` is a view that runs a private copy with
  ``torch.func.functional_call``: no class is created per call, nothing is written to the
  user's module (parameters, buffers, train/eval flags) and nothing leaks. ``fmodel`` is not
  an instance of the user's class (submodules, methods and attributes are still reachable
  through it and use the fast weights).
* **The update rules are today's torch.optim** (iterates equal to 1e-12 in float64):
  ``AdamW`` is supported (higher 0.2.1 raises), Adam's ``eps`` is added after the bias
  correction as in torch (higher adds it before), ``maximize`` and Adam's
  ``decoupled_weight_decay`` are honoured, ASGD averages the new iterate, steps are counted per
  parameter (a parameter without gradient does not advance), and Rprop and RMSprop give exact
  derivatives without warnings.
* **Frozen parameters stay frozen** with ``track_higher_grads=False`` (higher makes every
  parameter require grad after the first step).
* **Clear errors**: a non-scalar loss, a loss that does not depend on the fast weights, an
  unknown override key or an unsupported optimizer type name the function and the fix.
"""

from __future__ import annotations

from metagrad.compat.higher import optim, patch, utils
from metagrad.compat.higher._ctx import innerloop_ctx
from metagrad.compat.higher._optim import create_diff_optim, get_diff_optim, register_optim
from metagrad.compat.higher._patch import monkeypatch

__all__ = [
    "create_diff_optim",
    "get_diff_optim",
    "innerloop_ctx",
    "monkeypatch",
    "optim",
    "patch",
    "register_optim",
    "utils",
]
