"""Tests for automedseg.metrics: cross-checks against SimpleITK, empty-mask conventions, folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from automedseg import metrics as M
from automedseg.atomic import jsonable
from automedseg.errors import InputError

SPACING_3D = (3.0, 0.7, 0.9)  # (z, y, x)
SPACING_2D = (0.7, 0.9)  # (y, x)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _blob(shape: tuple[int, ...], rng: np.random.Generator, *, fraction: float = 0.2) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return field > np.quantile(field, 1.0 - fraction)


def _pair(kind: str, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = _blob(shape, rng)
    if kind == "independent":
        pred = _blob(shape, rng)
    elif kind == "perturbed":  # dilated, with salt noise: close masks, some far outliers
        pred = ndimage.binary_dilation(ref) ^ (rng.random(shape) < 0.02)
    elif kind == "shifted":
        pred = np.roll(ref, shift=2, axis=-1)
    elif kind == "eroded":
        pred = ndimage.binary_erosion(ref)
        pred = pred if pred.any() else ref
    else:
        raise ValueError(kind)
    return ref, pred


def _image(mask: np.ndarray, spacing_mm: tuple[float, ...]) -> sitk.Image:
    """SimpleITK image of a mask zero-padded by one voxel (outside the image = background, as in M)."""
    image = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing_mm)))  # SimpleITK wants (x, y, z)
    return image


def _sitk_surface_distances(
    ref: np.ndarray, pred: np.ndarray, spacing_mm: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation: LabelContour surfaces + SignedMaurerDistanceMap of those surfaces."""
    contours, maps = [], []
    for mask in (ref, pred):
        contour = sitk.LabelContour(_image(mask, spacing_mm), fullyConnected=False, backgroundValue=0)
        distance = sitk.SignedMaurerDistanceMap(
            contour, squaredDistance=False, useImageSpacing=True, insideIsPositive=False
        )
        contours.append(sitk.GetArrayFromImage(contour) > 0)
        maps.append(np.abs(sitk.GetArrayFromImage(distance)).astype(np.float64))
    return maps[1][contours[0]], maps[0][contours[1]]


PAIRS_3D = [(kind, seed) for kind in ("independent", "perturbed", "shifted", "eroded") for seed in (0, 1)]


