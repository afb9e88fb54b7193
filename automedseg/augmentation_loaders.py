"""Loaders of the training data pipeline (:mod:`automedseg.augmentation`): sampler + transforms in background
worker processes (or in-process), wrapped in a :class:`BatchLoader`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform

from automedseg.augmentation_sampler import TAG_GLOBAL, TAG_VALIDATION, PatchSampler, derive_seed, sampling_patch_size
from automedseg.augmentation_transforms import build_transforms, build_validation_transforms
from automedseg.class_sampling import SharedClassWeights
from automedseg.plans import ConfigurationPlan

Stride = Sequence[int]


class _InProcessAugmenter:
    """Sampler + transform in the calling process, with a private copy of the global random states."""

    def __init__(self, sampler: PatchSampler, transform: AbstractTransform | None, seed: int) -> None:
        self.sampler = sampler
        self.transform = transform
        self._np_state = np.random.RandomState(derive_seed(seed, TAG_GLOBAL, 0)).get_state()
        self._py_state = random.Random(derive_seed(seed, TAG_GLOBAL, 0)).getstate()

    def __iter__(self) -> _InProcessAugmenter:
        return self

    def __next__(self) -> dict[str, Any]:
        saved_np, saved_py = np.random.get_state(), random.getstate()
        np.random.set_state(self._np_state)
        random.setstate(self._py_state)
        try:
            batch = next(self.sampler)
            if self.transform is not None:
                batch = self.transform(**batch)
        finally:
            self._np_state, self._py_state = np.random.get_state(), random.getstate()
            np.random.set_state(saved_np)
            random.setstate(saved_py)
        return batch


class BatchLoader:
    """Infinite iterator of batches that measures the time ``next()`` waits; closes background workers.

    Attributes:
        wait_seconds: Total time spent inside ``next()`` since the last :meth:`reset_timing`.
        batches: Batches returned since the last :meth:`reset_timing`.
        num_processes: Background worker processes (0: batches are made in the calling process, so the
            wait is the full production time).
    """

    def __init__(self, augmenter: Iterator[dict[str, Any]], *, num_processes: int) -> None:
        self._augmenter = augmenter
        self.num_processes = int(num_processes)
        self.wait_seconds = 0.0
        self.batches = 0
        self._closed = False

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("BatchLoader is closed")
        start = time.perf_counter()
        batch = next(self._augmenter)
        self.wait_seconds += time.perf_counter() - start
        self.batches += 1
        return batch

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the background workers (empty in-process or once closed)."""
        processes = getattr(self._augmenter, "_processes", None) or ()
        return tuple(p.pid for p in processes if p.pid is not None and not self._closed)

    def reset_timing(self) -> None:
        """Zero :attr:`wait_seconds` and :attr:`batches` (e.g. at the start of an epoch)."""
        self.wait_seconds = 0.0
        self.batches = 0

    def close(self) -> None:
        """Stop the background workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        finish = getattr(self._augmenter, "_finish", None)
        if finish is not None:
            finish()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _start_loader(
    sampler: PatchSampler,
    transform: AbstractTransform,
    *,
    num_processes: int,
    seed: int,
    nondeterministic: bool,
    num_cached_per_worker: int,
) -> BatchLoader:
    if num_processes < 0:
        raise ValueError("num_processes must be >= 0")
    if num_processes == 0:
        return BatchLoader(_InProcessAugmenter(sampler, transform, seed), num_processes=0)
    seeds = [derive_seed(seed, TAG_GLOBAL, i) for i in range(num_processes)]
    cls = NonDetMultiThreadedAugmenter if nondeterministic else MultiThreadedAugmenter
    augmenter = cls(
        sampler,
        transform,
        num_processes,
        num_cached_per_queue=num_cached_per_worker,
        seeds=seeds,
        pin_memory=False,
    )
    augmenter._start()
    return BatchLoader(augmenter, num_processes=num_processes)


def make_training_loader(
    folder: Path | str,
    case_ids: Sequence[str],
    config: ConfigurationPlan,
    *,
    deep_supervision_strides: Sequence[Stride] | None = None,
    num_processes: int | None = None,
    seed: int | None = None,
    augment: bool = True,
    nondeterministic: bool = False,
    num_cached_per_worker: int = 2,
    worker_niceness: int = 0,
    worker_cpus: Sequence[int] | None = None,
    windows_only: bool = False,
    class_weights: SharedClassWeights | None = None,
) -> BatchLoader:
    """Augmented training batches of ``config`` from the cache, made in background workers.

    Args:
        folder: Preprocessed cache folder of ``config.data_identifier``.
        case_ids: Training cases.
        config: Supplies dims, patch_size, batch_size, augmentation and training.oversample_foreground,
            num_workers and seed.
        deep_supervision_strides: Cumulative strides of the network outputs (highest resolution first);
            adds ``"target"`` to each batch.
        num_processes: Worker processes (default ``config.training.num_workers``; 0: in-process).
        seed: Overrides ``config.training.seed``.
        augment: False samples like validation (training-patch windows, no augmentation).
        nondeterministic: Use batchgenerators' NonDetMultiThreadedAugmenter (batches in the order they
            are ready instead of round-robin over workers).
        num_cached_per_worker: Batches each worker may queue ahead.
        worker_niceness: Raise the workers' nice value by this much, so that on a CPU with few cores the
            training threads (which synchronise with each other) are not the ones descheduled.
        worker_cpus: Cores each worker process pins itself to when it starts (placement ``own_core``,
            :mod:`automedseg.thread_placement`); ``None``: not pinned.
        windows_only: Return the sampling windows untransformed (contiguous float32 / int8, no targets): the
            augmentation then runs batched on the training device (:mod:`automedseg.device_batches`).
        class_weights: Weights of the forced-foreground class draw, shared with the workers
            (:mod:`automedseg.class_sampling`); ``None``: uniform.

    Returns:
        A :class:`BatchLoader`; use it as a context manager or call :meth:`BatchLoader.close`.
    """
    seed = config.training.seed if seed is None else int(seed)
    num_processes = config.training.num_workers if num_processes is None else int(num_processes)
    aug = config.augmentation if augment else None
    sampler = PatchSampler(
        folder,
        case_ids,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        oversample_foreground=config.training.oversample_foreground,
        sample_patch_size=sampling_patch_size(config.patch_size, aug, dims=config.dims),
        seed=seed,
        class_weights=class_weights,
    )
    sampler.worker_niceness = int(worker_niceness)
    sampler.worker_cpus = tuple(int(c) for c in worker_cpus) if worker_cpus else None
    if windows_only:
        transform = build_validation_transforms()
    elif aug is None:
        transform = build_validation_transforms(deep_supervision_strides=deep_supervision_strides)
    else:
        transform = build_transforms(
            aug,
            patch_size=config.patch_size,
            dims=config.dims,
            deep_supervision_strides=deep_supervision_strides,
        )
    return _start_loader(
        sampler,
        transform,
        num_processes=num_processes,
        seed=seed,
        nondeterministic=nondeterministic,
        num_cached_per_worker=num_cached_per_worker,
    )


def make_validation_loader(
    folder: Path | str,
    case_ids: Sequence[str],
    config: ConfigurationPlan,
    *,
    deep_supervision_strides: Sequence[Stride] | None = None,
    num_processes: int = 0,
    seed: int | None = None,
) -> BatchLoader:
    """Unaugmented batches of ``config``'s patch size with the training oversampling (for pseudo-Dice).

    Sampling is as in training but without the enlarged window; the seed stream differs from the
    training loader's. Defaults to in-process (``num_processes=0``): without augmentation a batch is a
    few memory-mapped reads.
    """
    seed = config.training.seed if seed is None else int(seed)
    seed = derive_seed(seed, TAG_VALIDATION)
    sampler = PatchSampler(
        folder,
        case_ids,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        oversample_foreground=config.training.oversample_foreground,
        seed=seed,
    )
    transform = build_validation_transforms(deep_supervision_strides=deep_supervision_strides)
    return _start_loader(
        sampler,
        transform,
        num_processes=num_processes,
        seed=seed,
        nondeterministic=False,
        num_cached_per_worker=2,
    )
