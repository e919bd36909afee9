"""metagrad: exact higher-order meta-gradients for PyTorch.

The public surface, explicitly:

* derivative toolkit: :func:`nth_derivative`, :func:`hvp`, :func:`hessian`, :func:`jacobian`,
  :func:`grad_norm_penalty` (``metagrad.derivatives``);
* learners: :class:`MAML`, :class:`MetaSGD`, :class:`ANIL`, :class:`MAMLpp`, :class:`Reptile`,
  :class:`IMAML`
  (``metagrad.algorithms``), over the functional core ``metagrad.functional``;
* the bilevel core: ``metagrad.bilevel`` (:func:`metagrad.bilevel.hypergrad` for any inner
  optimization) and differentiable optimizers mirroring ``torch.optim``: ``metagrad.optim``;
* deprecated inner optimizers :class:`SGD`, :class:`Momentum`, :class:`Adam` (use
  ``metagrad.optim``);
* verification: :func:`check_meta_gradient` / :class:`CheckReport` (``metagrad check``);
* the linear-regression toy: :func:`linear_toy` (``metagrad explain``);
* errors: :class:`NonFiniteError`;
* process setting for long CPU runs: :func:`keep_freed_memory` (glibc keeps freed activation
  pages; ``metagrad train`` calls it).

Optional subpackages, imported on demand: ``metagrad.viz`` (graphs, traces),
``metagrad.compat.learn2learn`` (drop-in learn2learn API), ``metagrad.models``.
"""

from __future__ import annotations

from metagrad import bilevel, optim
from metagrad._errors import NonFiniteError
from metagrad._load import load
from metagrad._perf import keep_freed_memory
from metagrad.algorithms import ANIL, IMAML, MAML, MAMLpp, MetaSGD, Reptile
from metagrad.check import CheckReport, check_meta_gradient
from metagrad.derivatives import grad_norm_penalty, hessian, hvp, jacobian, nth_derivative
from metagrad.functional import SGD, Adam, Momentum
from metagrad.toy import ToyResult, linear_toy

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "SGD",
    "Adam",
    "CheckReport",
    "MAMLpp",
    "MetaSGD",
    "Momentum",
    "NonFiniteError",
    "Reptile",
    "ToyResult",
    "__version__",
    "bilevel",
    "check_meta_gradient",
    "grad_norm_penalty",
    "hessian",
    "hvp",
    "jacobian",
    "keep_freed_memory",
    "linear_toy",
    "load",
    "nth_derivative",
    "optim",
]