# ----------------------------------------------------------------------------------------------------
# cross-checks against SimpleITK
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "spacing"), [((10, 24, 22), SPACING_3D), ((40, 36), SPACING_2D)])
@pytest.mark.parametrize(("kind", "seed"), PAIRS_3D)
def test_matches_simpleitk(kind: str, seed: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    ref, pred = _pair(kind, shape, seed)
    assert ref.any() and pred.any()
    result = M.compute_binary_metrics(ref, pred, spacing_mm=spacing, tolerance_mm=1.0)
    assert tuple(result) == M.METRIC_NAMES

    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(_image(pred, spacing), _image(ref, spacing))  # (source, target)
    assert result["dice"] == pytest.approx(overlap.GetDiceCoefficient(), abs=1e-9)
    assert result["iou"] == pytest.approx(overlap.GetJaccardCoefficient(), abs=1e-9)
    assert result["recall"] == pytest.approx(1.0 - overlap.GetFalseNegativeError(), abs=1e-9)
    assert result["precision"] == pytest.approx(1.0 - overlap.GetFalseDiscoveryRate(), abs=1e-9)

    hausdorff = sitk.HausdorffDistanceImageFilter()
    hausdorff.Execute(_image(ref, spacing), _image(pred, spacing))
    assert result["hd"] == pytest.approx(hausdorff.GetHausdorffDistance(), rel=1e-5)

    ref_to_pred, pred_to_ref = _sitk_surface_distances(ref, pred, spacing)
    pooled = np.concatenate([ref_to_pred, pred_to_ref])
    assert result["hd"] == pytest.approx(pooled.max(), rel=1e-5)
    assert result["hd95"] == pytest.approx(np.percentile(pooled, 95), rel=1e-5)
    assert result["assd"] == pytest.approx(pooled.mean(), rel=1e-5)
    assert result["nsd"] == pytest.approx(np.mean(pooled <= 1.0 + 1e-4), abs=1e-9)

    mine = M.surface_distances(ref, pred, spacing_mm=spacing)
    np.testing.assert_allclose(np.sort(mine[0]), np.sort(ref_to_pred), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sort(mine[1]), np.sort(pred_to_ref), rtol=1e-5, atol=1e-5)

    shape_stats = sitk.LabelShapeStatisticsImageFilter()
    shape_stats.Execute(_image(ref, spacing))
    v_ref = shape_stats.GetPhysicalSize(1)
    shape_stats.Execute(_image(pred, spacing))
    v_pred = shape_stats.GetPhysicalSize(1)
    assert result["volume_ref_mm3"] == pytest.approx(v_ref)
    assert result["volume_pred_mm3"] == pytest.approx(v_pred)
    assert result["volume_diff_mm3"] == pytest.approx(v_pred - v_ref)
    assert result["volume_diff_rel"] == pytest.approx((v_pred - v_ref) / v_ref)


def test_surface_is_face_connected_labelcontour_with_zero_outside() -> None:
    """Masks touching the image edge: distances equal SimpleITK's on the zero-padded image."""
    rng = np.random.default_rng(5)
    ref = _blob((8, 20, 20), rng, fraction=0.6)  # large blobs, touching the image edges
    pred = _blob((8, 20, 20), rng, fraction=0.6)
    mine = M.surface_distances(ref, pred, spacing_mm=SPACING_3D)
    expected = _sitk_surface_distances(ref, pred, SPACING_3D)
    for a, b in zip(mine, expected, strict=True):
        np.testing.assert_allclose(np.sort(a), np.sort(b), rtol=1e-5, atol=1e-5)


def test_single_functions_agree_with_compute_binary_metrics() -> None:
    ref, pred = _pair("perturbed", (10, 24, 22), 3)
    full = M.compute_binary_metrics(ref, pred, spacing_mm=SPACING_3D, tolerance_mm=2.0)
    assert M.dice(ref, pred) == full["dice"]
    assert M.iou(ref, pred) == full["iou"]
    assert M.precision(ref, pred) == full["precision"]
    assert M.recall(ref, pred) == full["recall"]
    assert M.hd95(ref, pred, spacing_mm=SPACING_3D) == full["hd95"]
    assert M.hausdorff(ref, pred, spacing_mm=SPACING_3D) == full["hd"]
    assert M.assd(ref, pred, spacing_mm=SPACING_3D) == full["assd"]
    assert M.nsd(ref, pred, spacing_mm=SPACING_3D, tolerance_mm=2.0) == full["nsd"]
    assert M.volume_difference(ref, pred, spacing_mm=SPACING_3D) == (
        full["volume_diff_mm3"],
        full["volume_diff_rel"],
    )


# ----------------------------------------------------------------------------------------------------
# analytic cases
# ----------------------------------------------------------------------------------------------------


def _cube() -> np.ndarray:
    mask = np.zeros((12, 14, 16), bool)
    mask[3:9, 4:10, 5:11] = True
    return mask


@pytest.mark.parametrize(("axis", "shift"), [(0, 1), (1, 1), (2, 1), (2, 2), (0, 2)])
def test_shifted_cube_distances(axis: int, shift: int) -> None:
    ref = _cube()
    pred = np.roll(ref, shift, axis=axis)
    result = M.compute_binary_metrics(ref, pred, spacing_mm=SPACING_3D, tolerance_mm=0.0)
    step = SPACING_3D[axis] * shift
    assert result["hd"] == pytest.approx(step)
    assert result["hd95"] == pytest.approx(step)
    assert 0.0 < result["assd"] < step
    assert 0.0 < result["nsd"] < 1.0
    # every surface voxel has its translated copy exactly `step` away
    assert M.nsd(ref, pred, spacing_mm=SPACING_3D, tolerance_mm=step) == 1.0
    assert result["volume_diff_mm3"] == 0.0


def test_identical_masks() -> None:
    ref = _cube()
    result = M.compute_binary_metrics(ref, ref, spacing_mm=SPACING_3D)
    expected = {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0, "hd": 0.0}
    expected |= {"assd": 0.0, "nsd": 1.0, "volume_diff_mm3": 0.0, "volume_diff_rel": 0.0}
    for name, value in expected.items():
        assert result[name] == value, name
    assert result["volume_ref_mm3"] == pytest.approx(6 * 6 * 6 * 3.0 * 0.7 * 0.9)


def test_2d_slice_stored_as_3d_equals_2d() -> None:
    ref, pred = _pair("independent", (40, 36), 2)
    flat = M.compute_binary_metrics(ref, pred, spacing_mm=SPACING_2D)
    stacked = M.compute_binary_metrics(ref[None], pred[None], spacing_mm=(5.0, *SPACING_2D))
    with_z = M.compute_binary_metrics(ref, pred, spacing_mm=(5.0, *SPACING_2D))  # 3-tuple for 2D
    for name in M.METRIC_NAMES:
        if name.startswith("volume"):
            assert stacked[name] == pytest.approx(flat[name] * 5.0), name
        else:
            assert stacked[name] == pytest.approx(flat[name]), name
        assert with_z[name] == flat[name], name


# ----------------------------------------------------------------------------------------------------
# empty masks
# ----------------------------------------------------------------------------------------------------

NAN = math.nan
EMPTY_TABLE = [
    # case, reference empty, prediction empty, expected
    (
        "both_empty",
        True,
        True,
        dict(dice=1, iou=1, precision=1, recall=1, nsd=1, hd=0, hd95=0, assd=0, volume_diff_rel=0),
    ),
    (
        "reference_empty",
        True,
        False,
        dict(dice=0, iou=0, precision=0, recall=0, nsd=0, hd=NAN, hd95=NAN, assd=NAN, volume_diff_rel=NAN),
    ),
    (
        "prediction_empty",
        False,
        True,
        dict(dice=0, iou=0, precision=0, recall=0, nsd=0, hd=NAN, hd95=NAN, assd=NAN, volume_diff_rel=-1),
    ),
]


@pytest.mark.parametrize("shape", [(6, 10, 10), (10, 10)])
@pytest.mark.parametrize(("case", "ref_empty", "pred_empty", "expected"), EMPTY_TABLE)
def test_empty_conventions(
    case: str, ref_empty: bool, pred_empty: bool, expected: dict[str, float], shape: tuple[int, ...]
) -> None:
    full = np.zeros(shape, bool)
    full[(slice(2, 5),) * len(shape)] = True
    empty = np.zeros(shape, bool)
    ref = empty if ref_empty else full
    pred = empty if pred_empty else full
    spacing = SPACING_3D[-len(shape) :]
    result = M.compute_binary_metrics(ref, pred, spacing_mm=spacing)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(result[name]), (case, name)
        else:
            assert result[name] == value, (case, name)
    assert result["volume_diff_mm3"] == pytest.approx((pred.sum() - ref.sum()) * float(np.prod(spacing)))


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref_shape", "pred_shape", "spacing", "match"),
    [
        ((4, 5, 6), (4, 5, 7), SPACING_3D, "shape"),
        ((4, 5, 6), (4, 5, 6), (1.0, 1.0), "entries"),
        ((4, 5, 6), (4, 5, 6), (1.0, 0.0, 1.0), "positive"),
        ((5,), (5,), (1.0,), "2D or 3D"),
    ],
)
def test_invalid_inputs(
    ref_shape: tuple[int, ...], pred_shape: tuple[int, ...], spacing: tuple[float, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        M.compute_binary_metrics(np.ones(ref_shape, bool), np.ones(pred_shape, bool), spacing_mm=spacing)


# ----------------------------------------------------------------------------------------------------
# multi-label cases and summaries
# ----------------------------------------------------------------------------------------------------


def _label_map(seed: int, shape: tuple[int, ...] = (8, 20, 20)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.int16)
    seg[_blob(shape, rng, fraction=0.3)] = 1
    seg[_blob(shape, rng, fraction=0.1)] = 2
    return seg


def test_compute_case_metrics_is_one_vs_rest() -> None:
    ref, pred = _label_map(0), _label_map(1)
    result = M.compute_case_metrics(ref, pred, labels=[1, 2, 3], spacing_mm=SPACING_3D, tolerance_mm=2.0)
    assert list(result) == [1, 2, 3]
    for label in (1, 2):
        expected = M.compute_binary_metrics(
            ref == label, pred == label, spacing_mm=SPACING_3D, tolerance_mm=2.0
        )
        assert result[label] == expected
    assert result[3]["dice"] == 1.0 and result[3]["hd95"] == 0.0  # absent in both
    channel_first = M.compute_case_metrics(ref[None], pred[None], labels=[1], spacing_mm=SPACING_3D)
    assert channel_first[1]["dice"] == result[1]["dice"]


def test_summarize_ignores_nan_and_averages_foreground() -> None:
    per_case = [
        {0: {"dice": 0.9, "hd95": 1.0}, 1: {"dice": 0.5, "hd95": NAN}, 2: {"dice": 1.0, "hd95": 2.0}},
        {"0": {"dice": 0.7, "hd95": 3.0}, "1": {"dice": 0.0, "hd95": None}, "2": {"dice": 0.0, "hd95": 4.0}},
    ]
    summary = M.summarize(per_case)
    assert summary["n_cases"] == 2
    assert summary["per_label"][0]["dice"] == pytest.approx(0.8)
    assert summary["per_label"][1]["dice"] == pytest.approx(0.25)
    assert math.isnan(summary["per_label"][1]["hd95"])
    assert summary["n_valid"][1] == {"dice": 2, "hd95": 0}
    assert summary["per_label"][2]["hd95"] == pytest.approx(3.0)
    assert summary["foreground_mean"]["dice"] == pytest.approx((0.25 + 0.5) / 2)  # label 0 excluded
    assert summary["foreground_mean"]["hd95"] == pytest.approx(3.0)  # NaN label mean skipped


def test_summarize_empty() -> None:
    assert M.summarize([]) == {"n_cases": 0, "per_label": {}, "n_valid": {}, "foreground_mean": {}}


# ----------------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------------


def _write(path: Path, array: np.ndarray, spacing_mm: tuple[float, ...]) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing_mm)))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for i, name in enumerate(["case_a.nii.gz", "case_b.nii.gz", "case_c.mha"]):
        _write(ref_dir / name, _label_map(2 * i), SPACING_3D)
        if name != "case_b.nii.gz":
            _write(pred_dir / name, _label_map(2 * i + 1), SPACING_3D)
    _write(pred_dir / "unreferenced.nii.gz", _label_map(9), SPACING_3D)
    (ref_dir / "notes.txt").write_text("ignored")
    return ref_dir, pred_dir


