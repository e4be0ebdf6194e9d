"""Returning freed heap memory to the system after a compile."""

from __future__ import annotations

import ctypes
import platform
import sys

import pytest

from metalearn.memory import release_free_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_free_memory_shrinks_the_resident_set_after_many_small_frees():
    """200 MB in 4 KB blocks (below malloc's mmap threshold, so they stay in the heap when
    freed), written and freed: the resident set keeps them until the release."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4096) for _ in range(50_000)]
    for b in blocks:
        ctypes.memset(b, 1, 4096)
    before = _rss_mb()
    for b in blocks[:-1]:  # the last block stays: the heap's top cannot shrink past it
        libc.free(b)
    held = _rss_mb()
    assert release_free_memory()
    after = _rss_mb()
    libc.free(blocks[-1])
    assert held > before - 50  # freeing alone kept (most of) it
    assert after < held - 150, (before, held, after)
