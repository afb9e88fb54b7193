"""Whether the machine was busy while it was timed: the CPU share the process's threads were granted, its own
augmentation worker not counted as load."""

from __future__ import annotations

import multiprocessing

import pytest

from automedseg import calibration_load as L


@pytest.mark.parametrize(("before", "after", "wall_s", "threads", "own_s", "expected"), [
    ((0.0, 0.0), (2.0, 0.0), 1.0, 2, 0.0, (1.0, L.MIN_CPU_SHARE)),  # ran whenever it wanted
    ((0.0, 0.0), (1.0, 1.0), 1.0, 2, 0.0, (0.5, L.MIN_CPU_SHARE)),  # waited as long as it ran: busy machine
    ((5.0, 3.0), (6.0, 3.25), 1.0, 2, 0.0, (0.8, L.MIN_CPU_SHARE)),
    ((0.0, 0.0), (0.01, 0.01), 1.0, 2, 0.0, (None, L.MIN_CPU_SHARE)),  # too short to judge
    ((0.0, None), (1.0, None), 1.0, 2, 0.0, (0.5, L.MIN_CPU_SHARE_WITHOUT_SCHEDSTAT)),  # no schedstat: CPU / wall
    ((0.0, None), (0.3, None), 1.0, 1, 0.0, (0.3, L.MIN_CPU_SHARE_WITHOUT_SCHEDSTAT)),
    ((0.0, None), (0.0, None), 0.01, 2, 0.0, (None, L.MIN_CPU_SHARE_WITHOUT_SCHEDSTAT)),
    # the threads waited while the process's own worker ran: not another process's load
    ((0.0, 0.0), (1.6, 0.4), 1.0, 2, 0.4, (1.0, L.MIN_CPU_SHARE)),
    ((0.0, 0.0), (1.0, 1.0), 1.0, 2, 0.5, (0.667, L.MIN_CPU_SHARE)),  # waited longer than the worker ran: busy
    ((0.0, None), (1.6, None), 1.0, 2, 0.4, (1.0, L.MIN_CPU_SHARE_WITHOUT_SCHEDSTAT)),
])
def test_granted_share(before, after, wall_s: float, threads: int, own_s: float, expected) -> None:
    assert L.granted_share(before, after, wall_s=wall_s, threads=threads, own_children_s=own_s) == expected


def test_cpu_usage_counts_this_process() -> None:
    run0, wait0 = L.cpu_usage()
    sum(i * i for i in range(300_000))
    run1, wait1 = L.cpu_usage()
    assert run1 > run0 and (wait0 is None) == (wait1 is None)


def _spin() -> None:
    sum(i * i for i in range(2_000_000))


def test_children_cpu_seconds_counts_a_finished_worker() -> None:
    before = L.children_cpu_seconds()
    worker = multiprocessing.get_context("fork").Process(target=_spin)
    worker.start()
    worker.join()
    assert L.children_cpu_seconds() > before
