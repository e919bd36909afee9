"""``higher.patch``: functional views of modules (see :mod:`metagrad.compat.higher._patch`)."""

from __future__ import annotations

from metagrad.compat.higher._patch import (
    FunctionalModule,
    _MonkeyPatchBase,
    buffer_sync,
    make_functional,
    monkeypatch,
)

__all__ = ["FunctionalModule", "_MonkeyPatchBase", "buffer_sync", "make_functional", "monkeypatch"]
