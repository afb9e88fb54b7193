"""Freed memory kept in the process for reuse, instead of each large tensor going back to the operating system.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it on ``free``. A CPU training step allocates and frees its large activations every step, so each one is
new memory that the kernel zero-fills page by page as it is first written: nnU-Net's hippocampus network (batch
7, 40x56x40) took 234,000 minor page faults per step, and its 2-core bf16 step went from 2.20-2.26 s to
1.76-1.84 s median without them (Xeon with AMX, ``benchmarks/profile_step.py``; PyTorch's tuning guide gives the
same reason for jemalloc or TCMalloc). :func:`retain_freed_memory` turns glibc's mmap and trimming off
(``mallopt``), so later allocations reuse the heap; the price is a resident set that stays at the step's peak, with
some fragmentation (1.08 -> 1.46 GiB there). Other C libraries, other systems, and ``AUTOMEDSEG_RETAIN_MEMORY=0``:
nothing changes.

Example:
    >>> isinstance(retain_freed_memory(), bool)
    True
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_lock = threading.Lock()
_state: dict[str, bool] = {}


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (once per process); whether it is in effect."""
    with _lock:
        if "done" in _state:
            return _state["done"]
        _state["done"] = _apply()
        return _state["done"]


def _apply() -> bool:
    if os.environ.get("AUTOMEDSEG_RETAIN_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # trimming off first: with mmap off and trimming on, a free at the heap's top would hand pages back
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))
