"""Tests of automedseg.augmentation: patch sampling, transforms, loaders."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from automedseg.augmentation import (
    BatchLoader,
    PatchSampler,
    RotateScaleCropTransform,
    build_transforms,
    build_validation_transforms,
    downsample_seg_for_deep_supervision,
    make_training_loader,
    make_validation_loader,
    sampling_patch_size,
)
from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, TrainingPlan

torch.set_num_threads(1)

SHAPE = (20, 24, 24)
N_CHANNELS = 2
CUBE_1 = (slice(3, 8), slice(3, 8), slice(3, 8))
CUBE_2 = (slice(12, 16), slice(15, 21), slice(14, 20))
FG_CASES = ["case_a", "case_b"]
ALL_CASES = [*FG_CASES, "case_empty"]


def _write_case(folder: Path, case: str, *, foreground: bool, rng: np.random.Generator) -> None:
    data = rng.uniform(1.0, 2.0, size=(N_CHANNELS, *SHAPE)).astype(np.float32)  # nonzero everywhere
    seg = np.zeros((1, *SHAPE), dtype=np.int8)
    if foreground:
        seg[(0, *CUBE_1)] = 1
        seg[(0, *CUBE_2)] = 2
    np.save(folder / f"{case}.npy", data)
    np.save(folder / f"{case}_seg.npy", seg)
    locs = {f"class_{k}": np.argwhere(seg[0] == k).astype(np.int64).reshape(-1, 3) for k in (1, 2)}
    np.savez(folder / f"{case}_locs.npz", **locs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("preprocessed") / "data_id"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for case in ALL_CASES:
        _write_case(folder, case, foreground=case in FG_CASES, rng=rng)
    return folder


def _config(
    patch_size: tuple[int, ...],
    *,
    batch_size: int = 2,
    aug: AugmentationPlan | None = None,
    oversample: float = 0.33,
    num_workers: int = 0,
    seed: int = 7,
) -> ConfigurationPlan:
    dims = len(patch_size)
    return ConfigurationPlan(
        name=f"{dims}d",
        data_identifier="data_id",
        dims=dims,
        spacing_mm=(1.0, 1.0, 1.0),
        patch_size=patch_size,
        batch_size=batch_size,
        median_shape=SHAPE,
        normalization=(),
        image_order=3,
        label_order=1,
        separate_z=False,
        out_of_plane_order=0,
        network=NetworkPlan(
            architecture="plain_unet",
            features_per_stage=(4, 8),
            kernel_sizes=((3,) * dims,) * 2,
            strides=((1,) * dims, (2,) * dims),
            n_conv_per_stage_encoder=(1, 1),
            n_conv_per_stage_decoder=(1,),
        ),
        augmentation=aug or AugmentationPlan(),
        training=TrainingPlan(
            epochs=1,
            iterations_per_epoch=1,
            oversample_foreground=oversample,
            num_workers=num_workers,
            seed=seed,
        ),
    )


STRONG_AUG = AugmentationPlan(
    rotation_p=1.0, scale_p=1.0, elastic_p=0.5, lowres_p=0.5, gamma_p=0.5, noise_p=0.5
)


# --- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch_size", "strides"),
    [
        ((8, 16, 16), [(1, 1, 1), (1, 2, 2), (2, 4, 4)]),
        ((16, 16), [(1, 1), (2, 2), (4, 4)]),
        ((4, 16, 16), [(1, 1, 1), (1, 2, 2)]),  # dummy 2D below
    ],
)
def test_training_batch_shapes_and_dtypes(cache: Path, patch_size: tuple[int, ...], strides: list) -> None:
    aug = AugmentationPlan(do_dummy_2d=patch_size == (4, 16, 16))
    config = _config(patch_size, batch_size=3, aug=aug)
    with make_training_loader(cache, ALL_CASES, config, deep_supervision_strides=strides) as loader:
        for _ in range(2):
            batch = next(loader)
    assert batch["data"].shape == (3, N_CHANNELS, *patch_size)
    assert batch["data"].dtype == np.float32 and batch["data"].flags.c_contiguous
    assert batch["seg"].shape == (3, 1, *patch_size)
    assert batch["seg"].dtype == np.int8 and batch["seg"].flags.c_contiguous
    assert len(batch["keys"]) == 3 and set(batch["keys"]) <= set(ALL_CASES)
    expected = [(3, 1, *(-(-p // s) for p, s in zip(patch_size, stride, strict=True))) for stride in strides]
    assert [t.shape for t in batch["target"]] == expected
    assert batch["target"][0] is batch["seg"]
    assert torch.from_numpy(batch["data"]).shape == batch["data"].shape


@pytest.mark.parametrize("patch_size", [(24, 32, 32), (32, 40)])
def test_patch_larger_than_image_is_zero_padded(cache: Path, patch_size: tuple[int, ...]) -> None:
    sampler = PatchSampler(
        cache, FG_CASES, patch_size=patch_size, batch_size=4, oversample_foreground=0.5, seed=1
    )
    batch = next(sampler)
    assert batch["data"].shape == (4, N_CHANNELS, *patch_size)
    image_voxels = int(np.prod(SHAPE[-len(patch_size) :]))
    for b in range(4):
        # the whole image (or slice) lies inside the patch, the rest is zero
        assert np.count_nonzero(batch["data"][b]) == N_CHANNELS * image_voxels
        assert np.count_nonzero(batch["seg"][b]) <= np.count_nonzero(batch["data"][b, 0])


def test_window_is_a_copy_of_the_image(cache: Path) -> None:
    sampler = PatchSampler(cache, ["case_a"], patch_size=(6, 7, 8), batch_size=5, seed=3)
    image = np.load(cache / "case_a.npy")
    batch = next(sampler)
    for patch in batch["data"]:
        # a window fully inside the image: find it by its first voxel
        z, y, x = (int(v[0]) for v in np.nonzero(image[0] == patch[0, 0, 0, 0]))
        np.testing.assert_array_equal(patch, image[:, z : z + 6, y : y + 7, x : x + 8])


@pytest.mark.parametrize(
    ("batch_size", "oversample", "expected"),
    [(4, 0.33, 2), (2, 0.33, 1), (5, 0.0, 0), (3, 1.0, 3), (12, 0.33, 4), (4, 0.5, 2)],
)
def test_number_of_forced_foreground_samples(
    cache: Path, batch_size: int, oversample: float, expected: int
) -> None:
    sampler = PatchSampler(
        cache, FG_CASES, patch_size=(4, 4, 4), batch_size=batch_size, oversample_foreground=oversample
    )
    assert sampler.n_forced_foreground() == expected


@pytest.mark.parametrize("patch_size", [(4, 4, 4), (4, 4)])
def test_oversampling_forces_foreground_in_last_samples(cache: Path, patch_size: tuple[int, ...]) -> None:
    sampler = PatchSampler(
        cache, FG_CASES, patch_size=patch_size, batch_size=4, oversample_foreground=0.5, seed=11
    )
    has_fg = np.array([[np.any(s > 0) for s in next(sampler)["seg"]] for _ in range(60)])
    assert has_fg[:, 2:].all()  # forced
    assert has_fg[:, :2].mean() < 0.5  # uniform samples rarely hit the small cubes
    # both classes get drawn as the centre class
    centres = [next(sampler)["seg"][3].ravel() for _ in range(30)]
    assert {1, 2} <= {int(v) for c in centres for v in np.unique(c)}


def test_class_first_sampling_draws_each_class_about_equally(tmp_path: Path) -> None:
    """Class 2 lies in one case of six: forced samples still centre on it about half the time."""
    rng = np.random.default_rng(3)
    cases = [f"c{i}" for i in range(6)]
    for i, case in enumerate(cases):
        _write_case(tmp_path, case, foreground=True, rng=rng)
        if i:  # class 2 only in case c0
            seg = np.load(tmp_path / f"{case}_seg.npy")
            seg[seg == 2] = 0
            np.save(tmp_path / f"{case}_seg.npy", seg)
            np.savez(tmp_path / f"{case}_locs.npz", class_1=np.argwhere(seg[0] == 1), class_2=np.zeros((0, 3)))
    sampler = PatchSampler(tmp_path, cases, patch_size=(4, 4, 4), batch_size=2, oversample_foreground=1.0, seed=5)
    assert sampler.class_cases() == {1: cases, 2: ["c0"]}
    draws = [sampler.draw_class_first() for _ in range(2000)]
    share_2 = np.mean([k == 2 for _, k in draws])
    assert 0.45 < share_2 < 0.55  # case-first would give about 1/12
    assert all(case == "c0" for case, k in draws if k == 2)
    centres = [int(s[(0, 2, 2, 2)]) for _ in range(300) for s in next(sampler)["seg"]]
    assert 0.4 < np.mean([c == 2 for c in centres]) < 0.6


def test_forced_foreground_without_foreground_falls_back_to_random(cache: Path) -> None:
    sampler = PatchSampler(
        cache, ["case_empty"], patch_size=(4, 8, 8), batch_size=2, oversample_foreground=1.0
    )
    batch = next(sampler)
    assert batch["seg"].max() == 0 and batch["data"].shape == (2, N_CHANNELS, 4, 8, 8)


def test_sampling_patch_size() -> None:
    none = AugmentationPlan(rotation_p=0.0, scale_p=0.0)
    assert sampling_patch_size((40, 56, 40), none, dims=3) == (40, 56, 40)
    assert sampling_patch_size((40, 56, 40), None, dims=3) == (40, 56, 40)
    full = sampling_patch_size((40, 56, 40), AugmentationPlan(), dims=3)
    assert all(f > p for f, p in zip(full, (40, 56, 40), strict=True))
    dummy = sampling_patch_size((8, 64, 64), AugmentationPlan(do_dummy_2d=True), dims=3)
    assert dummy[0] == 8 and dummy[1] > 64 and dummy[1] == dummy[2]
    two_d = sampling_patch_size((64, 64), AugmentationPlan(scale_p=0.0), dims=2)
    assert two_d[0] == two_d[1] == int(np.ceil(64 * (np.cos(0.5236) + np.sin(0.5236)) - 1e-6))


# --- transforms -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch_size", "dummy_2d", "order_seg"),
    [((8, 12, 12), False, 1), ((8, 12, 12), False, 0), ((12, 12), False, 1), ((4, 12, 12), True, 1)],
)
def test_transforms_keep_label_values(
    cache: Path, patch_size: tuple[int, ...], dummy_2d: bool, order_seg: int
) -> None:
    aug = AugmentationPlan(
        rotation_p=1.0,
        scale_p=1.0,
        elastic_p=0.5,
        lowres_p=0.5,
        gamma_p=0.5,
        noise_p=0.5,
        do_dummy_2d=dummy_2d,
    )
    dims = len(patch_size)
    sampler = PatchSampler(
        cache,
        FG_CASES,
        patch_size=patch_size,
        batch_size=4,
        oversample_foreground=1.0,
        sample_patch_size=sampling_patch_size(patch_size, aug, dims=dims),
        seed=5,
    )
    transform = build_transforms(aug, patch_size=patch_size, dims=dims, order_seg=order_seg)
    labels = set()
    for _ in range(3):
        batch = transform(**next(sampler))
        assert batch["data"].shape == (4, N_CHANNELS, *patch_size)
        assert np.isfinite(batch["data"]).all()
        labels |= {int(v) for v in np.unique(batch["seg"])}
    assert labels <= {0, 1, 2} and labels & {1, 2}


def test_spatial_transform_without_augmentation_is_a_centre_crop() -> None:
    data = np.arange(2 * 1 * 10 * 12 * 14, dtype=np.float32).reshape(2, 1, 10, 12, 14)
    seg = (data % 3).astype(np.int8)
    out = RotateScaleCropTransform((4, 6, 8))(data=data.copy(), seg=seg.copy())
    np.testing.assert_array_equal(out["data"], data[:, :, 3:7, 3:9, 3:11])
    np.testing.assert_array_equal(out["seg"], seg[:, :, 3:7, 3:9, 3:11])


def test_rotation_by_zero_with_cropped_interpolation_matches_centre_crop() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 1, 16, 18, 20)).astype(np.float32)
    seg = rng.integers(0, 3, size=(1, 1, 16, 18, 20)).astype(np.int8)
    transform = RotateScaleCropTransform(
        (6, 8, 10), rotation_p=1.0, rotation_range_rad=(0.0, 0.0), order_seg=0
    )
    out = transform(data=data.copy(), seg=seg.copy())
    np.testing.assert_allclose(out["data"], data[:, :, 5:11, 5:13, 5:15], atol=1e-4)
    np.testing.assert_array_equal(out["seg"], seg[:, :, 5:11, 5:13, 5:15])


def test_mirror_axes_restricted_to_patch_dims() -> None:
    compose = build_transforms(AugmentationPlan(), patch_size=(16, 16), dims=2)
    mirrors = [t for t in compose.transforms if type(t).__name__ == "MirrorTransform"]
    assert len(mirrors) == 1 and tuple(mirrors[0].axes) == (0, 1)
    compose = build_transforms(AugmentationPlan(mirror_axes=()), patch_size=(8, 16, 16), dims=3)
    assert not [t for t in compose.transforms if type(t).__name__ == "MirrorTransform"]


@pytest.mark.parametrize(
    ("shape", "strides", "expected"),
    [
        ((2, 1, 8, 16, 16), [(1, 1, 1), (1, 2, 2), (2, 4, 4)], [(8, 16, 16), (8, 8, 8), (4, 4, 4)]),
        ((2, 1, 16, 12), [(1, 1), (2, 2), (4, 4), (8, 8)], [(16, 12), (8, 6), (4, 3), (2, 2)]),
    ],
)
def test_deep_supervision_targets(shape: tuple[int, ...], strides: list, expected: list) -> None:
    seg = np.random.default_rng(0).integers(0, 3, size=shape).astype(np.int8)
    targets = downsample_seg_for_deep_supervision(seg, strides)
    assert [t.shape[2:] for t in targets] == expected
    assert all(t.dtype == np.int8 and t.flags.c_contiguous for t in targets)
    last = strides[-1]
    np.testing.assert_array_equal(
        targets[-1], seg[(slice(None), slice(None), *(slice(None, None, s) for s in last))]
    )
    with pytest.raises(ValueError):
        downsample_seg_for_deep_supervision(seg, [(1,) * (len(shape) - 1)])


# --- loaders ----------------------------------------------------------------------------------------


def _batches_equal(a: dict, b: dict) -> bool:
    return (
        a["keys"] == b["keys"] and np.array_equal(a["data"], b["data"]) and np.array_equal(a["seg"], b["seg"])
    )


def test_single_threaded_loader_is_deterministic_and_leaves_global_state(cache: Path) -> None:
    config = _config((8, 12, 12), batch_size=3, aug=STRONG_AUG)
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    runs = []
    for seed in (1, 1, 2):
        with make_training_loader(cache, ALL_CASES, config, num_processes=0, seed=seed) as loader:
            runs.append([next(loader) for _ in range(3)])
    assert all(_batches_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(_batches_equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))
    assert np.random.random() == expected_np and random.random() == expected_py


def test_background_workers_yield_batches_and_shut_down(cache: Path) -> None:
    config = _config((8, 12, 12), batch_size=2, aug=STRONG_AUG, num_workers=2)
    runs = []
    for _ in range(2):
        loader = make_training_loader(
            cache, ALL_CASES, config, deep_supervision_strides=[(1, 1, 1), (2, 2, 2)]
        )
        with loader:
            processes = list(loader._augmenter._processes)
            assert len(processes) == 2 and all(p.is_alive() for p in processes)
            runs.append([next(loader) for _ in range(4)])
            assert loader.batches == 4 and loader.wait_seconds > 0
            assert [t.shape for t in runs[-1][0]["target"]] == [(2, 1, 8, 12, 12), (2, 1, 4, 6, 6)]
        assert not any(p.is_alive() for p in processes)
        with pytest.raises(RuntimeError):
            next(loader)
    # seeded workers, round-robin order: the same seed gives the same batches
    assert all(_batches_equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    # the two workers draw different streams; worker 0 (batches 0, 2) draws what the in-process loader draws
    assert not _batches_equal(runs[0][0], runs[0][1])
    with make_training_loader(cache, ALL_CASES, config, num_processes=0) as loader:
        assert _batches_equal(runs[0][0], next(loader)) and _batches_equal(runs[0][2], next(loader))


def test_workers_pin_themselves_to_worker_cpus(cache: Path, allowed_cpus: Callable[[int], set[int]]) -> None:
    usable = sorted(os.sched_getaffinity(0))
    config = _config((8, 12, 12), batch_size=2, aug=STRONG_AUG, num_workers=1)
    with make_training_loader(cache, ALL_CASES, config, worker_cpus=usable[-1:]) as loader:
        next(loader)  # the worker has started and pinned itself
        (pid,) = loader.worker_pids
        assert allowed_cpus(pid) == {usable[-1]}
        assert allowed_cpus(os.getpid()) == set(usable)  # the calling process is left as it was
    assert loader.worker_pids == ()
    with make_training_loader(cache, ALL_CASES, config) as loader:  # no worker_cpus: not pinned
        next(loader)
        assert allowed_cpus(loader.worker_pids[0]) == set(usable)


def test_validation_loader_does_not_augment(cache: Path) -> None:
    config = _config((6, 10, 10), batch_size=4, aug=STRONG_AUG, oversample=0.5)
    images = {case: np.load(cache / f"{case}.npy") for case in ALL_CASES}
    with make_validation_loader(
        cache, FG_CASES, config, deep_supervision_strides=[(1, 1, 1), (2, 2, 2)]
    ) as loader:
        assert isinstance(loader, BatchLoader) and loader.num_processes == 0
        batch = next(loader)
    assert batch["data"].shape == (4, N_CHANNELS, 6, 10, 10)
    assert [t.shape[2:] for t in batch["target"]] == [(6, 10, 10), (3, 5, 5)]
    for b, case in enumerate(batch["keys"]):
        assert np.isin(batch["data"][b], images[case]).all()  # plain copies of image voxels
    assert all(np.any(s > 0) for s in batch["seg"][2:])
    assert build_validation_transforms().transforms  # no augmentation, only conversion


def test_reset_timing() -> None:
    loader = BatchLoader(iter([{"data": np.zeros(1)}] * 3), num_processes=0)
    next(loader)
    next(loader)
    assert loader.batches == 2
    loader.reset_timing()
    assert loader.batches == 0 and loader.wait_seconds == 0.0
    loader.close()
    loader.close()
