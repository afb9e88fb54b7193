"""The calibration's timings run the real code paths: convolutions in 3D and 2D, the data pipeline on a synthetic
case. A scripted clock makes the data figures exact; the convolution timings are only checked for shape."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from automedseg import calibration_timing as T
from automedseg.augmentation_sampler import sampling_patch_size


def _scripted_clock(readings: list[float]) -> Callable[[], float]:
    it = iter(readings)
    return lambda: next(it)


@pytest.mark.parametrize(("samples", "windows_s", "full_s"), [(2, 1.0, 3.0), (4, 0.5, 0.5), (3, 2.0, 10.0)])
def test_data_throughput_from_the_real_pipeline(samples: int, windows_s: float, full_s: float) -> None:
    # Per dimensionality: the windows-only run, then the full run (each read at its start and end).
    clock = _scripted_clock([0.0, windows_s, 0.0, full_s] * 2)
    got = T.calibrate_data_throughput(samples=samples, clock=clock)
    n = math.ceil(samples / T.DATA_BATCH) * T.DATA_BATCH
    windows = 0
    expected_augment = []
    for dims in (2, 3):
        config = T.reference_config(dims)
        windows += n * math.prod(sampling_patch_size(config.patch_size, config.augmentation, dims=dims))
        augment_s = max(full_s - windows_s, 0.1 * full_s)
        expected_augment.append((dims, float(f"{n * math.prod(config.patch_size) / augment_s:.2g}")))
    assert got.window_voxels_per_s == float(f"{windows / (2 * windows_s):.2g}")
    assert got.augment_voxels_per_s == tuple(expected_augment)


def test_data_throughput_with_the_thread_clock_is_positive() -> None:
    got = T.calibrate_data_throughput(samples=2, dims=(3,))
    assert got.window_voxels_per_s > 0 and [d for d, _ in got.augment_voxels_per_s] == [3]
    assert all(v > 0 for _, v in got.augment_voxels_per_s)


@pytest.mark.parametrize("dims", [2, 3])
def test_the_synthetic_case_covers_the_sampling_window(tmp_path, dims: int) -> None:
    import numpy as np

    T.synthetic_case(tmp_path, dims)
    image = np.load(tmp_path / "case.npy", mmap_mode="r")
    config = T.reference_config(dims)
    window = sampling_patch_size(config.patch_size, config.augmentation, dims=dims)
    assert all(s >= w for s, w in zip(image.shape[-dims:], window))
    with np.load(tmp_path / "case_locs.npz") as locs:
        assert sorted(locs.files) == ["class_1", "class_2"] and all(len(locs[k]) for k in locs.files)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_timing_in_2d_and_3d(dims: int) -> None:
    table = T.calibrate_conv_gflops(device="cpu", widths=(4, 8), threads=1, windows=1, window_s=0.01, dims=dims)
    assert [w for w, _ in table] == [4, 8] and all(g > 0 for _, g in table)


def test_conv_timing_rejects_other_dims() -> None:
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        T.calibrate_conv_gflops(device="cpu", widths=(4,), dims=1)
