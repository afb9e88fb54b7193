"""The batched (device) augmentation against the CPU pipeline: same distributions, aligned labels, shapes.

Everything runs on CPU tensors, so CI runs it; on a GPU the same functions run on CUDA tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    rotate_coords_2d,
    rotate_coords_3d,
    scale_coords,
)
from batchgenerators.transforms.spatial_transforms import MirrorTransform
from scipy import stats
from scipy.ndimage import gaussian_filter, map_coordinates

from automedseg.augmentation import (
    RotateScaleCropTransform,
    build_transforms,
    downsample_seg_for_deep_supervision,
    sampling_patch_size,
)
from automedseg.augmentation_batched import (
    SpatialDraw,
    augment_batch,
    deep_supervision_targets,
    draw_spatial,
    gaussian_blur,
    intensity_transforms,
    make_batch_random,
    mirror,
    spatial_matrices,
    spatial_transform,
)
from automedseg.device_batches import make_device_training_loader, use_device_augmentation
from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, TrainingPlan

torch.set_num_threads(1)

NOTHING = AugmentationPlan(rotation_p=0.0, scale_p=0.0, elastic_p=0.0, noise_p=0.0, blur_p=0.0, brightness_p=0.0,
                           contrast_p=0.0, lowres_p=0.0, gamma_p=0.0, mirror_axes=())
STRONG = AugmentationPlan(rotation_p=1.0, scale_p=1.0, elastic_p=0.5, elastic_alpha=(0.0, 20.0),
                          elastic_sigma=(3.0, 4.0))


@pytest.fixture
def global_np_state() -> Iterator[None]:
    """Seed the global NumPy stream the batchgenerators transforms draw from, and restore it afterwards."""
    saved = np.random.get_state()
    np.random.seed(1234)
    yield
    np.random.set_state(saved)


def _one(**kw: Any) -> SpatialDraw:
    fields = {"rotate": [False], "angles": [[0.0]], "scale": [False], "factors": [1.0], "elastic": [False],
              "alpha": [0.0], "sigma": [0.0], **kw}
    return SpatialDraw(**{k: np.asarray(v) for k, v in fields.items()})


# --- spatial ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("patch", "window", "angles", "factor"), [
    ((8, 12, 10), (15, 17, 19), [0.3, -0.2, 0.5], 1.2),
    ((8, 12, 10), (15, 17, 19), [-0.5, 0.1, 0.0], 0.8),
    ((12, 10), (17, 19), [0.7], 1.3),
    ((12, 10), (17, 19), [-2.5], 0.75),
])
def test_spatial_transform_equals_the_cpu_coordinates(patch: tuple[int, ...], window: tuple[int, ...],
                                                      angles: list[float], factor: float) -> None:
    """Same parameters, same sampling positions: equal to the CPU path's coordinates interpolated linearly."""
    arr = np.random.default_rng(0).random(window).astype(np.float32)
    coords = create_zero_centered_coordinate_mesh(patch)
    coords = rotate_coords_3d(coords, *angles) if len(patch) == 3 else rotate_coords_2d(coords, angles[0])
    coords = scale_coords(coords, factor) + (np.array(window) / 2 - 0.5).reshape(-1, *[1] * len(patch))
    expected = map_coordinates(arr, coords, order=1, mode="constant", cval=0.0)
    draw = _one(rotate=[True], angles=[angles], scale=[True], factors=[factor])
    got, _ = spatial_transform(torch.from_numpy(arr)[None, None], None, aug=NOTHING, patch_size=patch,
                               rng=make_batch_random(0), draw=draw)
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-5)


