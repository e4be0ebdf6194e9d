"""Handing the heap memory that compilation freed back to the system (glibc's `malloc_trim`).

XLA compiles a step with LLVM inside this process; the few hundred MB it allocates on the way
are freed when the compiled step is ready, but glibc's malloc keeps freed memory in its arenas,
so the process stays that much larger for the rest of the run: an 8-channel ProtoNet step's
compile took the resident set from 446 to 939 MB, and the step itself then needs 550 MB
(`benchmarks/protonet.py` measures both). The outer loop compiles its steps ahead of time and
calls `release_free_memory` before their first call, so that the step's buffers do not come on
top of the compiler's leftovers.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys


@functools.cache
def _malloc_trim():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the heap's free memory to the system (glibc); False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
