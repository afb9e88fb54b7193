"""Tests for automedseg.fingerprint: per-case statistics on planted volumes, dataset summary, determinism, the
typed ``fingerprint.json`` (round trip, a file of the released format, errors that name the field)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from automedseg import fingerprint as F
from automedseg.fingerprint import (
    ClassStats,
    ClassSummary,
    Fingerprint,
    compute_fingerprint,
    load_fingerprint,
    modality_of,
    nonzero_bbox,
    save_fingerprint,
)
from automedseg.io import DatasetError, load_dataset_spec
from automedseg.parallel import parallel_map
from automedseg.serialize import PlanError

#: ``fingerprint.json`` of a 2-case dataset as automedseg wrote it before the fingerprint was typed (version 3;
#: the second case has no foreground, so its intensity statistics are null).
RELEASED_V3 = Path(__file__).parent / "data" / "fingerprint_v3.json"

SPACING = (2.0, 0.5, 0.75)  # (z, y, x)
SHAPE = (8, 20, 24)


def _planted(kind: int) -> tuple[np.ndarray, np.ndarray]:
    """Body box of value 10 with a zero margin; class 1 = two separate blocks of 50, class 2 = one block of 150.

    ``kind`` 1 has no class 2 and a single class-1 block.
    """
    image = np.zeros(SHAPE, dtype=np.float32)
    image[1:7, 2:18, 3:21] = 10.0  # crop box: z 1..7, y 2..18, x 3..21 -> shape (6, 16, 18)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:4, 4:8, 4:8] = 1  # 2 * 4 * 4 = 32 voxels
    if kind == 0:
        label[2:4, 12:16, 12:16] = 1  # second, separate component: 32 more
        label[5:6, 4:7, 14:19] = 2  # 1 * 3 * 5 = 15 voxels
    image[label == 1] = 50.0
    image[label == 2] = 150.0
    return image, label


@pytest.fixture
def planted(tmp_path, write_volume):
    root = tmp_path / "Dataset020_Planted"
    for i in range(2):
        image, label = _planted(i)
        write_volume(root / "imagesTr" / f"p_{i:03d}_0000.nii.gz", image, spacing_zyx=SPACING)
        write_volume(root / "labelsTr" / f"p_{i:03d}.nii.gz", label, spacing_zyx=SPACING)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Planted", "channel_names": {"0": "T1"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 2, "file_ending": ".nii.gz",
    }))
    return root


def test_planted_case_statistics(planted):
    fp = compute_fingerprint(load_dataset_spec(planted), jobs=1)
    c0, c1 = fp.cases
    assert c0.case_id == "p_000" and c1.case_id == "p_001"
    assert c0.spacing_mm == pytest.approx(SPACING)
    assert c0.shape == SHAPE
    assert c0.crop_bbox == ((1, 7), (2, 18), (3, 21))
    assert c0.shape_after_crop == (6, 16, 18)
    assert c0.foreground_voxels == 64 + 15
    counts = {k: (v.voxels, v.components) for k, v in c0.classes.items()}
    assert counts == {"1": (64, 2), "2": (15, 1)}
    one = c1.classes["1"]
    assert (one.voxels, one.components) == (32, 1) and one.size_px > 0 and len(one.centroid_rel) == 3
    assert c1.classes["2"] == ClassStats(voxels=0, components=0, centroid_rel=None, size_px=None)
    assert all(0 < v < 1 for v in c0.classes["2"].centroid_rel)
    (st,) = c0.intensity
    assert st.min == 50.0 and st.max == 150.0 and st.median == 50.0
    assert st.mean == pytest.approx((64 * 50 + 15 * 150) / 79)
    assert st.p99_5 == pytest.approx(150.0) and st.p00_5 == pytest.approx(50.0)
    (st1,) = c1.intensity
    assert st1.mean == 50.0 and st1.std == 0.0
    assert c0.geometry.size == tuple(reversed(SHAPE))


def test_planted_dataset_summary(planted):
    fp = compute_fingerprint(load_dataset_spec(planted), jobs=1)
    assert fp.fingerprint_version == F.FINGERPRINT_VERSION
    assert fp.dataset_name == "Planted" and fp.layout == "nnunet"
    assert fp.channel_names == ("T1",) and fp.modalities == ("zscore",)
    assert fp.labels == {"background": 0, "a": 1, "b": 2}
    assert fp.num_cases == 2 and fp.is_2d is False and fp.files_signature is None
    ds = fp.dataset
    assert ds.median_spacing_mm == pytest.approx(SPACING)
    assert ds.median_shape_after_crop == (6, 16, 18)
    (pooled,) = ds.intensity
    assert pooled.mean == pytest.approx((96 * 50 + 15 * 150) / 111)
    assert pooled.min == 50.0 and pooled.max == 150.0
    assert ds.classes["1"] == ClassSummary(present_in_cases=2, median_voxels=48.0, min_voxels=32.0,
                                           median_components=1.5, max_components=2.0)
    assert ds.classes["2"].present_in_cases == 1 and ds.classes["2"].min_voxels == 0.0


def test_fingerprint_is_json_and_saved(planted, tmp_path):
    fp = compute_fingerprint(load_dataset_spec(planted), jobs=1)
    path = tmp_path / "work" / "fingerprint.json"
    save_fingerprint(fp, path)
    assert json.loads(path.read_text()) == fp.to_dict()
    assert "files_signature" not in fp.to_dict()  # left out while None
    assert load_fingerprint(path) == fp


@pytest.mark.parametrize("fixture", ["planted", "png_rgb", "msd_4d", "ct_dataset"])
def test_save_load_save_is_identical(request, tmp_path, fixture):
    ds = request.getfixturevalue(fixture)
    fp = compute_fingerprint(load_dataset_spec(ds if isinstance(ds, Path) else ds.root), jobs=1)
    fp = dataclasses.replace(fp, files_signature="abc") if fixture == "planted" else fp
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    save_fingerprint(fp, first)
    loaded = load_fingerprint(first, signature=fp.files_signature)
    assert loaded == fp
    save_fingerprint(loaded, second)
    assert second.read_text() == first.read_text()


def test_released_v3_file_loads_and_saves_unchanged(tmp_path):
    fp = load_fingerprint(RELEASED_V3, signature="sig-Dataset009_Tiny")
    assert isinstance(fp, Fingerprint) and fp.files_signature == "sig-Dataset009_Tiny"
    assert fp.modalities == ("ct",) and [c.case_id for c in fp.cases] == ["t_000", "t_001"]
    assert fp.cases[1].foreground_voxels == 0 and fp.cases[1].intensity[0].mean is None
    assert fp.cases[0].classes["1"].centroid_rel == pytest.approx((0.25, 0.5, 1 / 3))
    save_fingerprint(fp, tmp_path / "fingerprint.json")
    assert (tmp_path / "fingerprint.json").read_text() == RELEASED_V3.read_text()


_DELETE = object()


def _edited(data: Any, path: tuple[str | int, ...], value: Any) -> Any:
    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


@pytest.mark.parametrize("path,value,message", [
    (("num_cases",), "two", "fingerprint.num_cases: expected an integer, got 'two'"),
    (("num_cases",), 3, "fingerprint: num_cases: 3, but 2 case(s)"),
    (("labels",), _DELETE, "fingerprint: missing field 'labels'"),
    (("fingerprint_version",), 2, "fingerprint: fingerprint_version 2 is not supported"),
    (("is_2d",), "no", "fingerprint.is_2d: expected true or false, got 'no'"),
    (("modalities",), ["ct", "ct"], "fingerprint: modalities: 2 for 1 channel(s)"),
    (("cases", 0, "spacing_mm"), [2.0, 0.5], "fingerprint.cases[0].spacing_mm: expected 3 entries, got 2"),
    (("cases", 0, "colour"), "red", "fingerprint.cases[0]: unknown field(s) ['colour']"),
    (("cases", 1, "classes", "2", "voxels"), "many", "fingerprint.cases[1].classes.2.voxels: expected an integer"),
    (("cases", 0, "geometry", "size"), "3x4", "fingerprint.cases[0].geometry.size: expected a list, got str"),
    (("cases", 0, "intensity", 0, "p99_5"), "high", "fingerprint.cases[0].intensity[0].p99_5: expected a number"),
    (("dataset", "intensity", 0, "mean"), None, "fingerprint.dataset: intensity[0]: the pooled foreground "
                                                "statistics must be numbers, got null"),
    (("dataset", "classes", "1", "present_in_cases"), 1.5, "fingerprint.dataset.classes.1.present_in_cases: "
                                                             "expected an integer, got 1.5"),
])
def test_bad_field_is_named(path, value, message):
    data = _edited(json.loads(RELEASED_V3.read_text()), path, value)
    with pytest.raises(PlanError, match=re.escape(message)):
        Fingerprint.from_dict(data)


def test_malformed_file_is_not_reused_and_says_why(tmp_path):
    path = tmp_path / "fingerprint.json"
    path.write_text(json.dumps(_edited(json.loads(RELEASED_V3.read_text()), ("cases", 0, "shape"), [2, 4])))
    problems: list[str] = []
    assert load_fingerprint(path, problems=problems) is None
    assert problems == [f"{path}.cases[0].shape: expected 3 entries, got 2"]


@pytest.mark.parametrize("fixture", ["nnunet_3d", "msd_4d", "ct_dataset", "png_rgb", "demo"])
def test_deterministic_and_jobs_independent(request, fixture, monkeypatch):
    root = request.getfixturevalue("demo_dataset") if fixture == "demo" else request.getfixturevalue(fixture).root
    monkeypatch.setattr(F, "SAMPLES_PER_CASE", 100)  # force the sampling path on these tiny volumes
    spec = load_dataset_spec(root)
    first = compute_fingerprint(spec, jobs=1)
    assert compute_fingerprint(spec, jobs=1) == first
    assert json.dumps(compute_fingerprint(spec, jobs=2).to_dict()) == json.dumps(first.to_dict())


def test_multichannel_and_2d_fingerprints(msd_4d, png_gray, png_rgb):
    fp = compute_fingerprint(load_dataset_spec(msd_4d.root), jobs=1)
    assert fp.layout == "msd" and len(fp.dataset.intensity) == 2
    # The fixture's second modality is 2 * first + 1: the statistics must follow.
    a, b = fp.dataset.intensity
    assert b.mean == pytest.approx(2 * a.mean + 1, rel=1e-5)
    gray = compute_fingerprint(load_dataset_spec(png_gray.root), jobs=1)
    assert gray.is_2d is True
    assert gray.cases[0].spacing_mm == (999.0, 1.0, 1.0) and gray.cases[0].shape == (1, 20, 24)
    assert len(gray.cases[0].geometry.size) == 2
    rgb = compute_fingerprint(load_dataset_spec(png_rgb.root), jobs=1)
    assert rgb.is_2d is True and rgb.modalities == ("rgb", "rgb", "rgb")
    assert len(rgb.cases[0].intensity) == 3


def test_ct_fingerprint_pools_foreground(ct_dataset):
    fp = compute_fingerprint(load_dataset_spec(ct_dataset.root), jobs=1)
    assert fp.modalities == ("ct",)
    (st,) = fp.dataset.intensity
    # Only foreground voxels (outer ~40 HU, inner ~300 HU) are pooled, never the -1000 HU air.
    assert 20 < st.p00_5 < 60 and 250 < st.p99_5 < 320 and st.min > -100
    # Air is nonzero, so nothing is cropped.
    assert all(c.shape_after_crop == tuple(ct_dataset.shape_zyx) for c in fp.cases)


def test_compute_fingerprint_raises_all_problems(nnunet_3d):
    (nnunet_3d.root / "labelsTr" / f"{nnunet_3d.case_ids[0]}.nii.gz").unlink()
    (nnunet_3d.root / "imagesTr" / f"{nnunet_3d.case_ids[2]}_0000.nii.gz").write_bytes(b"garbage" * 40)
    with pytest.raises(DatasetError) as err:
        compute_fingerprint(load_dataset_spec(nnunet_3d.root), jobs=1)
    assert len(err.value.problems) == 2


@pytest.mark.parametrize("name,expected", [
    ("CT", "ct"), ("ct", "ct"), (" CT ", "ct"), ("contrast CT", "ct"), ("CT arterial", "ct"),
    ("T1", "zscore"), ("T2", "zscore"), ("FLAIR", "zscore"), ("ADC", "zscore"), ("PET", "zscore"),
    ("actual", "zscore"), ("R", "rgb"), ("g", "rgb"), ("Blue", "rgb"), ("rgb_to_0_1", "rgb"),
    ("noNorm", "none"), ("none", "none"),
])
def test_modality_of(name, expected):
    assert modality_of(name) == expected


@pytest.mark.parametrize("box,expected", [
    ((slice(1, 3), slice(2, 3), slice(0, 2)), ((1, 3), (2, 3), (0, 2))),
    ((slice(0, 4), slice(0, 5), slice(0, 6)), ((0, 4), (0, 5), (0, 6))),
])
def test_nonzero_bbox(box, expected):
    a = np.zeros((2, 4, 5, 6), dtype=np.float32)
    a[(1, *box)] = -3.0  # nonzero in the second channel only
    assert nonzero_bbox(a) == expected


def test_nonzero_bbox_of_empty_image_is_everything():
    assert nonzero_bbox(np.zeros((1, 2, 3, 4))) == ((0, 2), (0, 3), (0, 4))


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("jobs", [1, 2])
def test_parallel_map_keeps_order(jobs):
    assert list(parallel_map(_square, range(7), jobs=jobs)) == [x * x for x in range(7)]


def test_all_background_dataset_is_rejected(nnunet_3d):
    import SimpleITK as sitk

    for cid in nnunet_3d.case_ids:
        path = nnunet_3d.root / "labelsTr" / f"{cid}.nii.gz"
        img = sitk.ReadImage(str(path))
        sitk.WriteImage(img * 0, str(path))  # same geometry, all background
    with pytest.raises(DatasetError, match="no training case has any foreground"):
        compute_fingerprint(load_dataset_spec(nnunet_3d.root), jobs=1)


def _disk(radius: int, size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - size // 2) ** 2 + (xx - size // 2) ** 2) <= radius**2)[None]


def _bar(width: int, size: int = 128) -> np.ndarray:
    m = np.zeros((1, size, size), bool)
    m[0, 40:40 + width, 10:118] = True
    return m


@pytest.mark.parametrize("mask,low,high", [
    (_disk(10), 8.0, 12.5),      # about the radius of a round structure
    (_disk(40), 35.0, 45.0),
    (_bar(2), 1.5, 2.5),         # about the width of a thin one
    (_bar(6), 5.0, 6.5),
    (np.ones((1, 20, 20), bool), 9.0, 11.0),   # the image border counts as outside
])
def test_structure_size_px(mask, low, high):
    from automedseg.fingerprint import structure_size_px

    assert low <= structure_size_px(mask) <= high


def test_plan_recomputes_a_malformed_fingerprint_and_says_why(nnunet_3d, tmp_path):
    from automedseg.pipeline import run_plan
    from automedseg.workspace import Workspace

    ws = Workspace(tmp_path / "work")
    kwargs = {"configurations": ["3d_fullres"], "jobs": 1, "device": "reference-cpu-2core", "time_budget_s": 60.0,
              "preprocess": False}
    first = run_plan(nnunet_3d.root, ws, **kwargs)
    saved = ws.fingerprint_path.read_text()
    data = json.loads(saved)
    data["cases"][0]["foreground_voxels"] = "lots"
    ws.fingerprint_path.write_text(json.dumps(data))
    log: list[str] = []
    assert run_plan(nnunet_3d.root, ws, log=log.append, **kwargs).to_json() == first.to_json()
    assert any("not reused" in m and "cases[0].foreground_voxels: expected an integer" in m for m in log), log
    assert ws.fingerprint_path.read_text() == saved  # computed again, the same text
    log.clear()
    run_plan(nnunet_3d.root, ws, log=log.append, **kwargs)
    assert any("reusing" in m for m in log) and not any("not reused" in m for m in log)
