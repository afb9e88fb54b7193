"""Freed memory kept in the process for reuse, instead of each large tensor going back to the operating system.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it on ``free``. A CPU training step allocates and frees its large activations every step, so each one is
new memory that the kernel zero-fills page by page as it is first written: nnU-Net's hippocampus network (batch
7, 40x56x40) took 234,000 minor page faults per step, and its 2-core bf16 step went from 2.20-2.26 s to
1.76-1.84 s median without them (Xeon with AMX, ``benchmarks/profile_step.py``; PyTorch's tuning guide gives the
same reason for jemalloc or TCMalloc). :func:`retain_freed_memory` turns glibc's mmap and trimming off
(``mallopt``), so later allocations reuse the heap; the price is a resident set that stays at the step's peak, with
some fragmentation (1.08 -> 1.46 GiB there). Forked data workers hand it back (:func:`release_freed_memory`), so
their peaks do not stay resident once per worker. Other C libraries, other systems, and
``AUTOMEDSEG_RETAIN_MEMORY=0``: nothing changes.

Example:
    >>> isinstance(retain_freed_memory(), bool)
    True
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

# glibc's mallopt parameters (malloc.h) and its defaults
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_lock = threading.Lock()
_state: dict[str, bool] = {}


def can_retain() -> bool:
    """Whether :func:`retain_freed_memory` would take effect here (glibc on Linux, not switched off); changes
    nothing."""
    if os.environ.get("AUTOMEDSEG_RETAIN_MEMORY", "1") == "0" or platform.system() != "Linux":
        return False
    return platform.libc_ver()[0] == "glibc" and _mallopt() is not None


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (once per process); whether it is in effect."""
    with _lock:
        if "done" not in _state:
            _state["done"] = can_retain() and _set(2**31 - 1, 0)
        return _state["done"]


def release_freed_memory() -> None:
    """glibc's defaults back, in a process that inherited :func:`retain_freed_memory` (a forked data worker, whose
    peak would otherwise stay resident once per worker)."""
    with _lock:
        if _state.get("done"):
            _set(_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX)
        _state["done"] = False


def _mallopt():  # noqa: ANN202 - a ctypes function
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _set(trim_threshold: int, mmap_max: int) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # trimming first: with mmap off and trimming on, a free at the heap's top would hand pages back
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_MAX, mmap_max))
