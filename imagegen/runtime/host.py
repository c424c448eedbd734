"""Settings of the host process that speed and exactness depend on, applied by the entry points:
`warm_up_vector_math` when imagegen is imported, `keep_freed_memory` when training starts (train())."""

from __future__ import annotations

import ctypes
import sys

import torch


def warm_up_vector_math() -> None:
    """On a CPU without AVX2, ATen computes tanh, exp and the like through MKL's vector math. If its first
    call in a process comes from two threads at once (a tensor large enough for at::parallel_for to
    split), that first result sometimes rounds otherwise than every later call, on one thread or two
    (the first tanh of a 16 x 3 x 32 x 32 tensor differed in 11 of 40 processes on an Intel Xeon under
    ATEN_CPU_CAPABILITY=default, a first exp in 8 of 30), which broke exact resume there. So one small
    call, on this thread alone, comes first: with it, 0 of 30 for each (tests/test_machine.py)."""
    torch.tanh(torch.zeros(8))


# glibc's malloc hands blocks above a moving threshold (at most 32 MiB) to mmap, and gives the top of its
# heap back to the OS once more than twice that is free. A training step frees and reallocates the same
# few-MB feature maps every time, so by default many come back as fresh pages that fault in one by one
# (about 10,000 page faults a step for the DCGAN at batch 128, 5-7% of its CPU step). Keeping freed
# memory in the process up to these sizes makes each step reuse the pages of the last one.
MALLOC_KEEP_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """On glibc, keep freed blocks of up to MALLOC_KEEP_BYTES in the heap instead of returning them to
    the OS. Both thresholds are set together: a fixed trim threshold alone would switch off glibc's
    adaptive mmap threshold and leave it at 128 KiB. Returns whether glibc took the setting (False
    elsewhere: musl, macOS, Windows, where nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):   # only glibc has it; musl's mallopt does nothing
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MALLOC_KEEP_BYTES))
                and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(MALLOC_KEEP_BYTES)))