def _cpu_matrices(aug: AugmentationPlan, patch: tuple[int, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, d, d) linear maps the CPU transform drew (least squares on its coordinates) and whether elastic."""
    t = RotateScaleCropTransform(patch, rotation_p=aug.rotation_p, rotation_range_rad=aug.rotation_range_rad,
                                 scale_p=aug.scale_p, scale_range=aug.scale_range, elastic_p=aug.elastic_p,
                                 elastic_alpha=aug.elastic_alpha, elastic_sigma=aug.elastic_sigma)
    d = len(patch)
    base = create_zero_centered_coordinate_mesh(patch).reshape(d, -1)
    mats, elastic = np.tile(np.eye(d), (n, 1, 1)), np.zeros(n, dtype=bool)
    for i in range(n):
        coords = t._draw_coordinates()
        if coords is None:
            continue
        flat = coords.reshape(d, -1)
        mats[i] = flat @ np.linalg.pinv(base)
        elastic[i] = np.abs(flat - mats[i] @ base).max() > 1e-6
    return mats, elastic


def _summary(mats: np.ndarray) -> dict[str, np.ndarray]:
    d = mats.shape[1]
    scale = np.abs(np.linalg.det(mats)) ** (1 / d)
    rot = mats / scale[:, None, None]
    if d == 2:
        angle = np.abs(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))
    else:
        angle = np.arccos(np.clip((np.trace(rot, axis1=1, axis2=2) - 1) / 2, -1, 1))
    return {"scale": scale, "angle": angle, "rotated": angle > 1e-6, "scaled": np.abs(scale - 1) > 1e-9}


@pytest.mark.parametrize(("aug", "patch"), [
    (AugmentationPlan(), (3, 3, 3)),  # nnU-Net's 3D defaults: rotation 0.2 within +-30 deg, scale 0.2 in 0.7-1.4
    (AugmentationPlan(rotation_range_rad=(-np.pi, np.pi)), (3, 3)),  # 2D: any in-plane angle
    (AugmentationPlan(rotation_p=0.5, scale_p=0.35, elastic_p=0.3, scale_range=(0.85, 1.25)), (3, 3, 3)),
    (AugmentationPlan(rotation_p=0.6, scale_p=0.1, scale_range=(1.0, 1.4)), (3, 3)),  # do_dummy_2d: in-plane
])
def test_spatial_draws_have_the_cpu_distribution(aug: AugmentationPlan, patch: tuple[int, ...],
                                                 global_np_state: None) -> None:
    n = 3000
    cpu_mats, cpu_elastic = _cpu_matrices(aug, patch, n)
    draw = draw_spatial(aug, batch_size=n, n_axes=len(patch), rng=np.random.default_rng(3))
    tol = 4 * np.sqrt(0.25 / n)  # four standard errors of a proportion
    assert abs(cpu_elastic.mean() - aug.elastic_p) < tol and abs(draw.elastic.mean() - aug.elastic_p) < tol
    # Elastic offsets hide the linear map of a sample: compare rotation and scaling on the others.
    cpu, dev = _summary(cpu_mats[~cpu_elastic]), _summary(spatial_matrices(draw)[~draw.elastic])
    for key, p in (("rotated", aug.rotation_p), ("scaled", aug.scale_p)):
        assert abs(cpu[key].mean() - p) < tol and abs(dev[key].mean() - p) < tol, key
    for key, subset in (("angle", "rotated"), ("scale", "scaled")):
        a, b = cpu[key][cpu[subset]], dev[key][dev[subset]]
        if len(a) > 50:
            assert stats.ks_2samp(a, b).pvalue > 1e-3, key


def test_a_planted_block_moves_with_its_labels() -> None:
    """A 90-degree in-plane rotation turns image and labels alike."""
    seg = np.zeros((1, 1, 9, 9), dtype=np.int8)
    seg[0, 0, 1:4, 2:8] = 1
    seg[0, 0, 1:3, 6:8] = 2
    data = seg.astype(np.float32) * 10 + 1
    draw = _one(rotate=[True], angles=[[np.pi / 2]])
    x, s = spatial_transform(torch.from_numpy(data), torch.from_numpy(seg), aug=NOTHING, patch_size=(9, 9),
                             rng=make_batch_random(0), draw=draw)
    k = 1 if np.array_equal(s[0, 0].numpy(), np.rot90(seg[0, 0], 1)) else -1
    np.testing.assert_array_equal(s[0, 0].numpy(), np.rot90(seg[0, 0], k))
    np.testing.assert_allclose(x[0, 0].numpy(), np.rot90(data[0, 0], k), atol=1e-4)


@pytest.mark.parametrize(("labels", "patch", "dummy_2d"), [
    ((0, 1, 2), (8, 16, 16), False),
    ((0, 3, 7), (16, 16), False),
    ((0, 1, 2), (4, 16, 16), True),
])
@pytest.mark.parametrize("label_mode", ["linear", "nearest"])
def test_labels_stay_in_the_label_set_and_aligned(labels: tuple[int, ...], patch: tuple[int, ...], dummy_2d: bool,
                                                  label_mode: str) -> None:
    dims = len(patch)
    aug = dataclasses.replace(STRONG, do_dummy_2d=dummy_2d, mirror_axes=tuple(range(dims)))
    window = sampling_patch_size(patch, aug, dims=dims)
    seg = np.zeros((6, 1, *window), dtype=np.int8)
    inner = tuple(slice(w // 4, w - w // 4) for w in window)
    core = tuple(slice(w // 3, w - w // 3) for w in window)
    seg[(slice(None), 0, *inner)] = labels[1]
    seg[(slice(None), 0, *core)] = labels[2]
    data = np.where(seg == labels[2], 2.0, np.where(seg == labels[1], 1.0, 0.0)).astype(np.float32)
    x, s = spatial_transform(torch.from_numpy(data), torch.from_numpy(seg), aug=aug, patch_size=patch,
                             rng=make_batch_random(1), in_plane=dummy_2d, label_mode=label_mode)
    x, s = mirror(x, s, axes=range(dims), rng=np.random.default_rng(2))
    assert set(torch.unique(s).tolist()) <= set(labels)
    img, lab = x.numpy(), s.numpy()
    assert (img[lab == labels[2]] > 1.5).mean() > 0.9  # the image moved with its labels
    assert (img[lab == labels[0]] < 0.5).mean() > 0.9
    assert (lab == labels[2]).any()


@pytest.mark.parametrize(("patch", "dummy_2d", "strides"), [
    ((8, 16, 16), False, [(1, 1, 1), (1, 2, 2), (2, 4, 4)]),
    ((16, 16), False, [(1, 1), (2, 2), (4, 4)]),
    ((4, 16, 16), True, [(1, 1, 1), (1, 2, 2)]),
])
def test_augment_batch_shapes_dtypes_and_targets(patch: tuple[int, ...], dummy_2d: bool, strides: list) -> None:
    dims = len(patch)
    aug = dataclasses.replace(STRONG, do_dummy_2d=dummy_2d, lowres_p=0.5, gamma_p=0.5, noise_p=0.5, blur_p=0.5)
    window = sampling_patch_size(patch, aug, dims=dims)
    data = torch.rand(3, 2, *window)
    seg = (torch.rand(3, 1, *window) * 3).to(torch.int8)
    x, s = augment_batch(data, seg, aug=aug, patch_size=patch, dims=dims, rng=make_batch_random(4))
    assert x.shape == (3, 2, *patch) and x.dtype == torch.float32 and x.is_contiguous()
    assert s.shape == (3, 1, *patch) and s.dtype == torch.int8
    assert torch.isfinite(x).all()
    targets = deep_supervision_targets(s, strides)
    expected = downsample_seg_for_deep_supervision(s.numpy(), strides)
    assert [tuple(t.shape) for t in targets] == [e.shape for e in expected]
    assert all(np.array_equal(t.numpy(), e) for t, e in zip(targets, expected))


# --- intensity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_gaussian_blur_equals_scipy(mode: str) -> None:
    x = np.random.default_rng(0).normal(size=(3, 7, 9, 11)).astype(np.float32)
    sigmas = [0.5, 1.0, 2.0]
    got = gaussian_blur(torch.from_numpy(x), torch.tensor(sigmas), mode=mode).numpy()
    for v, sigma in enumerate(sigmas):
        np.testing.assert_allclose(got[v], gaussian_filter(x[v], sigma, mode=mode), atol=1e-4)


def _effects(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """Fraction of samples changed, and the mean |change| of the changed ones."""
    diff = np.abs(after - before).reshape(len(before), -1)
    changed = diff.max(1) > 1e-5
    return float(changed.mean()), float(diff[changed].mean()) if changed.any() else 0.0


@pytest.mark.parametrize(("fields", "rel_tol"), [
    ({"noise_p": 0.3}, 0.15),
    ({"blur_p": 0.3}, 0.15),
    ({"brightness_p": 0.3, "brightness_range": (0.6, 1.3)}, 0.15),
    ({"contrast_p": 0.3}, 0.15),
    ({"gamma_p": 0.3}, 0.15),  # with the inverted gamma (probability 0.1) before it, as on the CPU
    ({"lowres_p": 0.4}, 0.4),  # linear instead of cubic upsampling: the same draws, a little less change
])
def test_intensity_transforms_match_batchgenerators(fields: dict[str, Any], rel_tol: float,
                                                    global_np_state: None) -> None:
    """The same probabilities and a similar size of change as the CPU pipeline, transform by transform."""
    aug = dataclasses.replace(NOTHING, **fields)
    n, shape = 800, (2, 6, 8, 8)
    data = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    pipeline = build_transforms(aug, patch_size=shape[1:], dims=3)
    cpu = np.concatenate([pipeline(data=data[i : i + 100].copy())["data"] for i in range(0, n, 100)])
    dev = intensity_transforms(torch.from_numpy(data), aug=aug, rng=make_batch_random(6)).numpy()
    (p_cpu, m_cpu), (p_dev, m_dev) = _effects(data, cpu), _effects(data, dev)
    assert abs(p_cpu - p_dev) < 4 * np.sqrt(0.25 / n), (p_cpu, p_dev)
    assert abs(m_cpu - m_dev) < rel_tol * m_cpu, (m_cpu, m_dev)


def test_mirroring_frequency_per_axis(global_np_state: None) -> None:
    n = 2000
    data = np.random.default_rng(0).normal(size=(n, 1, 3, 4, 5)).astype(np.float32)
    cpu = MirrorTransform((0, 1, 2))(data=data.copy())["data"]
    dev, _ = mirror(torch.from_numpy(data), None, axes=(0, 1, 2), rng=np.random.default_rng(1))
    for axis in range(3):
        flipped = np.flip(data, axis + 2)
        for out in (cpu, dev.numpy()):
            # which samples equal the flip along this axis (after undoing the other axes' flips)
            freq = np.mean([any(np.array_equal(np.flip(out[i], axes), flipped[i]) for axes in
                                _other_flips(axis)) for i in range(n)])
            assert abs(freq - 0.5) < 4 * np.sqrt(0.25 / n), (axis, freq)


def _other_flips(axis: int) -> list[tuple[int, ...]]:
    others = [a + 1 for a in range(3) if a != axis]
    return [(), (others[0],), (others[1],), tuple(others)]


# --- loader and choice --------------------------------------------------------------------------------------


def _config(patch: tuple[int, ...], aug: AugmentationPlan, *, batch: int = 2, workers: int = 0) -> ConfigurationPlan:
    dims = len(patch)
    return ConfigurationPlan(
        name=f"{dims}d", data_identifier="data_id", dims=dims, spacing_mm=(1.0, 1.0, 1.0), patch_size=patch,
        batch_size=batch, median_shape=(12, 20, 20), normalization=(), image_order=3, label_order=1,
        separate_z=False, out_of_plane_order=0,
        network=NetworkPlan(architecture="plain_unet", features_per_stage=(4, 8), kernel_sizes=((3,) * dims,) * 2,
                            strides=((1,) * dims, (2,) * dims), n_conv_per_stage_encoder=(1, 1),
                            n_conv_per_stage_decoder=(1,)),
        augmentation=aug, training=TrainingPlan(epochs=1, iterations_per_epoch=1, num_workers=workers, seed=3))


@pytest.mark.parametrize("patch", [(8, 12, 12), (12, 12)])
def test_device_loader_batches_are_augmented_windows(window_cache: Any, patch: tuple[int, ...]) -> None:
    config = _config(patch, dataclasses.replace(STRONG, elastic_p=0.0))
    strides = [(1,) * len(patch), (2,) * len(patch)]
    runs = []
    for workers in (0, 1):
        with make_device_training_loader(window_cache.folder, window_cache.case_ids, config, device=torch.device("cpu"),
                                         deep_supervision_strides=strides, seed=9, num_processes=workers) as loader:
            batches = [next(loader) for _ in range(3)]
            assert loader.wait_seconds > 0 and loader.batches == 3
        runs.append(batches)
    for batch in runs[0]:
        assert batch["data"].shape == (2, 2, *patch) and batch["seg"].shape == (2, 1, *patch)
        assert [tuple(t.shape[2:]) for t in batch["target"]] == [patch, tuple((p + 1) // 2 for p in patch)]
        assert set(torch.unique(batch["seg"]).tolist()) <= {0, 1, 2}
    for a, b in zip(*runs):  # worker 0 draws what the in-process loader draws; augmentation seeded alike
        assert a["keys"] == b["keys"] and torch.equal(a["data"], b["data"]) and torch.equal(a["seg"], b["seg"])


@pytest.mark.parametrize(("device", "requested", "expected"), [
    ("cuda", None, True),  # the GPU is starved by CPU workers: augment there
    ("cpu", None, False),  # the CPU path wins on a CPU
    ("mps", None, False),
    ("cuda", False, False),
    ("cpu", True, True),
])
def test_where_augmentation_runs(device: str, requested: bool | None, expected: bool) -> None:
    assert use_device_augmentation(torch.device(device), requested) is expected
