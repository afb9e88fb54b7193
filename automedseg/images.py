"""Image files and their geometry: reading images and labels as arrays, writing segmentations back with the
input's exact geometry, and finding the cases of a folder of images (:func:`discover_images`).

Every image becomes a float32 array ``(C, Z, Y, X)`` in SimpleITK array order; 2D images (PNG, TIFF,
JPEG, BMP) become ``(C, 1, Y, X)``. The :class:`Geometry` of each file (size, spacing, origin, direction)
is kept so predictions can be written back with exactly the input's geometry.

:class:`CaseFiles` (:mod:`automedseg.case_files`), :class:`~automedseg.errors.DatasetError` and :class:`Geometry`
(:mod:`automedseg.geometry`) are importable from here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from automedseg.atomic import atomic_write
from automedseg.case_files import CaseFiles
from automedseg.dicom import discover_dicom_series, read_dicom_series
from automedseg.errors import DatasetError
from automedseg.geometry import Geometry
from automedseg.imagefile import check_image_file

IMAGE_ENDINGS_3D = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
IMAGE_ENDINGS_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
IMAGE_ENDINGS = IMAGE_ENDINGS_3D + IMAGE_ENDINGS_2D


def file_ending(path: Path | str) -> str:
    """Return the recognised image ending of ``path`` (``.nii.gz`` counts as one), or its suffix."""
    name = str(path).lower()
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def _read_sitk(path: Path) -> sitk.Image:
    check_image_file(path)  # missing, unreadable, truncated, inflated, NaN/inf: before SimpleITK allocates
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise OSError(f"{path}: cannot read image ({first[:200]})") from None


def read_image_file(path: Path, *, spacing_2d_mm: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Read one image file as a ``(C, Z, Y, X)`` array and its geometry.

    A 4D file (MSD multi-channel) gives C = its 4th dimension; an RGB file gives C = 3; a 2D file gives
    Z = 1. The geometry describes the spatial part only.

    Args:
        path: The file.
        spacing_2d_mm: Pixel spacing (y, x) to assume for 2D raster files, which carry none (default 1).

    Returns:
        The array (native dtype, not converted) and the geometry.

    Raises:
        FileNotFoundError: The file does not exist.
        PermissionError: The file exists but cannot be read.
        automedseg.imagefile.ImageFileError: The file contradicts its header (truncated, inflated, invalid
            spacing) or holds NaN/inf in float NIfTI data (see :func:`automedseg.imagefile.check_image_file`).
        OSError: SimpleITK cannot read it.
    """
    path = Path(path)
    arr, geometry = image_to_array(_read_sitk(path))
    if geometry.ndim == 2 and spacing_2d_mm is not None and file_ending(path) in IMAGE_ENDINGS_2D:
        geometry = dataclasses.replace(geometry, spacing=(float(spacing_2d_mm[1]), float(spacing_2d_mm[0])))
    return arr, geometry


def image_to_array(img: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """A SimpleITK image as a ``(C, Z, Y, X)`` array (native dtype) and the geometry of its spatial part.

    As :func:`read_image_file` reads files: a 4D image gives C = its 4th dimension, a vector (RGB) image C = its
    components, a 2D image Z = 1.

    Example:
        >>> arr, geometry = image_to_array(sitk.Image(4, 3, sitk.sitkUInt8))
        >>> arr.shape, geometry.size
        ((1, 1, 3, 4), (4, 3))
    """
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayViewFromImage(img).copy()  # (z, y, x[, comp]) or (t, z, y, x) for 4D
    dim = img.GetDimension()
    if ncomp > 1:
        arr = np.moveaxis(arr, -1, 0)  # (comp, [z,] y, x)
    else:
        arr = arr[None] if dim < 4 else arr
    if dim == 4:
        size = tuple(img.GetSize()[:3])
        spacing = tuple(img.GetSpacing()[:3])
        origin = tuple(img.GetOrigin()[:3])
        d4 = np.array(img.GetDirection()).reshape(4, 4)
        direction = tuple(float(v) for v in d4[:3, :3].ravel())
        n_components = arr.shape[0]
    else:
        size = tuple(img.GetSize())
        spacing = tuple(img.GetSpacing())
        origin = tuple(img.GetOrigin())
        direction = tuple(img.GetDirection())
        n_components = ncomp
        if dim == 2:
            arr = arr[:, None]  # (C, 1, Y, X)
    geometry = Geometry(
        size=tuple(int(v) for v in size),
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction),
        n_components=int(n_components),
    )
    return arr, geometry


