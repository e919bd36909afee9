"""Drop-in replacements for other meta-learning libraries' APIs, built on metagrad's engine.

* :mod:`metagrad.compat.learn2learn`: ``import metagrad.compat.learn2learn as l2l`` in place of
  ``import learn2learn as l2l``: the algorithms (``MAML``, ``MetaSGD``, ``GBML``), ``utils``,
  ``nn``, ``optim``, ``data`` and ``vision`` (models, local Omniglot, ``get_tasksets``).
* :mod:`metagrad.compat.higher`: ``import metagrad.compat.higher as higher`` in place of
  ``import higher``: ``innerloop_ctx``, ``monkeypatch``, the differentiable optimizers and
  ``utils``, without patching the module.
"""

from __future__ import annotations

__all__: list[str] = []
