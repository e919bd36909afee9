"""The allocator setting the CLI applies before long runs."""

from __future__ import annotations

import sys

import pytest
import torch

from metagrad._perf import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_applies_on_glibc_and_is_idempotent() -> None:
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True
    # Allocation still works after it: large blocks now come from the heap.
    x = torch.ones(75, 64, 28, 28)
    assert float(x.sum()) == 75 * 64 * 28 * 28


def test_keep_freed_memory_is_public() -> None:
    import metagrad as mg

    assert mg.keep_freed_memory is keep_freed_memory
    assert "keep_freed_memory" in mg.__all__
