"""Whether the machine was busy while it was timed: the CPU this process's threads were granted vs. waited for.

:mod:`automedseg.calibration` judges each timing by :func:`granted_share` over :func:`cpu_usage` samples taken
before and after it, and does not believe a timing whose threads got less than :data:`MIN_CPU_SHARE` of the CPU
they asked for.

Example:
    >>> granted_share((0.0, 0.0), (2.0, 0.0), wall_s=1.0, threads=2)
    (1.0, 0.8)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MIN_CPU_SHARE = 0.8  # threads granted less than this share of the CPU they asked for: the machine is busy
# Without per-thread wait times the share is CPU time / (wall x threads), which serial parts of the timing
# lower even on an idle machine; only a much lower share is taken as load.
MIN_CPU_SHARE_WITHOUT_SCHEDSTAT = 0.4
MIN_JUDGED_SECONDS = 0.05  # shorter windows say nothing about load


def cpu_usage() -> tuple[float, float | None]:
    """Seconds this process's threads have run, and waited runnable for a CPU (``None`` where unknown).

    Linux: the sums of ``/proc/self/task/*/schedstat``; elsewhere :func:`time.process_time` and ``None``.
    """
    run = wait = 0
    seen = False
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            fields = (task / "schedstat").read_text().split()
            run, wait, seen = run + int(fields[0]), wait + int(fields[1]), True
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    if not seen:
        return time.process_time(), None
    return run / 1e9, wait / 1e9


def children_cpu_seconds() -> float:
    """CPU seconds of this process's ended and waited-for children (the calibration's augmentation workers)."""
    t = os.times()
    return t.children_user + t.children_system


def granted_share(before: tuple[float, float | None], after: tuple[float, float | None], *, wall_s: float,
                  threads: int, own_children_s: float = 0.0) -> tuple[float | None, float]:
    """The share of the CPU its threads asked for that the process got between two :func:`cpu_usage` samples.

    Args:
        before: :func:`cpu_usage` at the start.
        after: :func:`cpu_usage` at the end.
        wall_s: Wall seconds between them.
        threads: Threads the process asked to run.
        own_children_s: CPU seconds the process's own child processes (the training step's augmentation
            worker) took meanwhile: the threads' wait for the cores these took is not another process's load.

    Returns:
        ``(share, threshold)``: the share (``None`` when the window was too short to judge) and the share
        below which the machine counts as busy for this way of measuring.

    Example:
        >>> granted_share((0.0, 0.0), (1.0, 1.0), wall_s=1.0, threads=2)
        (0.5, 0.8)
        >>> granted_share((0.0, 0.0), (1.0, 1.0), wall_s=1.0, threads=2, own_children_s=0.8)
        (0.833, 0.8)
    """
    run = max(0.0, after[0] - before[0])
    own = max(0.0, own_children_s)
    if before[1] is not None and after[1] is not None:
        wait = max(0.0, after[1] - before[1] - own)
        if run + wait < MIN_JUDGED_SECONDS:
            return None, MIN_CPU_SHARE
        return round(run / (run + wait), 3), MIN_CPU_SHARE
    if wall_s < MIN_JUDGED_SECONDS:
        return None, MIN_CPU_SHARE_WITHOUT_SCHEDSTAT
    return round(min(1.0, (run + own) / (wall_s * max(1, threads))), 3), MIN_CPU_SHARE_WITHOUT_SCHEDSTAT
