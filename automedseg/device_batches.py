"""Training batches augmented on the training device: the CPU workers only read windows.

:func:`make_device_training_loader` starts the usual background workers of
:func:`~automedseg.augmentation.make_training_loader` with ``windows_only=True``: they read the enlarged sampling
windows from the cache (I/O and a crop) and nothing else. :class:`DeviceBatches` then

1. takes the windows from the workers in a background thread and pins them (CUDA),
2. copies the next batch to the device on a side stream while the current step computes (CUDA),
3. augments each batch there, batched (:func:`~automedseg.augmentation_batched.augment_batch`), and
4. builds the deep-supervision targets from the augmented labels
   (:func:`~automedseg.augmentation_batched.deep_supervision_targets`).

It is a drop-in for :class:`~automedseg.augmentation.BatchLoader` in the training loop: ``next()`` returns
``{"data": float32 (B, C, *patch), "seg": (B, 1, *patch), "target": [...], "keys": [...]}`` as tensors on the
device, and ``wait_seconds`` / ``reset_timing`` / ``close`` behave the same (the wait is the time ``next()``
waited for windows from the workers).

:func:`use_device_augmentation` decides where augmentation runs: on the device when it is CUDA (the CPU
workers starve a GPU), with the CPU workers everywhere else (on a CPU the workers run beside the training and
the batched transforms would take the training's cores).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automedseg.augmentation import BatchLoader, make_training_loader
from automedseg.augmentation_batched import augment_batch, deep_supervision_targets, make_batch_random
from automedseg.class_sampling import SharedClassWeights
from automedseg.plans import ConfigurationPlan

__all__ = ["DeviceBatches", "make_device_training_loader", "use_device_augmentation"]

_STOP_POLL_S = 0.2


def use_device_augmentation(device: torch.device, requested: bool | None = None) -> bool:
    """Whether training on ``device`` augments batches there: ``requested`` if given, else on CUDA only."""
    return bool(requested) if requested is not None else device.type == "cuda"


class DeviceBatches:
    """Iterator of device-augmented training batches over a loader of untransformed sampling windows.

    Args:
        loader: Batches of sampling windows (``windows_only=True``).
        config: Supplies the augmentation, patch size and dims.
        device: Where batches are augmented and returned.
        deep_supervision_strides: Cumulative strides of the network outputs (highest resolution first).
        seed: Seed of the augmentation's random streams.
        prefetch: Batches the pinning thread may hold ready (CUDA).
    """

    def __init__(self, loader: BatchLoader, *, config: ConfigurationPlan, device: torch.device,
                 deep_supervision_strides: Sequence[Sequence[int]], seed: int, prefetch: int = 2) -> None:
        self._loader = loader
        self.config = config
        self.device = torch.device(device)
        self.strides = [tuple(int(v) for v in s) for s in deep_supervision_strides]
        self.rng = make_batch_random(seed, self.device)
        self.wait_seconds = 0.0
        self.batches = 0
        self._closed = False
        self._cuda = self.device.type == "cuda"
        self._ready: tuple[torch.Tensor, torch.Tensor, list[str], Any] | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._queue = queue.Queue(maxsize=max(1, int(prefetch)))
            self._thread = threading.Thread(target=self._fill, name="automedseg-pin", daemon=True)
            self._thread.start()

    # --- host side --------------------------------------------------------------------------------------------

    def _host(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        data, seg = torch.from_numpy(batch["data"]), torch.from_numpy(batch["seg"])
        if self._cuda:
            data, seg = data.pin_memory(), seg.pin_memory()
        return data, seg, list(batch["keys"])

    def _fill(self) -> None:
        """Background thread: windows from the workers, pinned, into the queue (an exception is passed on)."""
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                item: Any = self._host(next(self._loader))
            except Exception as e:  # noqa: BLE001 - handed to the training thread
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_STOP_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def _take(self, *, block: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        if self._queue is None:
            return self._host(next(self._loader))
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    # --- device side ------------------------------------------------------------------------------------------

    def _upload(self, host: tuple[torch.Tensor, torch.Tensor, list[str]]
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], Any]:
        data, seg, keys = host
        if not self._cuda:
            return data.to(self.device), seg.to(self.device), keys, None
        with torch.cuda.stream(self._copy_stream):
            d = data.to(self.device, non_blocking=True)
            s = seg.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return d, s, keys, event

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("DeviceBatches is closed")
        start = time.perf_counter()
        current = self._ready if self._ready is not None else self._upload(self._take(block=True))
        self.wait_seconds += time.perf_counter() - start
        self._ready = None
        if self._cuda:  # start the next batch's copy now, so that it overlaps this step
            nxt = self._take(block=False)
            if nxt is not None:
                self._ready = self._upload(nxt)
        data, seg, keys, event = current
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            data.record_stream(stream)
            seg.record_stream(stream)
        cfg = self.config
        x, s = augment_batch(data, seg, aug=cfg.augmentation, patch_size=cfg.patch_size, dims=cfg.dims,
                             rng=self.rng)
        self.batches += 1
        return {"data": x, "seg": s, "target": deep_supervision_targets(s, self.strides), "keys": keys}

    def reset_timing(self) -> None:
        """Zero :attr:`wait_seconds` and :attr:`batches`."""
        self.wait_seconds = 0.0
        self.batches = 0

    def close(self) -> None:
        """Stop the pinning thread and the workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loader.close()

    def __enter__(self) -> DeviceBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_device_training_loader(folder: Path | str, case_ids: Sequence[str], config: ConfigurationPlan, *,
                                device: torch.device, deep_supervision_strides: Sequence[Sequence[int]],
                                seed: int | None = None, num_processes: int | None = None,
                                worker_niceness: int = 0, worker_cpus: Sequence[int] | None = None,
                                class_weights: SharedClassWeights | None = None) -> DeviceBatches:
    """Training batches of ``config`` whose augmentation runs batched on ``device``.

    Args:
        folder: Preprocessed cache folder of ``config.data_identifier``.
        case_ids: Training cases.
        config: The configuration (patch, batch, augmentation, oversampling, workers, seed).
        device: Training device.
        deep_supervision_strides: Cumulative strides of the network outputs.
        seed: Overrides ``config.training.seed``.
        num_processes: Window-reading workers (default ``config.training.num_workers``; 0: in-process).
        worker_niceness, worker_cpus, class_weights: As :func:`~automedseg.augmentation.make_training_loader`.
    """
    seed = config.training.seed if seed is None else int(seed)
    loader = make_training_loader(folder, case_ids, config, seed=seed, num_processes=num_processes,
                                  worker_niceness=worker_niceness, worker_cpus=worker_cpus, windows_only=True,
                                  class_weights=class_weights)
    return DeviceBatches(loader, config=config, device=device, deep_supervision_strides=deep_supervision_strides,
                         seed=int(np.random.SeedSequence([seed % 2**63, 13]).generate_state(1)[0]))
