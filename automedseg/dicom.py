"""DICOM series in, DICOM-SEG out: ``automedseg predict`` on a folder of DICOM series.

``predict -i FOLDER`` takes DICOM when ``FOLDER`` holds no image files but subfolders each holding one DICOM
series (or is itself one series): each series is one case, named after its folder, read with SimpleITK's
``ImageSeriesReader`` (GDCM orders the slices along the slice normal and applies the rescale slope and
intercept, so CT arrives in HU). Masks are written as ``<case>.nii.gz`` with the series' geometry, or with
``--output-format dicom-seg`` as ``<case>.dcm``: a DICOM Segmentation (highdicom, ``pip install
'automedseg[dicom]'``) that references the source series (same study, patient and frame of reference, one frame
per source slice), with one segment per foreground label named after the dataset's label names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from automedseg.case_files import CaseFiles
from automedseg.errors import DatasetError, InputError
from automedseg.geometry import Geometry

#: SNOMED CT "Tissue" (85756007): the property category and type of every segment (the model knows no anatomy).
TISSUE = ("85756007", "SCT", "Tissue")


def _series_ids(folder: Path) -> tuple[str, ...]:
    """The DICOM series IDs of the files directly in ``folder`` (GDCM reads only their headers)."""
    if not any(p.is_file() and not p.name.startswith(".") for p in Path(folder).iterdir()):
        return ()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warns on stderr for every folder without DICOM
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return ()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def discover_dicom_series(folder: Path) -> list[CaseFiles]:
    """The DICOM series of ``folder``: itself when it holds one, else one per subfolder (named after it).

    Returns:
        One case per series (``images`` is its folder); empty when there is no DICOM here.

    Raises:
        DatasetError: A folder holds more than one series (one line per such folder).
    """
    folder = Path(folder)
    own = _series_ids(folder)
    if len(own) == 1:
        return [CaseFiles(folder.name, (folder,))]
    subs = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")] if not own else []
    cases, problems = [], []
    for sub in subs:
        ids = _series_ids(sub)
        if len(ids) == 1:
            cases.append(CaseFiles(sub.name, (sub,)))
        elif len(ids) > 1:
            problems.append(f"{sub}: holds {len(ids)} DICOM series; put each series in its own folder")
    if own:
        problems.append(f"{folder}: holds {len(own)} DICOM series; put each series in its own folder")
    if problems:
        raise DatasetError(problems)
    return cases


def series_files(folder: Path) -> list[str]:
    """The files of the one series in ``folder``, in SimpleITK's slice order (array index z)."""
    ids = _series_ids(folder)
    if len(ids) != 1:
        raise InputError(f"{folder}: {'no' if not ids else len(ids)} DICOM series; one series per folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def read_dicom_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    """A DICOM series as a float32 ``(1, Z, Y, X)`` array (rescaled: CT in HU) and its geometry.

    Raises:
        InputError: The folder holds no series or several, or SimpleITK cannot read it (the message names it).
    """
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series_files(folder))
    try:
        img = reader.Execute()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise InputError(f"{folder}: cannot read the DICOM series ({first[:200]})") from None
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() != 3:
        raise InputError(f"{folder}: not a single-channel 3D series (colour or multi-frame DICOM is not supported)")
    arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)[None]
    geometry = Geometry(size=tuple(int(v) for v in img.GetSize()), spacing=tuple(float(v) for v in img.GetSpacing()),
                        origin=tuple(float(v) for v in img.GetOrigin()),
                        direction=tuple(float(v) for v in img.GetDirection()))
    return arr, geometry


def require_highdicom() -> None:
    """Refuse ``--output-format dicom-seg`` with the install command when highdicom is missing."""
    if importlib.util.find_spec("highdicom") is None or importlib.util.find_spec("pydicom") is None:
        raise InputError("--output-format dicom-seg: highdicom is not installed; `pip install 'automedseg[dicom]'`")


def write_dicom_seg(seg: np.ndarray, series_folder: Path, path: Path, *, labels: Mapping[str, int],
                    series_description: str = "automedseg") -> None:
    """Write a label map as a DICOM Segmentation referencing the series it was predicted from, atomically.

    Args:
        seg: ``(Z, Y, X)`` declared label values on the series' grid (array index z = SimpleITK's slice order).
        series_folder: The source series (its files are read again for the references).
        path: The ``.dcm`` to write.
        labels: Label name -> value; every foreground value becomes a segment (1, 2, ... in value order).
        series_description: The SEG series' description.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    from automedseg.atomic import atomic_write
    from automedseg.version import __version__

    files = series_files(Path(series_folder))
    sources = [pydicom.dcmread(f) for f in files]
    if seg.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise InputError(f"{series_folder}: mask shape {seg.shape} does not match the series ({len(sources)} slices "
                         f"of {sources[0].Rows} x {sources[0].Columns})")
    foreground = sorted((v, n) for n, v in labels.items() if v != 0)
    numbers = np.zeros(int(max([v for v, _ in foreground], default=0)) + 1, dtype=np.uint8)
    for i, (value, _) in enumerate(foreground, start=1):
        numbers[value] = i
    if int(seg.max(initial=0)) >= len(numbers):
        raise InputError(f"{path}: the mask holds value {int(seg.max())}, which the labels do not declare")
    pixels = numbers[seg]  # segment numbers 1..K: highdicom's label-map form of a binary segmentation
    algorithm = hd.AlgorithmIdentificationSequence(name="automedseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    tissue = Code(*TISSUE)
    descriptions = [hd.seg.SegmentDescription(segment_number=i, segment_label=name, segmented_property_category=tissue,
                                              segmented_property_type=tissue, algorithm_type="AUTOMATIC",
                                              algorithm_identification=algorithm)
                    for i, (_, name) in enumerate(foreground, start=1)]
    seg_ds = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type="BINARY", segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="automedseg", manufacturer_model_name="automedseg",
        software_versions=__version__, device_serial_number="none", series_description=series_description,
        omit_empty_frames=False)
    atomic_write(Path(path), lambda tmp: seg_ds.save_as(str(tmp), enforce_file_format=True))


def segment_numbers(labels: Mapping[str, int]) -> dict[int, str]:
    """Segment number -> label name as :func:`write_dicom_seg` numbers them (foreground values in order).

    Example:
        >>> segment_numbers({"background": 0, "lesion": 200, "organ": 1})
        {1: 'organ', 2: 'lesion'}
    """
    return {i: n for i, (_, n) in enumerate(sorted((v, n) for n, v in labels.items() if v != 0), start=1)}


def check_dicom_output(cases: Sequence[CaseFiles], output_format: str) -> None:
    """Refuse ``dicom-seg`` output for inputs that are not DICOM series (a SEG must reference its source)."""
    if output_format == "dicom-seg":
        require_highdicom()
        not_dicom = [c for c in cases if not c.images[0].is_dir()]
        if not_dicom:
            raise InputError(f"{not_dicom[0].images[0]}: --output-format dicom-seg needs DICOM series as input "
                             "(one series per subfolder)")
