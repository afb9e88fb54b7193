"""Thread placement: how a placement is laid out on the usable cores (pure), and applying it to this process
(every thread pinned, torch's threads set) with both restored afterwards, also after an error."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from automedseg import thread_placement as T

CAN_PIN = T.affinity_supported() and len(T.usable_cpus()) >= 2
needs_two_cores = pytest.mark.skipif(not CAN_PIN, reason="needs os.sched_setaffinity and at least 2 usable cores")


@pytest.mark.parametrize(("placement", "threads", "cpus", "expected"), [
    ("shared", None, (0, 1), ("shared", None, None, None)),
    ("shared", 3, (0, 1), ("shared", 3, None, None)),
    ("own_core", None, (0, 1), ("own_core", 1, (0,), (1,))),  # 2 cores: one each
    ("own_core", None, (2, 5, 7, 9), ("own_core", 3, (2, 5, 7), (9,))),  # all usable cores but one
    ("own_core", 2, tuple(range(16)), ("own_core", 1, (0,), (1,))),  # --threads 2: 2 cores of 16 spent
    ("own_core", 8, (0, 1, 2, 3), ("own_core", 7, (0, 1, 2), (3,))),  # more threads than cores
    ("own_core", 1, (0, 1), ("shared", 1, None, None)),  # nothing to spare
    ("own_core", None, (0,), ("shared", None, None, None)),
])
def test_placement_layout(placement: str, threads: int | None, cpus: tuple[int, ...], expected: tuple) -> None:
    layout = T.placement_layout(placement, threads=threads, cpus=cpus, affinity=True)
    assert (layout.placement, layout.threads, layout.training_cpus, layout.worker_cpus) == expected
    assert bool(layout.note) == (placement != layout.placement)


def test_own_core_without_affinity_runs_shared() -> None:
    layout = T.placement_layout("own_core", threads=4, cpus=(0, 1, 2, 3), affinity=False)
    assert layout.placement == "shared" and layout.threads == 4 and "cannot pin" in layout.note


def test_placement_layout_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="placement 'x' is not one of"):
        T.placement_layout("x")
    with pytest.raises(ValueError, match="threads must be at least 1"):
        T.placement_layout("shared", threads=0)


@pytest.mark.parametrize(("device", "workers", "world", "placement", "note"), [
    ("cuda", 1, 1, "shared", ""),  # a GPU run ignores the placement
    ("cpu", 0, 1, "shared", "no augmentation worker process"),
    ("cpu", 3, 1, "shared", "3 worker processes"),
    ("cpu", 1, 2, "shared", "2 distributed ranks"),
])
def test_training_layout_applies_own_core_only_to_one_cpu_worker(device: str, workers: int, world: int,
                                                                   placement: str, note: str) -> None:
    layout = T.training_layout("own_core", device_type=device, threads=2, num_workers=workers, world=world)
    assert layout.placement == placement and note in layout.note and layout.threads == 2


@needs_two_cores
def test_training_layout_on_a_cpu() -> None:
    cpus = T.usable_cpus()
    layout = T.training_layout("own_core", device_type="cpu", threads=None, num_workers=1)
    assert (layout.threads, layout.training_cpus, layout.worker_cpus) == (len(cpus) - 1, cpus[:-1], cpus[-1:])
    assert "augmentation worker on core(s)" in layout.describe()
    assert T.training_layout("shared", device_type="cpu", threads=2, num_workers=1).worker_cpus is None


def _affinities() -> dict[int, set[int]]:
    return {tid: set(os.sched_getaffinity(tid)) for tid in T._thread_ids()}


@needs_two_cores
def test_placed_pins_every_thread_and_restores_affinity_and_threads() -> None:
    cpus = T.usable_cpus()
    before, threads_before = _affinities(), torch.get_num_threads()
    layout = T.placement_layout("own_core", threads=len(cpus))
    stop = threading.Event()
    helpers = [threading.Thread(target=stop.wait)]  # a thread running before the pinning (as torch's pool)
    helpers[0].start()
    try:
        with T.placed(layout):
            assert torch.get_num_threads() == len(cpus) - 1
            assert all(mask == set(cpus[:-1]) for mask in _affinities().values())
            helpers.append(threading.Thread(target=stop.wait))  # started while pinned: inherits the pinning
            helpers[1].start()
        after = _affinities()
        assert set(os.sched_getaffinity(0)) == set(cpus) and torch.get_num_threads() == threads_before
        assert all(after[tid] == mask for tid, mask in before.items() if tid in after)
        assert all(mask == set(cpus) for mask in after.values())  # the thread started while pinned too
    finally:
        stop.set()
        for helper in helpers:
            helper.join()


@needs_two_cores
def test_placed_restores_after_an_error() -> None:
    cpus, threads_before = T.usable_cpus(), torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), T.placed(T.placement_layout("own_core")):
        raise RuntimeError("boom")
    assert set(os.sched_getaffinity(0)) == set(cpus) and torch.get_num_threads() == threads_before


def test_shared_placement_only_sets_threads() -> None:
    threads_before = torch.get_num_threads()
    affinity = T.usable_cpus()
    with T.placed(T.placement_layout("shared", threads=threads_before + 1)):
        assert torch.get_num_threads() == threads_before + 1 and T.usable_cpus() == affinity
    assert torch.get_num_threads() == threads_before
    with T.torch_threads(None):
        assert torch.get_num_threads() == threads_before
