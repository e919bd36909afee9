"""Drop-in replacements for other meta-learning libraries' APIs, built on metagrad's engine.

* :mod:`metagrad.compat.learn2learn`: ``import metagrad.compat.learn2learn as l2l`` in place of
  ``import learn2learn as l2l`` (``MAML``, ``MetaSGD``, ``clone_module``, ``update_module``).
"""

from __future__ import annotations

__all__: list[str] = []
