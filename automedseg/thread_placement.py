"""Where a CPU training run's threads and its augmentation worker run: all cores shared, or a core for the worker.

On a CPU the trainer runs torch's threads and one augmentation worker process (:mod:`automedseg.augmentation_loaders`)
side by side. Two placements (:data:`automedseg.plans.WORKER_PLACEMENTS`, ``TrainingPlan.worker_placement``):

* ``shared``: torch runs ``threads`` threads (the plan's, or ``train --threads``; by default all cores), the worker
  runs unpinned and niced: the scheduler shares the cores between them.
* ``own_core``: the worker gets a core to itself. Of the first ``threads`` usable cores (:func:`usable_cpus`, at
  most all of them), the worker is pinned to the last and the training process, every thread of it, to the
  others, with ``threads - 1`` torch threads. So ``train --threads N`` spends N cores either way: N training
  threads sharing them with the worker, or N - 1 training threads beside the worker's core. Where no core can be
  spared (N = 1, one usable core) or affinity cannot be set (no :func:`os.sched_setaffinity`: macOS, Windows),
  ``own_core`` runs as ``shared`` and :attr:`PlacementLayout.note` says why.

The calibration times both (:mod:`automedseg.calibration_step`), the planner writes its choice into the plan
(:func:`automedseg.cost_model.worker_placement_for`), and the trainer applies it on a CPU only
(:func:`training_layout`): the training process with :func:`placed` around the epochs, which restores its threads
and affinity afterwards, the worker by pinning itself when it starts (:func:`pin_process`, through
``make_training_loader(worker_cpus=...)``).

Example:
    >>> layout = placement_layout("own_core", threads=4, cpus=(0, 1, 2, 3, 4, 5), affinity=True)
    >>> layout.threads, layout.training_cpus, layout.worker_cpus
    (3, (0, 1, 2), (3,))
    >>> placement_layout("own_core", threads=None, cpus=(0,), affinity=True).placement
    'shared'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from automedseg.device_profile import WORKER_PLACEMENTS


@dataclass(frozen=True)
class PlacementLayout:
    """A placement as applied on this machine.

    Attributes:
        placement: ``shared`` or ``own_core`` as applied (``own_core`` asked for where no core can be spared
            is ``shared``).
        threads: Torch threads of the training process (``None``: leave them as they are).
        training_cpus: Cores the training process is pinned to (``None``: not pinned).
        worker_cpus: Cores the augmentation worker pins itself to (``None``: not pinned).
        note: Why ``own_core`` runs as ``shared`` here (empty otherwise).
    """

    placement: str = "shared"
    threads: int | None = None
    training_cpus: tuple[int, ...] | None = None
    worker_cpus: tuple[int, ...] | None = None
    note: str = ""

    def describe(self) -> str:
        """One line for the trainer's log.

        Example:
            >>> PlacementLayout("own_core", 1, (0,), (1,)).describe()
            'thread placement own_core: 1 training thread(s) on core(s) 0, the augmentation worker on core(s) 1'
        """
        if self.placement == "own_core":
            return (f"thread placement own_core: {self.threads} training thread(s) on core(s) "
                    f"{_cpu_list(self.training_cpus or ())}, the augmentation worker on core(s) "
                    f"{_cpu_list(self.worker_cpus or ())}")
        threads = "as set" if self.threads is None else str(self.threads)
        text = f"thread placement shared: {threads} training thread(s), the augmentation worker niced among them"
        return f"{text} ({self.note})" if self.note else text


def _cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus)


def affinity_supported() -> bool:
    """Whether this platform can pin a process to cores (:func:`os.sched_setaffinity`: Linux)."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on, sorted (its affinity; elsewhere ``0 .. cpu_count - 1``)."""
    if affinity_supported():
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def placement_layout(placement: str, *, threads: int | None = None, cpus: Sequence[int] | None = None,
                     affinity: bool | None = None) -> PlacementLayout:
    """How ``placement`` is applied with ``threads`` torch threads on the cores ``cpus`` (see the module docstring).

    Args:
        placement: ``shared`` or ``own_core``.
        threads: Torch threads the run is given (``train --threads``, the plan's; ``None``: shared leaves them as
            they are, own_core takes all usable cores).
        cpus: Usable cores (default :func:`usable_cpus`).
        affinity: Whether affinity can be set (default :func:`affinity_supported`).

    Raises:
        ValueError: An unknown placement or fewer than 1 thread.

    Example:
        >>> placement_layout("own_core", threads=8, cpus=(0, 1, 2, 3), affinity=True).training_cpus
        (0, 1, 2)
        >>> placement_layout("own_core", threads=1, cpus=(0, 1), affinity=True).note
        'own_core needs 2 threads, 1 given'
    """
    if placement not in WORKER_PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {WORKER_PLACEMENTS}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if placement == "shared":
        return PlacementLayout("shared", threads)
    cpus = tuple(usable_cpus() if cpus is None else cpus)
    n = len(cpus) if threads is None else threads
    affinity = affinity_supported() if affinity is None else affinity
    note = ("this platform cannot pin a process to cores" if not affinity
            else f"own_core needs 2 usable cores, {len(cpus)} here" if len(cpus) < 2
            else f"own_core needs 2 threads, {n} given" if n < 2 else "")
    if note:
        return PlacementLayout("shared", threads, note=note)
    spent = min(n, len(cpus))
    return PlacementLayout("own_core", n - 1, cpus[:spent - 1], (cpus[spent - 1],))


