"""The allocator setting the CLI applies before long runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest

from metagrad._perf import keep_freed_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    if name is None:
        pytest.skip("no libc")
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_large_blocks_come_from_the_heap_and_stay_there_after_free() -> None:
    libc = _libc()
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    size = 8 * 1024 * 1024  # above glibc's default mmap threshold, below the one set
    before = libc.mallinfo2()
    block = libc.malloc(size)
    assert block
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    assert during.hblkhd == before.hblkhd  # not a fresh mmap
    assert during.uordblks >= before.uordblks + size  # served by the heap
    assert after.arena >= during.arena  # freed, not trimmed back to the kernel
