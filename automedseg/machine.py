"""This machine: CPU model, memory, and the summary the report shows (no torch needed to import).

Example:
    >>> isinstance(cpu_model_name(), str), host_memory_gib() > 0
    (True, True)
"""

from __future__ import annotations

import os
import platform
import sys


def host_memory_gib() -> float:
    """This machine's memory in GiB: ``MemTotal``, or a lower cgroup (container) limit.

    The total, not what is free now: a plan must not depend on what other processes hold at the moment.
    """
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit)) if total else int(limit)
    except OSError:
        pass
    return round(total / 2**30, 1) if total else 8.0


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (or what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """This machine: CPU model, cores and threads, memory, GPUs, Python and torch versions."""
    info = {
        "CPU": cpu_model_name(),
        "CPU cores (logical)": str(os.cpu_count() or "?"),
        "Platform": platform.platform(),
        "Python": sys.version.split()[0],
    }
    if hasattr(os, "sched_getaffinity"):
        info["CPU cores available to this process"] = str(len(os.sched_getaffinity(0)))
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["Memory"] = f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch threads"] = str(torch.get_num_threads())
        if torch.cuda.is_available():
            gpus = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB)")
            info["GPU"] = "; ".join(gpus)
            info["CUDA"] = str(torch.version.cuda)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            info["GPU"] = "Apple MPS"
        else:
            info["GPU"] = "none"
    except ImportError:
        info["torch"] = "not installed"
    return info
