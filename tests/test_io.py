"""Tests for automedseg.io: dataset discovery, image reading, geometry round trips, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from automedseg.io import (
    CaseFiles,
    DatasetError,
    Geometry,
    atomic_save_npy,
    atomic_save_npz,
    atomic_write_json,
    atomic_write_text,
    discover_images,
    file_ending,
    load_dataset_spec,
    read_image_file,
    read_images,
    read_label,
    write_array,
    write_segmentation,
)

# ----------------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------------


def test_nnunet_discovery(nnunet_3d):
    spec = load_dataset_spec(nnunet_3d.root)
    assert spec.layout == "nnunet"
    assert spec.name == nnunet_3d.root.name
    assert spec.channel_names == ("T2",)
    assert spec.labels == {"background": 0, "outer": 1, "inner": 2}
    assert spec.file_ending == ".nii.gz"
    assert not spec.is_2d
    assert [c.case_id for c in spec.cases] == nnunet_3d.case_ids
    for case in spec.cases:
        assert case.images == (nnunet_3d.root / "imagesTr" / f"{case.case_id}_0000.nii.gz",)
        assert case.label == nnunet_3d.root / "labelsTr" / f"{case.case_id}.nii.gz"
        assert all(p.is_file() for p in case.images) and case.label.is_file()
    assert [c.case_id for c in spec.test_cases] == nnunet_3d.test_ids
    assert all(c.label is None for c in spec.test_cases)
    assert spec.notes == ()


def test_nnunet_discovery_two_channels(nnunet_2ch):
    spec = load_dataset_spec(nnunet_2ch.root)
    assert spec.channel_names == ("T1", "T2")
    for case in spec.cases:
        assert [p.name for p in case.images] == [f"{case.case_id}_0000.nii.gz", f"{case.case_id}_0001.nii.gz"]


def test_nnunet_discovery_ignores_hidden_temp_files(nnunet_3d):
    images = nnunet_3d.root / "imagesTr"
    (images / ".tmp-123-abc-case_000_0000.nii.gz").write_bytes(b"half written")
    (images / "notes_about.nii.gz").write_bytes(b"no channel suffix")
    spec = load_dataset_spec(nnunet_3d.root)
    assert [c.case_id for c in spec.cases] == nnunet_3d.case_ids


def test_numtraining_mismatch_is_noted(nnunet_3d):
    meta = json.loads((nnunet_3d.root / "dataset.json").read_text())
    meta["numTraining"] = 7
    (nnunet_3d.root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset_spec(nnunet_3d.root)
    assert len(spec.notes) == 1 and "numTraining is 7" in spec.notes[0]


def test_msd_discovery(msd_4d):
    spec = load_dataset_spec(msd_4d.root)
    assert spec.layout == "msd"
    assert spec.name == "Multi"
    assert spec.channel_names == ("FLAIR", "T1w")
    assert spec.labels == {"background": 0, "outer": 1, "inner": 2}
    assert [c.case_id for c in spec.cases] == msd_4d.case_ids
    for case in spec.cases:
        assert len(case.images) == 1 and case.images[0].is_file()
        assert case.label is not None and case.label.is_file()
    assert [c.case_id for c in spec.test_cases] == ["multi_010"]
    assert spec.test_cases[0].images[0].is_file()


def test_msd_discovery_falls_back_to_imagests_folder(msd_4d):
    meta = json.loads((msd_4d.root / "dataset.json").read_text())
    del meta["test"]
    (msd_4d.root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset_spec(msd_4d.root)
    assert [c.case_id for c in spec.test_cases] == ["multi_010"]


def test_png_discovery(png_gray, png_rgb):
    gray = load_dataset_spec(png_gray.root)
    assert gray.is_2d and gray.file_ending == ".png" and gray.channel_names == ("gray",)
    rgb = load_dataset_spec(png_rgb.root)
    assert rgb.channel_names == ("R", "G", "B")
    # nnU-Net's natural-image convention: one RGB file per case holds all three channels.
    for case in rgb.cases:
        assert case.images == (png_rgb.root / "imagesTr" / f"{case.case_id}_0000.png",)
    assert [c.case_id for c in rgb.test_cases] == png_rgb.test_ids


@pytest.mark.parametrize("layout", ["nnunet", "msd"])
def test_missing_dataset_json_and_folder(tmp_path, layout):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_spec(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        load_dataset_spec(tmp_path / "empty")


def test_channel_names_may_be_a_list(nnunet_2ch):
    meta = json.loads((nnunet_2ch.root / "dataset.json").read_text())
    meta["channel_names"] = ["T1", "T2"]
    (nnunet_2ch.root / "dataset.json").write_text(json.dumps(meta))
    assert load_dataset_spec(nnunet_2ch.root).channel_names == ("T1", "T2")


def test_dataset_json_lists_every_problem(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "2": "T2"},  # not consecutive
        "labels": {"background": 0, "tumour": [1, 2]},  # region-based labels
        "file_ending": "nii.gz",  # no dot
    }))  # numTraining missing
    with pytest.raises(DatasetError) as err:
        load_dataset_spec(root)
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 4
    for needle in ("numTraining", "consecutive", "tumour", "file_ending"):
        assert needle in text


# ----------------------------------------------------------------------------------------------------
# reading images
# ----------------------------------------------------------------------------------------------------


def test_read_3d(nnunet_3d):
    path = nnunet_3d.root / "imagesTr" / f"{nnunet_3d.case_ids[0]}_0000.nii.gz"
    arr, geom = read_image_file(path)
    assert arr.shape == (1, *nnunet_3d.shape_zyx)
    assert geom.ndim == 3 and geom.n_components == 1
    assert geom.shape_zyx == nnunet_3d.shape_zyx
    assert geom.spacing_zyx == pytest.approx(nnunet_3d.spacing_zyx)
    assert geom.size == tuple(reversed(nnunet_3d.shape_zyx))


def test_read_4d_msd(msd_4d):
    spec = load_dataset_spec(msd_4d.root)
    arr, geom = read_image_file(spec.cases[0].images[0])
    assert arr.shape == (2, *msd_4d.shape_zyx)
    assert geom.ndim == 3 and geom.n_components == 2 and len(geom.direction) == 9
    assert geom.spacing_zyx == pytest.approx(msd_4d.spacing_zyx)
    np.testing.assert_allclose(arr[1], 2.0 * arr[0] + 1.0, rtol=1e-6)
    image, _ = read_images(spec.cases[0], n_channels=2)
    assert image.dtype == np.float32 and image.shape == (2, *msd_4d.shape_zyx)


def test_read_float_stored_integral_label(msd_4d):
    spec = load_dataset_spec(msd_4d.root)
    raw, _ = read_image_file(spec.cases[0].label)
    assert raw.dtype == np.float32
    label, geom = read_label(spec.cases[0].label)
    assert np.issubdtype(label.dtype, np.integer) and label.shape == msd_4d.shape_zyx
    assert set(np.unique(label).tolist()) == {0, 1, 2}


def test_read_label_rejects_fractions(tmp_path, write_volume):
    path = write_volume(tmp_path / "lab.nii.gz", np.full((2, 3, 4), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match="non-integral"):
        read_label(path)


def test_read_2d_gray_and_rgb(png_gray, png_rgb):
    arr, geom = read_image_file(png_gray.root / "imagesTr" / "img_000_0000.png")
    assert arr.shape == (1, 1, 20, 24)
    assert geom.ndim == 2 and geom.shape_zyx == (1, 20, 24) and geom.spacing_zyx == (999.0, 1.0, 1.0)
    arr, geom = read_image_file(png_rgb.root / "imagesTr" / "img_000_0000.png")
    assert arr.shape == (3, 1, 20, 24)
    assert geom.n_components == 3 and geom.shape_zyx == (1, 20, 24)
    np.testing.assert_array_equal(arr[2].astype(int), 255 - arr[0].astype(int))
    spec = load_dataset_spec(png_rgb.root)
    image, _ = read_images(spec.cases[0], n_channels=3)
    assert image.shape == (3, 1, 20, 24) and image.dtype == np.float32


def test_read_2d_spacing_hint(png_gray):
    _, geom = read_image_file(png_gray.root / "imagesTr" / "img_000_0000.png", spacing_2d_mm=(0.5, 0.25))
    assert geom.spacing_zyx == (999.0, 0.5, 0.25)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        read_image_file(tmp_path / "missing.nii.gz")
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"\x00\x01 definitely not an image" * 10)
    with pytest.raises(OSError, match="garbage.nii.gz"):
        read_image_file(bad)


@pytest.mark.parametrize("name,ending", [("a.nii.gz", ".nii.gz"), ("A.NII.GZ", ".nii.gz"), ("b.nrrd", ".nrrd"),
                                         ("c_0000.png", ".png"), ("d.tiff", ".tiff"), ("e.txt", ".txt")])
def test_file_ending(name, ending):
    assert file_ending(name) == ending


# ----------------------------------------------------------------------------------------------------
# geometry round trips
# ----------------------------------------------------------------------------------------------------


def test_geometry_roundtrip_oblique_anisotropic(nnunet_3d, tmp_path):
    cid = nnunet_3d.oblique_ids[0]
    image_path = nnunet_3d.root / "imagesTr" / f"{cid}_0000.nii.gz"
    _, geom = read_image_file(image_path)
    assert not np.allclose(geom.direction, np.eye(3).ravel())  # the fixture really is oblique
    seg = np.zeros(geom.shape_zyx, dtype=np.int64)
    seg[2:5, 3:9, 4:12] = 2
    seg[0, 0, 0] = 1
    out = tmp_path / "pred" / f"{cid}.nii.gz"
    write_segmentation(seg, geom, out)
    back, geom_back = read_image_file(out)
    assert geom.matches(geom_back) == []
    assert geom_back.spacing == pytest.approx(geom.spacing) and geom_back.origin == pytest.approx(geom.origin)
    assert geom_back.direction == pytest.approx(geom.direction)
    np.testing.assert_array_equal(back[0], seg)
    # The written file agrees with the image in SimpleITK's own terms (what a viewer would use).
    ref, written = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(out))
    assert np.allclose(ref.GetDirection(), written.GetDirection(), atol=1e-6)
    assert np.allclose(ref.TransformIndexToPhysicalPoint((3, 4, 5)), written.TransformIndexToPhysicalPoint((3, 4, 5)),
                       atol=1e-4)


def test_geometry_roundtrip_msd_4d_to_3d(msd_4d, tmp_path):
    spec = load_dataset_spec(msd_4d.root)
    _, geom = read_image_file(spec.cases[0].images[0])
    seg = np.ones(geom.shape_zyx, dtype=np.uint8)
    write_segmentation(seg, geom, tmp_path / "x.nii.gz")
    back, geom_back = read_image_file(tmp_path / "x.nii.gz")
    assert back.shape == (1, *msd_4d.shape_zyx) and geom.matches(geom_back) == []


@pytest.mark.parametrize("seg_shape", [(1, 20, 24), (20, 24)])
def test_geometry_roundtrip_png(png_gray, tmp_path, seg_shape):
    _, geom = read_image_file(png_gray.root / "imagesTr" / "img_001_0000.png")
    seg = np.zeros(seg_shape, dtype=np.int32)
    seg[..., 3:7, 2:9] = 1
    out = tmp_path / "img_001.png"
    write_segmentation(seg, geom, out)
    back, geom_back = read_image_file(out)
    assert back.shape == (1, 1, 20, 24)
    assert geom.matches(geom_back) == []
    np.testing.assert_array_equal(back[0, 0], seg.reshape(20, 24))


def test_write_segmentation_uses_uint16_for_many_labels(nnunet_3d, tmp_path):
    _, geom = read_image_file(nnunet_3d.root / "labelsTr" / f"{nnunet_3d.case_ids[0]}.nii.gz")
    seg = np.zeros(geom.shape_zyx, dtype=np.int64)
    seg[0, 0, :3] = [255, 256, 300]
    write_segmentation(seg, geom, tmp_path / "big.nii.gz")
    back, _ = read_image_file(tmp_path / "big.nii.gz")
    assert back[0, 0, 0, :3].tolist() == [255, 256, 300]


@pytest.mark.parametrize("values, dtype", [((0, 1, 127), np.int8), ((0, 1, 200), np.int16),
                                           ((0, 5, 40000), np.int32), ((0, 70000), np.int32)])
def test_label_values_survive_write_and_read(nnunet_3d, tmp_path, values, dtype):
    """Large label values are neither wrapped when written nor when read (40000 does not fit int16)."""
    _, geom = read_image_file(nnunet_3d.root / "labelsTr" / f"{nnunet_3d.case_ids[0]}.nii.gz")
    seg = np.zeros(geom.shape_zyx, dtype=np.int64)
    seg[0, 0, :len(values)] = values
    write_segmentation(seg, geom, tmp_path / "lab.nii.gz")
    back, _ = read_label(tmp_path / "lab.nii.gz")
    assert back.dtype == dtype and back[0, 0, :len(values)].tolist() == list(values)


@pytest.mark.parametrize("labels, layout", [({"background": 0, "ignore": -1}, "nnunet"),
                                            ({"0": "background", "-1": "ignore"}, "msd")])
def test_negative_label_values_are_rejected(nnunet_3d, labels, layout):
    meta = json.loads((nnunet_3d.root / "dataset.json").read_text())
    meta["labels"] = labels
    if layout == "msd":
        meta = {"modality": {"0": "T2"}, "labels": labels, "training": []}
    (nnunet_3d.root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="negative values"):
        load_dataset_spec(nnunet_3d.root)


def test_write_array_rejects_wrong_shape(nnunet_3d, tmp_path):
    _, geom = read_image_file(nnunet_3d.root / "labelsTr" / f"{nnunet_3d.case_ids[0]}.nii.gz")
    with pytest.raises(ValueError, match="does not match"):
        write_array(np.zeros((3, 3, 3)), geom, tmp_path / "out" / "x.nii.gz")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("geom", [
    Geometry((4, 5, 6), (0.8, 0.8, 3.0), (1.0, -2.0, 3.5), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
    Geometry((4, 5), (0.5, 0.25), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), n_components=3),
])
def test_geometry_dict_roundtrip(geom):
    d = json.loads(json.dumps(geom.to_dict()))
    assert Geometry.from_dict(d) == geom


@pytest.mark.parametrize("field,value,needle", [
    ("size", (4, 5, 7), "size"),
    ("spacing", (0.8, 0.8, 3.1), "spacing"),
    ("origin", (1.0, -2.0, 4.0), "origin"),
    ("direction", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), "direction"),
])
def test_geometry_matches(field, value, needle):
    a = Geometry((4, 5, 6), (0.8, 0.8, 3.0), (1.0, -2.0, 3.5), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    b = Geometry(**{**a.__dict__, field: value})
    diff = a.matches(b)
    assert len(diff) == 1 and diff[0].startswith(needle)
    tiny = Geometry(**{**a.__dict__, "origin": (1.001, -2.0, 3.5)})
    assert a.matches(tiny) == []


# ----------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------


def test_atomic_writes_leave_no_temp_files(tmp_path, nnunet_3d):
    out = tmp_path / "out"
    atomic_write_text(out / "a.txt", "hello")
    atomic_write_json(out / "b.json", {"x": [1, 2]})
    atomic_save_npy(out / "c.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    atomic_save_npz(out / "d.npz", class_1=np.zeros((2, 3), dtype=np.int64))
    atomic_save_npz(out / "e.npz", compressed=True, a=np.ones(3))
    _, geom = read_image_file(nnunet_3d.root / "labelsTr" / f"{nnunet_3d.case_ids[0]}.nii.gz")
    write_segmentation(np.zeros(geom.shape_zyx, dtype=np.uint8), geom, out / "f.nii.gz")
    atomic_write_text(out / "a.txt", "replaced")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.json", "c.npy", "d.npz", "e.npz", "f.nii.gz"]
    assert (out / "a.txt").read_text() == "replaced"
    assert json.loads((out / "b.json").read_text()) == {"x": [1, 2]}
    assert np.load(out / "c.npy", mmap_mode="r").shape == (2, 3)
    with np.load(out / "d.npz", allow_pickle=False) as z:
        assert z["class_1"].dtype == np.int64


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.npy"
    atomic_save_npy(path, np.zeros(3))
    with pytest.raises(ValueError):
        atomic_save_npy(path, np.array([object()], dtype=object))  # pickle refused mid-write
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
    np.testing.assert_array_equal(np.load(path), np.zeros(3))


# ----------------------------------------------------------------------------------------------------
# discover_images (prediction input folders)
# ----------------------------------------------------------------------------------------------------


def test_discover_images_nnunet(nnunet_2ch):
    folder = nnunet_2ch.root / "imagesTr"
    cases = discover_images(folder, n_channels=2)
    assert [c.case_id for c in cases] == nnunet_2ch.case_ids
    assert all(len(c.images) == 2 and c.label is None for c in cases)


def test_discover_images_msd(msd_4d):
    cases = discover_images(msd_4d.root / "imagesTr", n_channels=2)
    assert [c.case_id for c in cases] == msd_4d.case_ids
    assert all(len(c.images) == 1 for c in cases)


def test_discover_images_rgb_png(png_rgb):
    cases = discover_images(png_rgb.root / "imagesTs", n_channels=3)
    (tid,) = png_rgb.test_ids
    assert cases == [CaseFiles(tid, (png_rgb.root / "imagesTs" / f"{tid}_0000.png",))]


def test_discover_images_skips_hidden_and_other_files(nnunet_3d):
    folder = nnunet_3d.root / "imagesTr"
    (folder / ".tmp-1-x-case_000_0000.nii.gz").write_bytes(b"")
    (folder / "readme.txt").write_text("hi")
    cases = discover_images(folder, n_channels=1)
    assert [c.case_id for c in cases] == nnunet_3d.case_ids


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_discover_images_errors(tmp_path, setup):
    folder = tmp_path / "in"
    if setup == "empty":
        folder.mkdir()
    with pytest.raises(DatasetError):
        discover_images(folder, n_channels=1)


def test_read_images_checks_channel_count(nnunet_3d):
    spec = load_dataset_spec(nnunet_3d.root)
    with pytest.raises(ValueError, match="declares 2"):
        read_images(spec.cases[0], n_channels=2)


def test_read_images_checks_channel_geometry(nnunet_2ch, write_volume):
    spec = load_dataset_spec(nnunet_2ch.root)
    case = spec.cases[0]
    write_volume(case.images[1], np.ones(nnunet_2ch.shape_zyx, dtype=np.float32), spacing_zyx=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=case.images[1].name):
        read_images(case, n_channels=2)


def test_case_files_paths_are_paths(nnunet_3d):
    spec = load_dataset_spec(nnunet_3d.root)
    assert all(isinstance(p, Path) for c in spec.cases for p in c.images)
