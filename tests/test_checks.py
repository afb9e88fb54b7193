"""Tests for automedseg.checks: one test per fault type, and many faults at once (API and CLI)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from automedseg.checks import check_dataset, inspect_case
from automedseg.cli import main
from automedseg.constants import N_SPLITS
from automedseg.io import load_dataset_spec

if TYPE_CHECKING:
    from conftest import SynthDataset

GARBAGE = b"\x00\x13\x37 this is not an image \xff\xfe" * 20


def _img(ds: SynthDataset, cid: str, channel: int = 0) -> Path:
    return ds.root / "imagesTr" / f"{cid}_{channel:04d}{ds.ending}"


def _lab(ds: SynthDataset, cid: str) -> Path:
    return ds.root / "labelsTr" / f"{cid}{ds.ending}"


def _rewrite(path: Path, edit: Callable[[sitk.Image], sitk.Image | None]) -> None:
    """Read an image, let ``edit`` change it in place (or return a new one), write it back."""
    img = sitk.ReadImage(str(path))
    new = edit(img)
    sitk.WriteImage(new if new is not None else img, str(path))


def _set_array(path: Path, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace the voxel values of a file, keeping its geometry."""
    img = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img)))
    new.CopyInformation(img)
    sitk.WriteImage(new, str(path))


def _to_4d(path: Path) -> None:
    img = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([img, img]), str(path))


