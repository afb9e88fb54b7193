"""DICOM series in, DICOM-SEG out (automedseg.dicom): a synthetic CT series written with SimpleITK, predicted with
the trained demo, the SEG read back with pydicom/highdicom."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from automedseg.cli import main
from automedseg.dicom import discover_dicom_series, read_dicom_series, segment_numbers
from automedseg.errors import DatasetError

PREDICT = ["--threads", "1", "--no-mirror", "--device", "cpu"]


def _ct_volume(image_path: Path, angle: float = 0.3) -> sitk.Image:
    """The demo test image as int16 "HU" (x10) on an oblique grid (rotated about z)."""
    im = sitk.ReadImage(str(image_path))
    volume = sitk.GetImageFromArray(np.round(sitk.GetArrayFromImage(im) * 10).astype(np.int16))
    volume.SetSpacing(im.GetSpacing())
    volume.SetOrigin((12.5, -40.0, 7.0))
    c, s = math.cos(angle), math.sin(angle)
    volume.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return volume


@pytest.fixture
def series(trained_demo_best: tuple[Path, Path], tmp_path: Path, write_dicom_series) -> tuple[Path, sitk.Image, dict]:
    """``tmp_path/in/patient_a``: one CT series; returns (input folder, the volume written, its UIDs)."""
    dataset, _ = trained_demo_best
    volume = _ct_volume(dataset / "imagesTs" / "demo_006_0000.nii.gz")
    uids = write_dicom_series(volume, tmp_path / "in" / "patient_a")
    return tmp_path / "in", volume, uids


def test_series_are_read_with_their_geometry(series: tuple[Path, sitk.Image, dict]) -> None:
    folder, volume, _ = series
    (case,) = discover_dicom_series(folder)
    assert case.case_id == "patient_a" and case.images == (folder / "patient_a",)
    image, geometry = read_dicom_series(case.images[0])
    assert image.shape == (1, *sitk.GetArrayFromImage(volume).shape) and image.dtype == np.float32
    assert np.array_equal(image[0], sitk.GetArrayFromImage(volume).astype(np.float32))
    assert np.allclose(geometry.origin, volume.GetOrigin(), atol=1e-4)
    assert np.allclose(geometry.direction, volume.GetDirection(), atol=1e-5)
    assert np.allclose(geometry.spacing, volume.GetSpacing())


def test_one_series_per_folder(tmp_path: Path, write_dicom_series) -> None:
    volume = sitk.Image(8, 8, 3, sitk.sitkInt16)
    write_dicom_series(volume, tmp_path / "a")
    write_dicom_series(volume, tmp_path / "a_second", series_number=4)
    for p in (tmp_path / "a_second").iterdir():
        p.rename(tmp_path / "a" / f"b_{p.name}")
    (tmp_path / "a_second").rmdir()
    with pytest.raises(DatasetError, match="holds 2 DICOM series; put each series in its own folder"):
        discover_dicom_series(tmp_path)
    (tmp_path / "empty").mkdir()
    assert discover_dicom_series(tmp_path / "empty") == []


def test_predict_series_to_nifti_and_dicom_seg(trained_demo_best: tuple[Path, Path], series, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom", reason="DICOM-SEG is optional: pip install 'automedseg[dicom]'")
    hd = pytest.importorskip("highdicom", reason="DICOM-SEG is optional: pip install 'automedseg[dicom]'")
    dataset, work = trained_demo_best
    folder, volume, uids = series
    runner = CliRunner()
    r = runner.invoke(main, ["predict", "-i", str(folder), "-o", str(tmp_path / "nii"), "-d", str(work), *PREDICT])
    assert r.exit_code == 0 and "1 written" in r.output, r.output
    mask_image = sitk.ReadImage(str(tmp_path / "nii" / "patient_a.nii.gz"))
    assert np.allclose(mask_image.GetDirection(), volume.GetDirection(), atol=1e-5)
    assert np.allclose(mask_image.GetOrigin(), volume.GetOrigin(), atol=1e-4)
    mask = sitk.GetArrayFromImage(mask_image)
    r = runner.invoke(main, ["predict", "-i", str(folder), "-o", str(tmp_path / "seg"), "-d", str(work),
                             "--output-format", "dicom-seg", *PREDICT])
    assert r.exit_code == 0 and "1 written" in r.output, r.output

    seg = hd.seg.segread(str(tmp_path / "seg" / "patient_a.dcm"))
    sources = [pydicom.dcmread(p) for p in sorted((folder / "patient_a").glob("*.dcm"))]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == uids["frame_of_reference"] and seg.StudyInstanceUID == uids["study"]
    assert seg.PatientID == "SYN001" and seg.SeriesInstanceUID != uids["series"]
    assert [(d.SegmentNumber, d.SegmentLabel) for d in seg.SegmentSequence] == [(1, "outer"), (2, "core")]
    assert segment_numbers({"background": 0, "outer": 1, "core": 2}) == {1: "outer", 2: "core"}
    assert int(seg.NumberOfFrames) == 2 * len(sources) and (seg.Rows, seg.Columns) == mask.shape[1:]
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in
                                                                               sources[0].PixelSpacing]
    assert np.allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                       [float(v) for v in sources[0].ImageOrientationPatient])
    source_positions = {tuple(round(float(v), 3) for v in s.ImagePositionPatient) for s in sources}
    frame_positions = {tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                       for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_positions == source_positions
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
                                               combine_segments=True)
    assert np.array_equal(labels, mask)  # slice i of the series is array index z = i (instance order here)


def test_dicom_seg_needs_dicom_input(trained_demo_best: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("highdicom", reason="DICOM-SEG is optional: pip install 'automedseg[dicom]'")
    dataset, work = trained_demo_best
    r = CliRunner().invoke(main, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "o"),
                                  "-d", str(work), "--output-format", "dicom-seg", *PREDICT])
    assert r.exit_code == 2 and "--output-format dicom-seg needs DICOM series as input" in r.output, r.output
    assert not (tmp_path / "o").exists()
