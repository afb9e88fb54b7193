"""The timings a machine's calibration takes: convolutions (3D and 2D) and the training data pipeline.

:mod:`automedseg.calibration` runs them once per machine and caches the result; the planner's cost model
(:mod:`automedseg.cost_model`) reads them from the :class:`~automedseg.plans.DeviceProfile`.

* :func:`calibrate_conv_gflops`: forward + backward throughput of a 3x3x3 (``dims=3``) or 3x3 (``dims=2``)
  convolution at a few feature widths, in the precision training uses.
* :func:`calibrate_data_throughput`: how many training voxels per second **one** CPU augmentation worker
  produces, through the real pipeline (:class:`~automedseg.augmentation_sampler.PatchSampler` on a synthetic
  cached case, :func:`~automedseg.augmentation_transforms.build_transforms`, in-process
  :func:`~automedseg.augmentation_loaders.make_training_loader`), for a reference 3D and 2D patch; and how many
  the worker produces when it only reads the sampling windows (``windows_only``: augmentation on the device).
  Voxels of the training patch per second, so that it scales with the patch. The work is fixed (a seeded
  number of samples) and measured as the thread's CPU time, which another busy process barely changes.

A real training step, with the worker beside it, is timed by :mod:`automedseg.calibration_step` (on the synthetic
case and reference configuration made here).

Example:
    >>> calibrate_data_throughput(samples=4)  # doctest: +SKIP
    DataThroughput(window_voxels_per_s=180000000.0, augment_voxels_per_s=((2, 8500000.0), (3, 6200000.0)))
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, TrainingPlan

CALIBRATION_WIDTHS = (8, 16, 32, 64)
# Reference patches of the data timing (about 90k voxels each; hippocampus' 3d_fullres patch is 40x56x40).
DATA_REFERENCE_PATCH: dict[int, tuple[int, ...]] = {3: (40, 56, 40), 2: (288, 320)}
DATA_SAMPLES = 32  # per dimensionality: ~12 of them draw a rotation or scaling (p 0.2 each), the costly part
DATA_BATCH = 2
DATA_SEED = 20240917
_SPATIAL_STRIDES = (1, 2, 4, 8, 16)  # deep-supervision levels of the reference network


def _conv_side(dims: int, device_type: str) -> tuple[int, ...]:
    if dims == 3:
        return (20, 24, 24) if device_type == "cpu" else (64, 64, 64)
    return (160, 144) if device_type == "cpu" else (512, 512)


def calibrate_conv_gflops(*, device: str, widths: Sequence[int] = CALIBRATION_WIDTHS, threads: int | None = None,
                          windows: int = 2, window_s: float = 0.15, dims: int = 3) -> tuple[tuple[int, float], ...]:
    """Time a 3x3x3 (or 3x3) convolution forward+backward at a few widths; one to three seconds in all by default.

    Each width is timed in ``windows`` windows of about ``window_s`` seconds (at most 50 steps) and the
    fastest counts: a busy moment of the machine is not the device's speed.

    Uses the precision training uses (:func:`automedseg.device.autocast_context`: bf16 on CPUs with
    native bf16, fp32 on other CPUs, fp16 AMP on CUDA) and channels-last.

    Args:
        device: ``cpu`` or ``cuda``.
        widths: Feature widths (input = output channels).
        threads: Torch threads (CPU; default: leave as is).
        windows: Timing windows per width.
        window_s: Length of a window.
        dims: 3 (Conv3d, what 3D configurations train) or 2 (Conv2d, 2D configurations).

    Returns:
        ``(width, GFLOP/s)`` pairs, two significant digits.
    """
    import torch

    from automedseg.device import autocast_context

    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    conv_cls, fmt = ((torch.nn.Conv3d, torch.channels_last_3d) if dims == 3 else
                     (torch.nn.Conv2d, torch.channels_last))
    side = _conv_side(dims, dev.type)
    out = []
    for w in widths:
        x = torch.randn(2, w, *side, device=dev).to(memory_format=fmt).requires_grad_(True)
        conv = conv_cls(w, w, 3, padding=1).to(dev).to(memory_format=fmt)

        def step(conv: torch.nn.Module = conv, x: torch.Tensor = x) -> None:
            with autocast_context(dev, True):
                y = conv(x)
            y.float().sum().backward()

        step()
        step()  # the first calls in a process pick kernels and allocate: not timed
        seconds = math.inf
        for _ in range(windows):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while n < 2 or (time.perf_counter() - t0 < window_s and n < 50):
                step()
                n += 1
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = min(seconds, (time.perf_counter() - t0) / n)
        flops = 3 * 2 * w * w * 3**dims * 2 * math.prod(side)
        out.append((int(w), float(f"{flops / seconds / 1e9:.2g}")))
    return tuple(out)


@dataclass(frozen=True)
class DataThroughput:
    """What one CPU data worker does per second of its CPU time.

    Attributes:
        window_voxels_per_s: Voxels of the sampling windows read (with the foreground oversampling), the whole
            of the worker's work when augmentation runs on the device.
        augment_voxels_per_s: ``(dims, voxels/s)``: voxels of the training patch through the CPU augmentation
            (spatial and intensity transforms, mirroring, deep-supervision targets), window reading excluded.
    """

    window_voxels_per_s: float
    augment_voxels_per_s: tuple[tuple[int, float], ...]


def synthetic_case(folder: Path, dims: int) -> None:
    """A cached case (``case.npy``, ``case_seg.npy``, ``case_locs.npz``) larger than the sampling window."""
    rng = np.random.default_rng(DATA_SEED)
    shape = (128, 144, 128) if dims == 3 else (4, 640, 640)
    image = rng.standard_normal((1, *shape), dtype=np.float32)
    grid = np.indices(shape, sparse=True)
    radius = np.sqrt(sum(((g - n / 2) / (n / 4)) ** 2 for g, n in zip(grid[1:], shape[1:])))
    seg = np.zeros((1, *shape), dtype=np.int8)
    seg[0][np.broadcast_to(radius < 1.0, shape)] = 1
    seg[0][np.broadcast_to(radius < 0.5, shape)] = 2  # three labels, like hippocampus
    np.save(folder / "case.npy", image)
    np.save(folder / "case_seg.npy", seg)
    locs = {f"class_{k}": np.argwhere(seg[0] == k)[::97].astype(np.int32) for k in (1, 2)}
    np.savez(folder / "case_locs.npz", **locs)


def reference_config(dims: int) -> ConfigurationPlan:
    """The configuration the data pipeline is timed with (:data:`DATA_REFERENCE_PATCH`, batch :data:`DATA_BATCH`)."""
    patch = DATA_REFERENCE_PATCH[dims]
    ones = (1,) * dims
    aug = AugmentationPlan(rotation_range_rad=(-math.pi, math.pi)) if dims == 2 else AugmentationPlan()
    return ConfigurationPlan(
        name=f"calibration_{dims}d", data_identifier="calibration", dims=dims, spacing_mm=(1.0, 1.0, 1.0),
        patch_size=patch, batch_size=DATA_BATCH, median_shape=(128, 144, 128), normalization=(),
        image_order=3, label_order=1, separate_z=False, out_of_plane_order=0,
        network=NetworkPlan("plain_unet", (8,), ((3,) * dims,), (ones,), (2,), ()),
        augmentation=aug, training=TrainingPlan(epochs=1, iterations_per_epoch=1, num_workers=0, seed=DATA_SEED),
    )


def _time_pipeline(folder: Path, config: ConfigurationPlan, *, samples: int, windows_only: bool,
                   clock: Callable[[], float]) -> float:
    """Seconds of ``clock`` one in-process data worker takes for ``samples`` samples of the synthetic case."""
    from automedseg.augmentation_loaders import make_training_loader

    dims = config.dims
    strides = [(s,) * dims for s in _SPATIAL_STRIDES if min(config.patch_size) // s >= 4]
    batches = max(1, math.ceil(samples / config.batch_size))
    with make_training_loader(folder, ["case"], config, num_processes=0, seed=DATA_SEED,
                              deep_supervision_strides=None if windows_only else strides,
                              windows_only=windows_only) as loader:
        next(loader)  # opens the memory maps and loads the location table: not timed
        t0 = clock()
        for _ in range(batches):
            next(loader)
        return max(clock() - t0, 1e-6)


def calibrate_data_throughput(*, samples: int = DATA_SAMPLES, dims: Sequence[int] = (2, 3),
                              clock: Callable[[], float] = time.thread_time) -> DataThroughput:
    """Time one data worker's work through the real pipeline on a synthetic case (a second or two on 2 cores).

    Each dimensionality's reference configuration is run twice with the same seed, so on the same windows:
    reading the windows only, and reading them with the full augmentation; the difference is the augmentation.

    Args:
        samples: Samples per dimensionality and run (a fixed, seeded amount of work).
        dims: The dimensionalities to time.
        clock: Seconds of the worker's time; the thread's CPU time by default (a busy machine does not
            slow it down as it slows a wall clock).

    Returns:
        The throughputs, two significant digits.
    """
    from automedseg.augmentation_sampler import sampling_patch_size

    rates: list[tuple[int, float]] = []
    window_voxels = window_s = 0.0
    with tempfile.TemporaryDirectory(prefix="automedseg-calibration-") as tmp:
        for d in sorted(dims):
            folder = Path(tmp) / f"{d}d"
            folder.mkdir()
            synthetic_case(folder, d)
            config = reference_config(d)
            windows = _time_pipeline(folder, config, samples=samples, windows_only=True, clock=clock)
            full = _time_pipeline(folder, config, samples=samples, windows_only=False, clock=clock)
            n = max(1, math.ceil(samples / config.batch_size)) * config.batch_size
            window_voxels += n * math.prod(sampling_patch_size(config.patch_size, config.augmentation, dims=d))
            window_s += windows
            augment_s = max(full - windows, 0.1 * full)  # timing noise never makes the augmentation free
            rates.append((d, float(f"{n * math.prod(config.patch_size) / augment_s:.2g}")))
    return DataThroughput(float(f"{window_voxels / window_s:.2g}"), tuple(rates))