def _edit_json(root: Path, fn: Callable[[dict], None]) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    fn(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


# --- faults: each plants one problem in a two-channel nnU-Net dataset and returns (file, needle) ---------


def f_missing_image(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _img(ds, cid, 0).unlink()
    return _img(ds, cid, 0), "missing"


def f_missing_channel(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _img(ds, cid, 1).unlink()
    return _img(ds, cid, 1), "missing"


def f_missing_label(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _lab(ds, cid).unlink()
    return _lab(ds, cid), "missing"


def f_unreadable_image(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _img(ds, cid, 1).write_bytes(GARBAGE)
    return _img(ds, cid, 1), "cannot read"


def f_unreadable_label(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _lab(ds, cid).write_bytes(GARBAGE)
    return _lab(ds, cid), "cannot read"


def f_label_size(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    def edit(img: sitk.Image) -> sitk.Image:
        small = img[:, :, :-1]  # one slice fewer
        return small

    _rewrite(_lab(ds, cid), edit)
    return _lab(ds, cid), "size"


def f_label_spacing(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _rewrite(_lab(ds, cid), lambda img: img.SetSpacing((0.8, 0.8, 2.0)))
    return _lab(ds, cid), "spacing"


def f_label_origin(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _rewrite(_lab(ds, cid), lambda img: img.SetOrigin((50.0, 50.0, 50.0)))
    return _lab(ds, cid), "origin"


def f_label_direction(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _rewrite(_lab(ds, cid), lambda img: img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)))
    return _lab(ds, cid), "direction"


def f_channel_geometry(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _rewrite(_img(ds, cid, 1), lambda img: img.SetSpacing((1.0, 1.0, 1.0)))
    return _img(ds, cid, 1), "geometry differs"


def f_undeclared_label(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    def plant(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[0, 0, 0] = 5
        return a

    _set_array(_lab(ds, cid), plant)
    return _lab(ds, cid), "[5] are not declared"


def f_nonintegral_label(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    def plant(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[a == 2] = 1.5
        return a

    _set_array(_lab(ds, cid), plant)
    return _lab(ds, cid), "non-integral"


def f_nan(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    def plant(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[1, 5, 5] = np.nan
        return a

    _set_array(_img(ds, cid, 0), plant)
    return _img(ds, cid, 0), "NaN or infinite"


def f_inf(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    def plant(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[2, 3, 3] = np.inf
        a[2, 3, 4] = -np.inf
        return a

    _set_array(_img(ds, cid, 1), plant)
    return _img(ds, cid, 1), "2 NaN or infinite"


def f_truncated_image(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    data = _img(ds, cid, 0).read_bytes()
    _img(ds, cid, 0).write_bytes(data[: len(data) // 2])
    return _img(ds, cid, 0), "truncated"


def f_nan_label(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    def plant(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[4, 6, 6] = np.nan
        return a

    _set_array(_lab(ds, cid), plant)
    return _lab(ds, cid), "1 NaN or infinite"


def f_4d_image(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _to_4d(_img(ds, cid, 0))
    return _img(ds, cid, 0), "4D image"


def f_4d_label(ds: SynthDataset, cid: str) -> tuple[Path, str]:
    _to_4d(_lab(ds, cid))
    return _lab(ds, cid), "4D label"


CASE_FAULTS = {
    "missing_image": f_missing_image,
    "missing_channel": f_missing_channel,
    "missing_label": f_missing_label,
    "unreadable_image": f_unreadable_image,
    "unreadable_label": f_unreadable_label,
    "label_size": f_label_size,
    "label_spacing": f_label_spacing,
    "label_origin": f_label_origin,
    "label_direction": f_label_direction,
    "channel_geometry": f_channel_geometry,
    "undeclared_label": f_undeclared_label,
    "nonintegral_label": f_nonintegral_label,
    "nan_intensity": f_nan,
    "inf_intensity": f_inf,
    "4d_image": f_4d_image,
    "4d_label": f_4d_label,
    "truncated_image": f_truncated_image,
    "nan_label": f_nan_label,
}


# ITK's NIfTI reader silently replaces NaN and inf with 0; automedseg.imagefile finds them in the raw data.
FAULT_CASES = [(f, e) for e in (".nii.gz", ".mha") for f in sorted(CASE_FAULTS)]


@pytest.fixture
def two_channel(tmp_path, write_nnunet_dataset):
    return write_nnunet_dataset(tmp_path / "Dataset010_Faults", n_cases=5, n_test=0, channel_names=("T1", "T2"),
                                oblique_every=0)


def test_clean_datasets_have_no_problems(nnunet_3d, nnunet_2ch, msd_4d, png_gray, png_rgb, ct_dataset,
                                         demo_dataset):
    for root in (nnunet_3d.root, nnunet_2ch.root, msd_4d.root, png_gray.root, png_rgb.root, ct_dataset.root,
                 demo_dataset):
        assert check_dataset(root, jobs=1) == [], root


@pytest.mark.parametrize("fault,ending", FAULT_CASES)
def test_case_fault(tmp_path, write_nnunet_dataset, fault, ending):
    ds = write_nnunet_dataset(tmp_path / "Dataset010_Faults", n_cases=5, n_test=0, channel_names=("T1", "T2"),
                              oblique_every=0, ending=ending)
    path, needle = CASE_FAULTS[fault](ds, ds.case_ids[1])
    problems = check_dataset(ds.root, jobs=1)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: "), problems[0]
    assert needle in problems[0]


def test_float_stored_integral_labels_are_accepted(two_channel):
    cid = two_channel.case_ids[0]
    _set_array(_lab(two_channel, cid), lambda a: a.astype(np.float32))
    assert sitk.ReadImage(str(_lab(two_channel, cid))).GetPixelID() == sitk.sitkFloat32
    assert check_dataset(two_channel.root, jobs=1) == []
    spec = load_dataset_spec(two_channel.root)
    insp = inspect_case(spec.cases[0], spec)
    assert insp.label is not None and np.issubdtype(insp.label.dtype, np.integer)
    assert set(np.unique(insp.label).tolist()) == {0, 1, 2}


def test_inspection_returns_arrays_when_clean(two_channel):
    spec = load_dataset_spec(two_channel.root)
    insp = inspect_case(spec.cases[0], spec)
    assert insp.problems == []
    assert insp.image is not None and insp.image.dtype == np.float32 and insp.image.shape == (2, 8, 24, 24)
    assert insp.label is not None and insp.label.shape == (8, 24, 24)
    assert insp.geometry is not None and insp.geometry.spacing_zyx == pytest.approx(two_channel.spacing_zyx)


def test_msd_single_volume_where_two_modalities_declared(msd_4d):
    spec = load_dataset_spec(msd_4d.root)
    path = spec.cases[1].images[0]
    img = sitk.ReadImage(str(path))
    sitk.WriteImage(img[:, :, :, 0], str(path))  # keep the first volume only
    problems = check_dataset(msd_4d.root, jobs=1)
    assert len(problems) == 1 and problems[0].startswith(str(path)) and "declares 2" in problems[0]


def test_msd_4d_where_3d_expected(msd_4d, write_4d):
    _edit_json(msd_4d.root, lambda m: m.update(modality={"0": "FLAIR"}))
    problems = check_dataset(msd_4d.root, jobs=1)
    assert len(problems) == len(msd_4d.case_ids) and all("4D image" in p for p in problems)


# --- dataset-level faults ----------------------------------------------------------------------------


def _malformed_json(root: Path) -> str:
    (root / "dataset.json").write_text('{"channel_names": {"0": "T1"}, "labels": ')
    return "not valid JSON"


def _incomplete_json(root: Path) -> str:
    _edit_json(root, lambda m: m.pop("labels"))
    return "required key 'labels' is missing"


def _empty_dataset(root: Path) -> str:
    for sub in ("imagesTr", "labelsTr"):
        for p in (root / sub).iterdir():
            p.unlink()
    _edit_json(root, lambda m: m.update(numTraining=0))
    return "no training cases"


def _no_background(root: Path) -> str:
    _edit_json(root, lambda m: m.update(labels={"outer": 1, "inner": 2}))
    return "background"


def _missing_json(root: Path) -> str:
    (root / "dataset.json").unlink()
    return "dataset.json is missing"


def _num_training_text(root: Path) -> str:
    _edit_json(root, lambda m: m.update(numTraining="six"))
    return "dataset.json: 'numTraining' must be a non-negative integer, got 'six'"


def _num_training_negative(root: Path) -> str:
    _edit_json(root, lambda m: m.update(numTraining=-5))
    return "dataset.json: 'numTraining' must be a non-negative integer, got -5"


def _label_value_text(root: Path) -> str:
    _edit_json(root, lambda m: m["labels"].update(inner="2"))
    return "dataset.json: label 'inner' has value '2'"


def _channel_names_number(root: Path) -> str:
    _edit_json(root, lambda m: m.update(channel_names=2))
    return "dataset.json: 'channel_names' must be a non-empty object"


def _channel_name_not_text(root: Path) -> str:
    _edit_json(root, lambda m: m.update(channel_names={"0": "T1", "1": 7}))
    return "dataset.json: 'channel_names' values must be channel names (non-empty strings), got 7"


def _file_ending_number(root: Path) -> str:
    _edit_json(root, lambda m: m.update(file_ending=7))
    return "dataset.json: 'file_ending' must be a string"


DATASET_FAULTS = [_malformed_json, _incomplete_json, _empty_dataset, _no_background, _missing_json, _num_training_text,
                  _num_training_negative, _label_value_text, _channel_names_number, _channel_name_not_text,
                  _file_ending_number]


@pytest.mark.parametrize("fault", DATASET_FAULTS, ids=lambda f: f.__name__.strip("_"))
def test_dataset_fault(two_channel, fault):
    needle = fault(two_channel.root)
    problems = check_dataset(two_channel.root, jobs=1)
    assert len(problems) == 1, problems
    assert needle in problems[0]
    assert str(two_channel.root) in problems[0]


def test_msd_incomplete_json(msd_4d):
    _edit_json(msd_4d.root, lambda m: m.pop("training"))
    problems = check_dataset(msd_4d.root, jobs=1)
    assert len(problems) == 1 and "'training'" in problems[0]


def test_msd_json_wrong_types(msd_4d):
    _edit_json(msd_4d.root, lambda m: m.update(numTraining="six", numTest=1.5, test="imagesTs"))
    problems = check_dataset(msd_4d.root, jobs=1)
    where = msd_4d.root / "dataset.json"
    assert problems == [f"{where}: 'test' must be a list of image paths",
                        f"{where}: 'numTraining' must be a non-negative integer, got 'six'",
                        f"{where}: 'numTest' must be a non-negative integer, got 1.5"]


# --- dataset-level rules shared by check and plan: enough cases for the folds, some foreground -----------


def _cli(command: str, root: Path, work: Path):
    args = [command, str(root), "-j", "1"]
    if command == "plan":
        args += ["--work-dir", str(work), "--device", "reference-cpu-2core"]
    return CliRunner().invoke(main, args)


def _all_background(root: Path) -> None:
    for path in (root / "labelsTr").iterdir():
        _set_array(path, np.zeros_like)


@pytest.mark.parametrize("command", ["check", "plan"])
@pytest.mark.parametrize("layout", ["nnunet", "msd"])
def test_too_few_cases_for_cross_validation(tmp_path, write_nnunet_dataset, msd_4d, command, layout):
    if layout == "nnunet":
        root = write_nnunet_dataset(tmp_path / "Dataset012_Four", n_cases=N_SPLITS - 1, n_test=0).root
        where = root / "labelsTr"
    else:
        root = msd_4d.root
        _edit_json(root, lambda m: m.update(training=m["training"][: N_SPLITS - 1], numTraining=N_SPLITS - 1))
        where = root / "dataset.json"
    expected = f"{where}: {N_SPLITS - 1} training case(s) are too few for {N_SPLITS}-fold cross-validation"
    if command == "check":
        problems = check_dataset(root, jobs=1)
        assert len(problems) == 1 and problems[0].startswith(expected), problems
    result = _cli(command, root, tmp_path / "work")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines()[0].startswith(expected) and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", ["check", "plan"])
def test_no_foreground_in_any_label(nnunet_3d, tmp_path, command):
    _all_background(nnunet_3d.root)
    expected = f"{nnunet_3d.root / 'labelsTr'}: no training case has any foreground label"
    if command == "check":
        assert check_dataset(nnunet_3d.root, jobs=2) == [expected]
    result = _cli(command, nnunet_3d.root, tmp_path / "work")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [expected]  # one problem: one line


def test_no_foreground_needs_every_label_read(nnunet_3d):
    """With one label unreadable nothing is claimed about foreground (that label may hold some)."""
    _all_background(nnunet_3d.root)
    broken = _lab(nnunet_3d, nnunet_3d.case_ids[0])
    broken.write_bytes(GARBAGE)
    problems = check_dataset(nnunet_3d.root, jobs=1)
    assert len(problems) == 1 and problems[0].startswith(f"{broken}: ")


# --- THE must-show test: a dozen faults at once, one line each, via the API and the CLI -------------


@pytest.fixture(params=[".mha", ".nii.gz"])
def many_faults(request, tmp_path, write_nnunet_dataset) -> tuple[Path, list[Path]]:
    """Every case fault of CASE_FAULTS (18) planted in its own case, plus two clean cases."""
    ending = request.param
    names = sorted(CASE_FAULTS)
    ds = write_nnunet_dataset(tmp_path / "Dataset011_ManyFaults", n_cases=len(names) + 2, n_test=0,
                              channel_names=("T1", "T2"), oblique_every=0, ending=ending)
    expected = []
    for name, cid in zip(names, ds.case_ids[1:]):
        path, _ = CASE_FAULTS[name](ds, cid)
        expected.append(path)
    return ds.root, expected


def test_many_faults_one_line_each(many_faults):
    root, expected = many_faults
    assert len(expected) >= 12
    problems = check_dataset(root, jobs=2)
    assert len(problems) == len(expected), "\n".join(problems)
    named = sorted(p.split(": ", 1)[0] for p in problems)
    assert named == sorted(str(p) for p in expected)
    assert check_dataset(root, jobs=1) == problems  # same lines, same order without processes


@pytest.mark.parametrize("command", ["check", "plan"])
def test_cli_reports_all_faults_without_traceback(many_faults, tmp_path, command):
    root, expected = many_faults
    args = [command, str(root), "-j", "1"]
    if command == "plan":
        args += ["--work-dir", str(tmp_path / "work"), "--device", "reference-cpu-2core"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(str(root))]
    assert len(lines) == len(expected)
    assert sorted(ln.split(": ", 1)[0] for ln in lines) == sorted(str(p) for p in expected)
    assert f"{len(expected)} problem(s) found." in result.stderr
    if command == "plan":
        assert not (tmp_path / "work" / "plans.json").exists()


def test_cli_check_names_every_faulty_file_of_a_planted_corpus(tmp_path, write_nnunet_dataset, edit_nifti_header):
    """Bad files of every kind SimpleITK used to accept, and classic ones, all named by `automedseg check`."""
    ds = write_nnunet_dataset(tmp_path / "Dataset013_Corpus", n_cases=10, n_test=0, oblique_every=0)
    c = ds.case_ids
    expected: dict[Path, str] = {}
    for cid, fault in ((c[1], f_truncated_image), (c[2], f_nan), (c[3], f_nan_label), (c[4], f_label_spacing),
                       (c[5], f_undeclared_label)):
        path, needle = fault(ds, cid)
        expected[path] = needle
    expected[edit_nifti_header(_img(ds, c[6]), dims_xyz=(1000, 1000, 500))] = "claims 2,000,000,000 bytes"
    expected[edit_nifti_header(_img(ds, c[7]), pixdim_xyz=(0.8, 0.8, 0.0))] = "spacing 0 in header for the z axis"

    def plant_inf(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64)
        a[0, :2, :3] = -np.inf
        return a

    _set_array(_lab(ds, c[8]), plant_inf)
    expected[_lab(ds, c[8])] = "6 NaN or infinite value(s) in the float64 voxel data (0 NaN, 0 +inf, 6 -inf)"
    result = CliRunner().invoke(main, ["check", str(ds.root), "-j", "2"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[-1] == f"{len(expected)} problem(s) found."
    named = {Path(line.split(": ", 1)[0]): line for line in lines[:-1]}
    assert set(named) == set(expected) and len(lines) == len(expected) + 1, "\n".join(lines)
    for path, needle in expected.items():
        assert needle in named[path], named[path]


@pytest.mark.parametrize("command", ["check", "plan"])
@pytest.mark.parametrize("fault", [_malformed_json, _missing_json], ids=lambda f: f.__name__.strip("_"))
def test_cli_dataset_json_faults(two_channel, tmp_path, command, fault):
    needle = fault(two_channel.root)
    args = [command, str(two_channel.root), "-j", "1"]
    if command == "plan":
        args += ["--work-dir", str(tmp_path / "work"), "--device", "reference-cpu-2core"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output and needle in result.stderr


def test_cli_check_clean_dataset(nnunet_3d):
    result = CliRunner().invoke(main, ["check", str(nnunet_3d.root), "-j", "1"])
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output