def write_segmentation(segmentation: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a label map with exactly ``geometry``'s size, spacing, origin and direction, atomically.

    Args:
        segmentation: Integer array (Z, Y, X); for a 2D geometry (1, Y, X) or (Y, X).
        geometry: Geometry of the input image.
        path: Output file; its ending chooses the format.
    """
    top = int(segmentation.max(initial=0))
    write_array(segmentation.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32),
                geometry, path)


def write_array(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a scalar array (Z, Y, X) with ``geometry``, atomically."""
    path = Path(path)
    arr = np.asarray(array)
    if geometry.ndim == 2 and arr.ndim == 3:
        arr = arr[0]
    expected = tuple(reversed(geometry.size))
    if arr.shape != expected:
        raise ValueError(f"{path}: array shape {arr.shape} does not match the geometry's {expected}")
    img = sitk.GetImageFromArray(arr) if file_ending(path) in IMAGE_ENDINGS_2D else array_to_image(arr, geometry)
    atomic_write(path, lambda tmp: sitk.WriteImage(img, str(tmp), useCompression=True))


def array_to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A scalar array (Z, Y, X) (``(1, Y, X)`` or ``(Y, X)`` for a 2D geometry) as a SimpleITK image with
    exactly ``geometry``'s spacing, origin and direction.

    Example:
        >>> g = Geometry(size=(4, 3), spacing=(0.5, 2.0), origin=(1.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
        >>> img = array_to_image(np.zeros((1, 3, 4), np.uint8), g)
        >>> img.GetSize(), img.GetSpacing(), img.GetOrigin()
        ((4, 3), (0.5, 2.0), (1.0, 0.0))
    """
    arr = np.asarray(array)
    if geometry.ndim == 2 and arr.ndim == 3:
        arr = arr[0]
    expected = tuple(reversed(geometry.size))
    if arr.shape != expected:
        raise ValueError(f"array shape {arr.shape} does not match the geometry's {expected}")
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def discover_images(folder: Path, *, n_channels: int, file_ending_hint: str | None = None) -> list[CaseFiles]:
    """Find the cases of a folder of images to predict, in either layout.

    Files named ``CASE_XXXX<ending>`` are grouped by case when ``n_channels`` files exist per case
    (nnU-Net layout); otherwise every image file is one case (MSD 4D files or single-channel files). A folder
    without image files may hold DICOM series, one per subfolder (:func:`automedseg.dicom.discover_dicom_series`):
    each is a case whose ``images`` is its folder.

    Raises:
        DatasetError: The folder does not exist or holds neither image files nor DICOM series.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError([f"{folder}: input folder does not exist"])
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and file_ending(p) in IMAGE_ENDINGS)
    if not files:
        series = discover_dicom_series(folder)
        if series:
            return series
        raise DatasetError([f"{folder}: no image files ({', '.join(IMAGE_ENDINGS)}) and no DICOM series"])
    groups: dict[str, dict[int, Path]] = {}
    ungrouped: list[Path] = []
    for p in files:
        ending = file_ending(p)
        stem = p.name[: -len(ending)]
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            groups.setdefault(stem[:-5], {})[int(stem[-4:])] = p
        else:
            ungrouped.append(p)
    cases: list[CaseFiles] = []
    extra = [f"{chans[c]}: channel {c} beside {chans[0].name}, but the model takes {n_channels} channel(s) "
             f"(_0000 to _{n_channels - 1:04d}); move it out of the folder"
             for chans in groups.values() if set(range(n_channels)) <= set(chans) for c in sorted(chans)
             if c >= n_channels]
    if extra:
        raise DatasetError(extra)
    for cid, chans in sorted(groups.items()):
        if sorted(chans) == list(range(n_channels)):
            cases.append(CaseFiles(cid, tuple(chans[c] for c in range(n_channels))))
        elif sorted(chans) == [0]:  # one file holds every channel (RGB raster, 4D NIfTI named CASE_0000)
            cases.append(CaseFiles(cid, (chans[0],)))
        else:
            ungrouped.extend(chans.values())
    for p in sorted(ungrouped):
        cases.append(CaseFiles(p.name[: -len(file_ending(p))], (p,)))
    return sorted(cases, key=lambda c: c.case_id)


def read_images(case: CaseFiles, *, n_channels: int,
                spacing_2d_mm: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Read all channels of a case into one float32 ``(C, Z, Y, X)`` array.

    Raises:
        ValueError: Channel count or channel geometries do not match (message names the file).
    """
    if len(case.images) == 1 and Path(case.images[0]).is_dir():  # a DICOM series
        image, geometry = read_dicom_series(case.images[0])
        if n_channels != 1:
            raise ValueError(f"{case.images[0]}: a DICOM series is one channel, the model takes {n_channels}")
        return image, geometry
    arrays = []
    ref: Geometry | None = None
    for path in case.images:
        arr, geom = read_image_file(path, spacing_2d_mm=spacing_2d_mm)
        if ref is None:
            ref = geom
        else:
            diff = ref.matches(geom)
            if diff:
                raise ValueError(f"{path}: geometry differs from {case.images[0].name}: {'; '.join(diff)}")
        arrays.append(arr)
    assert ref is not None
    image = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
    if image.shape[0] != n_channels:
        raise ValueError(f"{case.images[0]}: has {image.shape[0]} channel(s), the dataset declares {n_channels}")
    return image.astype(np.float32, copy=False), ref


def read_label(path: Path, *, spacing_2d_mm: Sequence[float] | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a label map as an integer ``(Z, Y, X)`` array (float-stored integral labels are cast).

    Raises:
        ValueError: The label is not a scalar image or has non-integral values.
    """
    arr, geom = read_image_file(path, spacing_2d_mm=spacing_2d_mm)
    if arr.shape[0] != 1:
        raise ValueError(f"{path}: label must be a single-channel image, it has {arr.shape[0]} channels")
    arr = arr[0]
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{path}: label has non-integral values")
    return arr.astype(label_dtype(arr.max(initial=0)), copy=False), geom


def label_dtype(max_value: int) -> type[np.signedinteger]:
    """Smallest signed dtype for a label map whose largest value is ``max_value`` (int8, int16 or int32)."""
    return np.int8 if max_value <= 127 else np.int16 if max_value <= 32767 else np.int32
