"""Tests for automedseg.preprocessing: resampling, normalisation, the forward/inverse pair and the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from automedseg.fingerprint import compute_fingerprint
from automedseg.io import load_dataset_spec, read_images, read_label
from automedseg.planning import NOMINAL_PROFILES, plan_dataset
from automedseg.plans import ChannelNormalization
from automedseg.preprocessing import (
    CACHE_MANIFEST,
    MAX_LOCATIONS_PER_CLASS,
    case_is_cached,
    class_locations,
    complete_cases,
    load_case_properties,
    normalize,
    preprocess_dataset,
    preprocess_image,
    preprocessing_key,
    resample_image,
    resample_labels,
    restore_probabilities,
    target_shape,
)

CPU = NOMINAL_PROFILES["reference-cpu-2core"]

# ----------------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,new_shape,order,separate_z", [
    ((2, 4, 8, 8), (8, 16, 16), 3, False),
    ((1, 4, 8, 8), (2, 4, 4), 1, False),
    ((1, 4, 8, 8), (12, 6, 10), 3, True),
    ((1, 1, 10, 12), (1, 20, 6), 3, True),
    ((3, 5, 6, 7), (5, 6, 7), 3, False),
])
def test_resample_image_shapes(shape, new_shape, order, separate_z):
    rng = np.random.default_rng(0)
    img = rng.random(shape, dtype=np.float32)
    out = resample_image(img, new_shape, order=order, separate_z=separate_z)
    assert out.shape == (shape[0], *new_shape)
    assert out.dtype == np.float32


def test_resample_same_shape_is_identity():
    img = np.random.default_rng(0).random((1, 3, 4, 5), dtype=np.float32)
    assert resample_image(img, (3, 4, 5)) is img


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resample_constant_stays_constant(order):
    img = np.full((1, 3, 5, 7), 4.5, dtype=np.float32)
    np.testing.assert_allclose(resample_image(img, (7, 9, 4), order=order), 4.5, rtol=1e-5)


def test_resample_aligns_voxel_centres():
    ramp = np.arange(8, dtype=np.float32)[None, None, None, :]  # (1, 1, 1, 8)
    out = resample_image(ramp, (1, 1, 4), order=1)
    np.testing.assert_allclose(out.ravel(), [0.5, 2.5, 4.5, 6.5], atol=1e-5)


def test_resample_separate_z_uses_nearest_out_of_plane():
    img = np.zeros((1, 2, 4, 4), dtype=np.float32)
    img[0, 1] = 10.0
    out = resample_image(img, (4, 4, 4), order=3, separate_z=True, out_of_plane_order=0)
    assert set(np.unique(out).round(4).tolist()) == {0.0, 10.0}  # no values between slices
    np.testing.assert_allclose(out[0, :, 0, 0], [0, 0, 10, 10], atol=1e-5)


@pytest.mark.parametrize("new_shape,separate_z", [((16, 48, 40), False), ((8, 12, 12), False),
                                                  ((16, 30, 30), True), ((4, 24, 24), True)])
def test_resample_labels_keeps_label_set(new_shape, separate_z):
    label = np.zeros((8, 24, 24), dtype=np.int8)
    label[1:7, 2:20, 3:18] = 1
    label[3:6, 6:14, 6:14] = 2
    label[2:4, 16:19, 4:8] = 3
    out = resample_labels(label, new_shape, separate_z=separate_z)
    assert out.shape == new_shape and out.dtype == label.dtype
    assert set(np.unique(out).tolist()) == {0, 1, 2, 3}
    # Volume fractions survive resampling.
    for k in (1, 2):
        assert (out == k).mean() == pytest.approx((label == k).mean(), rel=0.35)


def test_resample_labels_same_shape_is_identity():
    label = np.zeros((2, 3, 4), dtype=np.int8)
    assert resample_labels(label, (2, 3, 4)) is label


# ----------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------


def test_normalize_schemes():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1200, 1500, (4, 5, 6)).astype(np.float32)
    mr = rng.normal(300, 40, (4, 5, 6)).astype(np.float32)
    red = rng.integers(0, 256, (4, 5, 6)).astype(np.float32)
    raw = rng.normal(0, 3, (4, 5, 6)).astype(np.float32)
    image = np.stack([ct, mr, red, raw])
    schemes = [
        ChannelNormalization("ct", clip_low=-100.0, clip_high=400.0, mean=50.0, std=100.0),
        ChannelNormalization("zscore"),
        ChannelNormalization("rgb_to_01"),
        ChannelNormalization("none"),
    ]
    out = normalize(image, schemes)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out[0], (np.clip(ct, -100, 400) - 50) / 100, rtol=1e-5)
    assert out[0].min() == pytest.approx(-1.5) and out[0].max() == pytest.approx(3.5)
    assert out[1].mean() == pytest.approx(0.0, abs=1e-5) and out[1].std() == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(out[2], red / 255.0, rtol=1e-6)
    assert 0.0 <= out[2].min() and out[2].max() <= 1.0
    np.testing.assert_array_equal(out[3], raw)


def test_normalize_constant_image_is_finite():
    out = normalize(np.full((1, 2, 3, 4), 7.0, dtype=np.float32), [ChannelNormalization("zscore")])
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)


def test_normalize_rejects_channel_count_mismatch():
    with pytest.raises(ValueError, match="1 channel"):
        normalize(np.zeros((2, 1, 2, 2), dtype=np.float32), [ChannelNormalization("zscore")])


# ----------------------------------------------------------------------------------------------------
# forward + inverse on an anisotropic dataset whose coarse axis is y (so the plan transposes)
# ----------------------------------------------------------------------------------------------------

TRANSPOSED_SPACINGS = [(0.8, 3.0, 0.8), (1.0, 3.0, 1.0), (0.9, 3.0, 0.9)]  # (z, y, x): y is the coarse axis
TRANSPOSED_SHAPE = (24, 8, 22)


def _transposed_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = TRANSPOSED_SHAPE
    image = np.zeros(TRANSPOSED_SHAPE, dtype=np.float32)
    image[2:22, 1:7, 2:21] = 100.0 + i  # body; the zero margin gets cropped
    label = np.zeros(TRANSPOSED_SHAPE, dtype=np.uint8)
    label[5:15, 2:6, 4:12] = 1
    label[8:12, 3:5, 6:10] = 2
    label[16:20, 2:5, 14:19] = 1
    image[label == 1] = 300.0
    image[label == 2] = 500.0
    return image, label


@pytest.fixture
def transposed(tmp_path, write_volume):
    root = tmp_path / "Dataset030_Transposed"
    for i, sp in enumerate(TRANSPOSED_SPACINGS):
        image, label = _transposed_case(i)
        write_volume(root / "imagesTr" / f"t_{i:03d}_0000.nii.gz", image, spacing_zyx=sp)
        write_volume(root / "labelsTr" / f"t_{i:03d}.nii.gz", label, spacing_zyx=sp)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Transposed", "channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 3, "file_ending": ".nii.gz",
    }))
    spec = load_dataset_spec(root)
    plans = plan_dataset(compute_fingerprint(spec, jobs=1), device=CPU, time_budget_s=1200)
    return spec, plans


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_plan_of_transposed_dataset(transposed):
    _, plans = transposed
    assert plans.transpose_forward == (1, 0, 2)
    assert plans.transpose_backward == (1, 0, 2)
    cfg = plans.configuration("3d_fullres")
    assert cfg.spacing_mm == pytest.approx((3.0, 0.9, 0.9))
    assert cfg.separate_z is True


@pytest.mark.parametrize("config_name", ["3d_fullres", "2d"])
@pytest.mark.parametrize("case_index", [0, 1])
def test_preprocess_restore_roundtrip(transposed, config_name, case_index):
    spec, plans = transposed
    config = plans.configuration(config_name)
    case = spec.cases[case_index]
    image, geometry = read_images(case, n_channels=1)
    label, _ = read_label(case.label)
    data, seg, props = preprocess_image(image, geometry, plans, config, case_id=case.case_id, label=label)
    assert data.dtype == np.float32 and data.flags.c_contiguous
    assert seg is not None and seg.shape == data.shape[1:]
    assert set(np.unique(seg).tolist()) == {0, 1, 2}
    # Cropped to the body z 2..22, y 1..7, x 2..21, then transposed to (y, z, x).
    assert props.crop_bbox == ((2, 22), (1, 7), (2, 21))
    assert props.shape_after_crop_transposed == (6, 20, 19)
    assert props.original_shape == TRANSPOSED_SHAPE
    assert props.spacing_transposed_mm == pytest.approx(tuple(TRANSPOSED_SPACINGS[case_index][t] for t in (1, 0, 2)))
    assert data.shape[1:] == target_shape((6, 20, 19), props.spacing_transposed_mm, config)
    if case_index == 0:
        assert data.shape[1:] != (6, 20, 19)  # 0.8 mm in-plane -> 0.9 mm: really resampled
    # The foreground sits where the label is: coarse axis first in preprocessed space.
    assert data[0][seg == 2].mean() > data[0][seg == 0].mean()
    onehot = np.stack([(seg == k).astype(np.float32) for k in range(plans.num_classes)])
    probs = restore_probabilities(onehot, props, plans, config)
    assert probs.shape == (3, *TRANSPOSED_SHAPE)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
    restored = probs.argmax(0)
    for k in (1, 2):
        assert _dice(restored == k, label == k) > 0.85, k
    outside = np.ones(TRANSPOSED_SHAPE, dtype=bool)
    outside[2:22, 1:7, 2:21] = False
    assert np.all(probs[0][outside] == 1.0)


def test_properties_roundtrip_through_json(transposed):
    spec, plans = transposed
    config = plans.configuration("3d_fullres")
    image, geometry = read_images(spec.cases[0], n_channels=1)
    _, _, props = preprocess_image(image, geometry, plans, config, case_id="x")
    assert type(props).from_dict(json.loads(json.dumps(props.to_dict()))) == props


@pytest.mark.parametrize("shape,spacing,dims,expected", [
    ((10, 20, 30), (3.0, 1.0, 1.0), 3, (20, 20, 30)),  # 3D config resamples z too
    ((10, 20, 30), (3.0, 1.0, 1.0), 2, (10, 20, 30)),  # 2D config keeps z
    ((1, 20, 30), (999.0, 0.5, 0.5), 2, (1, 10, 15)),  # 2D image
])
def test_target_shape(transposed, shape, spacing, dims, expected):
    _, plans = transposed
    cfg = plans.configuration("3d_fullres" if dims == 3 else "2d")
    import dataclasses

    cfg = dataclasses.replace(cfg, spacing_mm=(1.5, 1.0, 1.0))
    assert target_shape(shape, spacing, cfg) == expected


# ----------------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def planned(nnunet_3d):
    spec = load_dataset_spec(nnunet_3d.root)
    plans = plan_dataset(compute_fingerprint(spec, jobs=1), device=CPU, time_budget_s=1200,
                         configurations=["3d_fullres"])
    return spec, plans


def test_preprocess_dataset_writes_cache(planned, tmp_path):
    spec, plans = planned
    root = tmp_path / "preprocessed"
    done = preprocess_dataset(spec, plans, root, jobs=1)
    config = plans.configuration("3d_fullres")
    assert done == {config.data_identifier: len(spec.cases)}
    folder = root / config.data_identifier
    key = preprocessing_key(plans, config)
    names = sorted(p.name for p in folder.iterdir())
    expected = [f"{c.case_id}{s}" for c in spec.cases for s in (".npy", "_seg.npy", "_locs.npz", ".json")]
    assert names == sorted([*expected, CACHE_MANIFEST])
    assert complete_cases(folder, plans, config) == sorted(c.case_id for c in spec.cases)
    for case in spec.cases:
        data = np.load(folder / f"{case.case_id}.npy", mmap_mode="r")
        seg = np.load(folder / f"{case.case_id}_seg.npy", mmap_mode="r")
        assert data.dtype == np.float32 and data.ndim == 4 and data.shape[0] == 1
        assert seg.dtype == np.int8 and seg.shape == (1, *data.shape[1:])
        assert set(np.unique(seg).tolist()) == {0, 1, 2}
        with np.load(folder / f"{case.case_id}_locs.npz", allow_pickle=False) as locs:
            assert sorted(locs.files) == ["class_1", "class_2"]
            for k in (1, 2):
                coords = locs[f"class_{k}"]
                assert coords.dtype == np.int64 and coords.shape == (int((seg[0] == k).sum()), 3)
                assert np.all(seg[0][tuple(coords.T)] == k)
        meta = json.loads((folder / f"{case.case_id}.json").read_text())
        assert meta["preprocessing_key"] == key
        props = load_case_properties(folder, case.case_id)
        assert props.case_id == case.case_id and props.shape_after_resample == data.shape[1:]
        assert case_is_cached(folder, case.case_id, key)


def test_preprocess_dataset_skips_cached_and_overwrites(planned, tmp_path):
    spec, plans = planned
    root = tmp_path / "preprocessed"
    ident = plans.configuration("3d_fullres").data_identifier
    folder = root / ident
    assert preprocess_dataset(spec, plans, root, jobs=1) == {ident: len(spec.cases)}
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert preprocess_dataset(spec, plans, root, jobs=1) == {ident: 0}
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    # An incomplete case (a file lost) is redone, and only that one.
    (folder / f"{spec.cases[2].case_id}_locs.npz").unlink()
    assert preprocess_dataset(spec, plans, root, jobs=1) == {ident: 1}
    # A case written with another preprocessing key is redone.
    meta_path = folder / f"{spec.cases[0].case_id}.json"
    meta = json.loads(meta_path.read_text())
    meta["preprocessing_key"] = "stale"
    meta_path.write_text(json.dumps(meta))
    key = preprocessing_key(plans, plans.configuration("3d_fullres"))
    assert not case_is_cached(folder, spec.cases[0].case_id, key)
    assert preprocess_dataset(spec, plans, root, jobs=1) == {ident: 1}
    assert preprocess_dataset(spec, plans, root, jobs=2, overwrite=True) == {ident: len(spec.cases)}
    again = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert again == first  # deterministic, whether one process or two made it
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_preprocessing_key_changes_with_the_plan(planned):
    import dataclasses

    _, plans = planned
    cfg = plans.configuration("3d_fullres")
    key = preprocessing_key(plans, cfg)
    assert preprocessing_key(plans, cfg) == key
    changed = [
        dataclasses.replace(cfg, spacing_mm=(2.0, 0.8, 0.8)),
        dataclasses.replace(cfg, normalization=(ChannelNormalization("none"),)),
        dataclasses.replace(cfg, image_order=1),
        dataclasses.replace(cfg, separate_z=not cfg.separate_z),
    ]
    keys = {preprocessing_key(plans, c) for c in changed}
    assert key not in keys and len(keys) == len(changed)
    assert preprocessing_key(dataclasses.replace(plans, transpose_forward=(1, 0, 2)), cfg) != key


def test_sparse_label_values_are_cached_as_training_indices(write_nnunet_dataset, tmp_path):
    ds = write_nnunet_dataset(tmp_path / "Dataset031_Sparse", n_cases=2, n_test=0, label_values=(1, 200))
    assert ds.labels == {"background": 0, "outer": 1, "inner": 200}
    spec = load_dataset_spec(ds.root)
    plans = plan_dataset(compute_fingerprint(spec, jobs=1), device=CPU, time_budget_s=1200,
                         configurations=["3d_fullres"])
    assert plans.label_values == (0, 1, 200) and plans.num_classes == 3
    preprocess_dataset(spec, plans, tmp_path / "pre", jobs=1)
    folder = tmp_path / "pre" / plans.configuration("3d_fullres").data_identifier
    for case in spec.cases:
        raw, _ = read_label(case.label)
        assert set(np.unique(raw).tolist()) == {0, 1, 200}
        seg = np.load(folder / f"{case.case_id}_seg.npy")
        assert seg.dtype == np.int8 and set(np.unique(seg).tolist()) == {0, 1, 2}
        with np.load(folder / f"{case.case_id}_locs.npz", allow_pickle=False) as locs:
            assert sorted(locs.files) == ["class_1", "class_2"]  # keyed by training index, as the sampler reads
            assert np.all(seg[0][tuple(locs["class_2"].T)] == 2) and len(locs["class_2"]) > 0
        np.testing.assert_array_equal(np.unique(plans.to_values(seg)), [0, 1, 200])


def test_class_locations_subsamples_deterministically():
    seg = np.zeros((30, 30, 30), dtype=np.int8)
    seg[:, :, :15] = 1
    seg[0, 0, 20] = 2
    a = class_locations(seg, labels=[0, 1, 2, 3], seed=7)
    b = class_locations(seg, labels=[0, 1, 2, 3], seed=7)
    assert sorted(a) == ["class_1", "class_2", "class_3"]
    assert a["class_1"].shape == (MAX_LOCATIONS_PER_CLASS, 3)
    np.testing.assert_array_equal(a["class_1"], b["class_1"])
    assert a["class_2"].tolist() == [[0, 0, 20]] and a["class_3"].shape == (0, 3)


def test_preprocess_2d_png(png_rgb, tmp_path):
    spec = load_dataset_spec(png_rgb.root)
    fp = compute_fingerprint(spec, jobs=1)
    plans = plan_dataset(fp, device=CPU, time_budget_s=600)
    assert list(plans.configurations) == ["2d"]
    done = preprocess_dataset(spec, plans, tmp_path / "pre", jobs=1)
    folder = tmp_path / "pre" / plans.configuration("2d").data_identifier
    assert sum(done.values()) == len(spec.cases)
    data = np.load(folder / "img_000.npy")
    assert data.shape[:2] == (3, 1) and 0.0 <= data.min() and data.max() <= 1.0  # rgb_to_01