def training_layout(placement: str, *, device_type: str, threads: int | None, num_workers: int,
                    world: int = 1) -> PlacementLayout:
    """The layout the trainer applies: the plan's placement on a CPU with one worker process, else ``shared``.

    A GPU run ignores the placement (its workers run beside the device), as does a run without worker processes
    or with several (``num_workers``) and a distributed run (its ranks would pin themselves to the same cores).

    Example:
        >>> training_layout("own_core", device_type="cuda", threads=None, num_workers=4).placement
        'shared'
    """
    if device_type != "cpu" or placement == "shared":
        return PlacementLayout("shared", threads)
    why = ("no augmentation worker process" if num_workers < 1 else f"{num_workers} worker processes"
           if num_workers > 1 else f"{world} distributed ranks" if world > 1 else "")
    if why:
        return PlacementLayout("shared", threads, note=f"own_core is for one worker process: {why}")
    return placement_layout(placement, threads=threads)


def _thread_ids() -> list[int]:
    """The ids of this process's threads (``/proc/self/task``; elsewhere the process itself, 0)."""
    try:
        return sorted(int(p.name) for p in Path("/proc/self/task").iterdir())
    except OSError:
        return [0]


def pin_process(cpus: Sequence[int]) -> dict[int, set[int]]:
    """Pin every thread of this process to ``cpus``; returns each thread's affinity before.

    :func:`os.sched_setaffinity` with pid 0 pins the calling thread only (and the threads it starts later), so
    torch's running thread pool is pinned thread by thread. A thread that ends meanwhile, or that cannot be pinned
    (the cores left this process's cpuset since), is skipped: it runs as it did.
    """
    before: dict[int, set[int]] = {}
    for tid in _thread_ids():
        try:
            mask = set(os.sched_getaffinity(tid))
            os.sched_setaffinity(tid, set(cpus))
            before[tid] = mask
        except OSError:
            continue
    return before


def _restore_affinity(before: dict[int, set[int]], default: set[int]) -> None:
    """Give each thread its affinity from ``before``; threads started since get ``default``."""
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, before.get(tid, default))
        except OSError:
            continue


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (``None``: as they are); the count before is restored."""
    import torch

    saved = torch.get_num_threads()
    if threads is not None and threads != saved:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


@contextlib.contextmanager
def placed(layout: PlacementLayout) -> Iterator[PlacementLayout]:
    """Apply ``layout`` to this (the training) process for the block: torch threads and, for ``own_core``, every
    thread pinned to :attr:`~PlacementLayout.training_cpus`. Threads and affinity are restored afterwards, also on
    an error, so the calling process is left as it was (the worker pins itself: :func:`pin_process`)."""
    with torch_threads(layout.threads):
        if not layout.training_cpus:
            yield layout
            return
        default = set(os.sched_getaffinity(0))
        before = pin_process(layout.training_cpus)
        try:
            yield layout
        finally:
            _restore_affinity(before, default)