def test_evaluate_folders(folders: tuple[Path, Path]) -> None:
    ref_dir, pred_dir = folders
    result = M.evaluate_folders(ref_dir, pred_dir, labels=None, tolerance_mm=1.5, output_dir=None)
    assert result["labels"] == [1, 2]
    assert result["missing_predictions"] == ["case_b.nii.gz"]
    assert [r["case"] for r in result["per_case"]] == ["case_a", "case_c"]

    expected = M.compute_case_metrics(
        _label_map(0), _label_map(1), labels=[1, 2], spacing_mm=SPACING_3D, tolerance_mm=1.5
    )
    for label in (1, 2):
        for name, value in expected[label].items():
            assert result["per_case"][0]["metrics"][label][name] == pytest.approx(value, rel=1e-5), name

    summary = M.read_metrics_summary(pred_dir / M.METRICS_SUMMARY_FILE)
    assert summary.missing_predictions == ("case_b.nii.gz",)
    assert summary.n_cases == 2 and summary.tolerance_mm == 1.5 and summary.labels == (1, 2)
    assert summary.metric_per_label("dice")["1"] == pytest.approx(result["per_label"][1]["dice"])
    assert summary.n_valid["2"]["dice"] == 2
    # the file keeps the format of the summary dictionary (keys in order, NaN as null)
    text = (pred_dir / M.METRICS_SUMMARY_FILE).read_text()
    summary_only = {k: v for k, v in result.items() if k != "per_case"}
    assert text == json.dumps(jsonable(summary_only), indent=2, allow_nan=False) + "\n"

    per_case = json.loads((pred_dir / "metrics_per_case.json").read_text())
    assert [r["file"] for r in per_case] == ["case_a.nii.gz", "case_c.mha"]

    with (pred_dir / "metrics_per_case.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert set(rows[0]) == {"case", "file", "label", *M.METRIC_NAMES}
    assert float(rows[0]["dice"]) == pytest.approx(expected[1]["dice"])
    assert not [p for p in pred_dir.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_folders_explicit_labels_and_output_dir(folders: tuple[Path, Path], tmp_path: Path) -> None:
    ref_dir, pred_dir = folders
    out = tmp_path / "out" / "nested"
    result = M.evaluate_folders(ref_dir, pred_dir, labels=[2, 5], output_dir=out)
    assert result["labels"] == [2, 5]
    assert result["per_label"][5]["dice"] == 1.0  # label absent everywhere: both empty
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_per_case.csv",
        "metrics_per_case.json",
        "metrics_summary.json",
    ]
    assert not (pred_dir / "metrics_summary.json").exists()


def test_evaluate_folders_2d_png(tmp_path: Path) -> None:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref, pred = _pair("shifted", (30, 28), 4)
    _write(ref_dir / "slice.png", ref, (1.0, 1.0))
    _write(pred_dir / "slice.png", pred, (1.0, 1.0))
    result = M.evaluate_folders(ref_dir, pred_dir, labels=[1], output_dir=tmp_path)
    expected = M.compute_binary_metrics(ref, pred, spacing_mm=(1.0, 1.0))
    assert result["per_case"][0]["metrics"][1] == expected


def test_evaluate_folders_shape_mismatch_names_file(tmp_path: Path) -> None:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    _write(ref_dir / "bad_case.nii.gz", np.zeros((4, 6, 6)), SPACING_3D)
    _write(pred_dir / "bad_case.nii.gz", np.zeros((4, 6, 7)), SPACING_3D)
    with pytest.raises(ValueError, match="bad_case.nii.gz"):
        M.evaluate_folders(ref_dir, pred_dir, labels=[1], output_dir=None)


def test_evaluate_folders_without_references(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        M.evaluate_folders(tmp_path, tmp_path, labels=None, output_dir=None)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"per_label": {}}), "missing field 'n_cases'"),
    (json.dumps({"n_cases": 1, "per_label": {"1": {"dice": "high"}}}), r"per_label\.1\.dice: expected a number"),
])
def test_read_metrics_summary_names_the_file_and_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / M.METRICS_SUMMARY_FILE
    path.write_text(content)
    with pytest.raises(InputError, match=f"metrics_summary.json.*{message}"):
        M.read_metrics_summary(path)
