"""Shared fixtures: tiny synthetic datasets written to ``tmp_path`` in the layouts automedseg reads.

Every volume is small (8 x 24 x 24 or less) so each test runs in well under a second. The helpers are
exposed as fixtures (``write_volume``, ``write_nnunet_dataset``, ``write_nifti`` for NIfTI files built byte by
byte) so test modules need no imports from here.

Conventions: arrays are (Z, Y, X), spacings (z, y, x) in mm; SimpleITK takes (x, y, z), the helpers convert.
"""

from __future__ import annotations

import gzip
import importlib
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from automedseg.constants import N_SPLITS

if TYPE_CHECKING:
    from automedseg.fingerprint import ClassStats, Fingerprint
    from automedseg.plans import NetworkPlan

torch.set_num_threads(1)

SHAPE_3D = (8, 24, 24)  # (z, y, x)
SPACING_ANISO = (3.0, 0.8, 0.8)  # (z, y, x) mm
SHAPE_2D = (20, 24)  # (y, x)
LABELS = {"background": 0, "outer": 1, "inner": 2}
N_CASES = N_SPLITS  # training cases per fixture dataset: `check` and `plan` refuse fewer


def oblique_direction(angle_deg: float = 30.0) -> tuple[float, ...]:
    """Row-major 3x3 rotation about the scanner z axis, as SimpleITK wants it."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _write_volume(path: Path, array: np.ndarray, *, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
                  origin_xyz: Sequence[float] | None = None, direction: Sequence[float] | None = None,
                  is_vector: bool = False) -> Path:
    """Write a (Z, Y, X) or (Y, X) array; spacing is given in array order and reversed for SimpleITK."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(array), isVector=is_vector)
    dim = img.GetDimension()
    img.SetSpacing(tuple(float(v) for v in reversed(tuple(spacing_zyx)[-dim:])))
    if origin_xyz is not None:
        img.SetOrigin(tuple(float(v) for v in origin_xyz))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in direction))
    sitk.WriteImage(img, str(path))
    return path


def _write_4d(path: Path, channels: np.ndarray, *, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
              origin_xyz: Sequence[float] = (0.0, 0.0, 0.0)) -> Path:
    """Write a (C, Z, Y, X) array as one 4D NIfTI (MSD multi-modal layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vols = []
    for c in range(channels.shape[0]):
        v = sitk.GetImageFromArray(np.ascontiguousarray(channels[c]))
        v.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_zyx))))
        v.SetOrigin(tuple(float(o) for o in origin_xyz))
        vols.append(v)
    sitk.WriteImage(sitk.JoinSeries(vols), str(path))
    return path


_NIFTI_CODES = {"u1": 2, "i2": 4, "i4": 8, "f4": 16, "f8": 64, "i1": 256, "u2": 512, "u4": 768, "i8": 1024,
                "u8": 1280}


def _nifti_bytes(array: np.ndarray, *, version: int = 1, byteorder: str = "<",
                 spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), extension: bytes = b"") -> bytes:
    """A single-file NIfTI-1 or NIfTI-2 image (uncompressed) built byte by byte, in either byte order.

    ``array`` is (Z, Y, X) or (T, Z, Y, X); the 4th axis gets pixdim 0 (as MSD files do). The orientation is
    the identity qform (``qform_code`` 1); ``extension`` (a multiple of 16 bytes, 8-byte block header
    included) goes between the header and the data.
    """
    arr = np.asarray(array)
    code = _NIFTI_CODES[arr.dtype.str[1:]]
    dim = [arr.ndim, *reversed(arr.shape)] + [1] * (7 - arr.ndim)
    pixdim = [1.0, *reversed(tuple(spacing_zyx)[-3:])] + [0.0] * 4
    ext = (b"\x01\0\0\0" + extension) if extension else b"\0\0\0\0"
    bo = byteorder
    if version == 1:
        h = bytearray(348)
        offset = 348 + len(ext)
        struct.pack_into(bo + "i", h, 0, 348)
        struct.pack_into(bo + "8h", h, 40, *dim)
        struct.pack_into(bo + "2h", h, 70, code, 8 * arr.dtype.itemsize)
        struct.pack_into(bo + "8f", h, 76, *pixdim)
        struct.pack_into(bo + "f", h, 108, float(offset))
        struct.pack_into(bo + "b", h, 123, 10)  # mm, s
        struct.pack_into(bo + "h", h, 252, 1)  # qform_code; quaternion and offset stay 0
        h[344:348] = b"n+1\0"
    else:
        h = bytearray(540)
        offset = 540 + len(ext)
        struct.pack_into(bo + "i", h, 0, 540)
        h[4:12] = b"n+2\0\r\n\x1a\n"
        struct.pack_into(bo + "2h", h, 12, code, 8 * arr.dtype.itemsize)
        struct.pack_into(bo + "8q", h, 16, *dim)
        struct.pack_into(bo + "8d", h, 104, *pixdim)
        struct.pack_into(bo + "q", h, 168, offset)
        struct.pack_into(bo + "i", h, 344, 1)  # qform_code
        struct.pack_into(bo + "i", h, 500, 10)
    return bytes(h) + ext + arr.astype(arr.dtype.newbyteorder(bo)).tobytes()


def _write_nifti(path: Path, array: np.ndarray, **kwargs: Any) -> Path:
    """Write :func:`_nifti_bytes` to ``path``, gzip-compressed when it ends with ``.gz``."""
    data = _nifti_bytes(array, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def _edit_nifti_header(path: Path, *, dims_xyz: Sequence[int] | None = None,
                       pixdim_xyz: Sequence[float] | None = None) -> Path:
    """Overwrite ``dim`` and/or ``pixdim`` of a little-endian NIfTI-1 file (``.nii`` or ``.nii.gz``) in place."""
    path = Path(path)
    zipped = path.read_bytes()[:2] == b"\x1f\x8b"
    raw = bytearray(gzip.decompress(path.read_bytes()) if zipped else path.read_bytes())
    assert struct.unpack_from("<i", raw, 0)[0] == 348, "little-endian NIfTI-1 expected"
    if dims_xyz is not None:
        struct.pack_into(f"<{1 + len(dims_xyz)}h", raw, 40, len(dims_xyz), *dims_xyz)
    if pixdim_xyz is not None:
        struct.pack_into(f"<{len(pixdim_xyz)}f", raw, 80, *pixdim_xyz)
    path.write_bytes(gzip.compress(bytes(raw)) if zipped else bytes(raw))
    return path


def planted_case(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE_3D, *,
                 background: float = 0.0, outer: float = 60.0, inner: float = 150.0,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """An image with a nonzero body (zero margin), an outer block (label 1) and an inner block (label 2)."""
    z, y, x = shape
    image = np.full(shape, background, dtype=np.float32)
    body = (slice(1, z - 1), slice(2, y - 2), slice(3, x - 2))
    image[body] = 100.0 + rng.normal(0, 5, image[body].shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    label[2 : z - 2, 6 : y - 6, 6 : x - 6] = 1
    label[3 : z - 3, 9 : y - 9, 9 : x - 9] = 2
    image[label == 1] = outer + rng.normal(0, 2, int((label == 1).sum()))
    image[label == 2] = inner + rng.normal(0, 2, int((label == 2).sum()))
    return image, label


def _write_json(root: Path, meta: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class SynthDataset:
    """A written dataset and the facts the tests check against."""

    root: Path
    case_ids: list[str]
    spacing_zyx: tuple[float, ...]
    shape_zyx: tuple[int, ...]
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    test_ids: list[str] = field(default_factory=list)
    oblique_ids: list[str] = field(default_factory=list)
    ending: str = ".nii.gz"


def _nnunet_dataset(root: Path, *, n_cases: int = N_CASES, n_test: int = 1, channel_names: Sequence[str] = ("T2",),
                    spacing_zyx: Sequence[float] = SPACING_ANISO, shape: tuple[int, int, int] = SHAPE_3D,
                    oblique_every: int = 2, seed: int = 0, prefix: str = "case",
                    labels: dict[str, int] | None = None, ending: str = ".nii.gz",
                    label_values: tuple[int, int] = (1, 2)) -> SynthDataset:
    """nnU-Net v2 layout, one file per channel; every ``oblique_every``-th case has an oblique direction.

    ``label_values`` are the values the planted outer and inner blocks are written with (e.g. ``(1, 200)``
    for sparse labels); without ``labels`` they are declared as "outer" and "inner".
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = dict(zip(LABELS, (0, *label_values)))
    labels = dict(labels)
    lut = np.array([0, *label_values], dtype=np.uint8 if max(label_values) < 256 else np.uint16)
    ids, test_ids, oblique = [], [], []
    for i in range(n_cases + n_test):
        cid = f"{prefix}_{i:03d}"
        image, label = planted_case(rng, shape)
        label = lut[label]
        direction = oblique_direction(30.0 + i) if oblique_every and i % oblique_every == 1 else None
        origin = (float(-10 + i), float(5 * i), float(2.5 * i))
        folder = "imagesTr" if i < n_cases else "imagesTs"
        for c in range(len(channel_names)):
            _write_volume(root / folder / f"{cid}_{c:04d}{ending}", image * (1 + c), spacing_zyx=spacing_zyx,
                          origin_xyz=origin, direction=direction)
        if i < n_cases:
            _write_volume(root / "labelsTr" / f"{cid}{ending}", label, spacing_zyx=spacing_zyx, origin_xyz=origin,
                          direction=direction)
            ids.append(cid)
            if direction is not None:
                oblique.append(cid)
        else:
            test_ids.append(cid)
    _write_json(root, {
        "name": root.name,
        "channel_names": {str(c): n for c, n in enumerate(channel_names)},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": ending,
    })
    return SynthDataset(root, ids, tuple(spacing_zyx), shape, tuple(channel_names), labels, test_ids, oblique,
                        ending)


def _synthetic_fingerprint(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], *,
                           channel_names: Sequence[str] = ("MRI",), labels: dict[str, int] | None = None,
                           is_2d: bool = False, intensity: Sequence[Mapping[str, float]] | None = None,
                           classes: Mapping[str, ClassStats] | None = None, name: str = "Synth") -> Fingerprint:
    """A valid :class:`~automedseg.fingerprint.Fingerprint` of cases with these spacings and shapes (z, y, x).

    What the planner reads is set from the arguments: spacings, shapes, channels, labels, the pooled
    foreground ``intensity`` per channel and the per-case ``classes`` (the same for every case; default: every
    class absent, so no sizes or centroids). The rest is consistent filler: nothing cropped, an axis-aligned
    geometry at the origin, and the dataset summary computed from the cases like ``compute_fingerprint`` does.
    """
    from automedseg.fingerprint import (
        CaseFingerprint,
        ClassStats,
        DatasetSummary,
        Fingerprint,
        IntensityStats,
        modality_of,
    )
    from automedseg.geometry import Geometry

    default = {"mean": 100.0, "std": 20.0, "median": 100.0, "min": 0.0, "max": 300.0, "p00_5": 10.0,
               "p99_5": 250.0}
    pooled = [IntensityStats(**s) for s in (intensity if intensity is not None else [default] * len(channel_names))]
    labels = dict(labels or {"background": 0, "a": 1})
    absent = ClassStats(voxels=0, components=0)
    per_class = {str(v): (classes or {}).get(str(v), absent) for v in sorted(labels.values()) if v != 0}
    voxels = sum(c.voxels for c in per_class.values())
    no_sample = IntensityStats.of(np.array([]))
    cases = []
    for i, (sp, sh) in enumerate(zip(spacings, shapes)):
        spacing, shape = tuple(float(v) for v in sp), tuple(int(v) for v in sh)
        dims = 2 if shape[0] == 1 and spacing[0] == 999.0 else 3  # a 2D image: z spacing 999, like the readers
        cases.append(CaseFingerprint(
            case_id=f"c{i:03d}", spacing_mm=spacing, shape=shape, shape_after_crop=shape,
            crop_bbox=tuple((0, n) for n in shape),
            geometry=Geometry(size=shape[::-1][:dims], spacing=spacing[::-1][:dims], origin=(0.0,) * dims,
                              direction=tuple(float(a == b) for a in range(dims) for b in range(dims))),
            foreground_voxels=voxels, intensity=tuple(pooled) if voxels else (no_sample,) * len(channel_names),
            classes=per_class,
        ))
    return Fingerprint(
        dataset_name=name,
        layout="nnunet",
        channel_names=tuple(channel_names),
        modalities=tuple(modality_of(c) for c in channel_names),
        labels=labels,
        is_2d=is_2d,
        num_cases=len(cases),
        dataset=DatasetSummary.of_cases(cases, intensity=pooled, labels=labels.values()),
        cases=tuple(cases),
    )


def _small_network_plan(architecture: str, dims: int, *, widths: tuple[int, ...] = (4, 8, 8),
                        deep_supervision: bool = True, n_enc: int = 2, n_dec: int = 1) -> NetworkPlan:
    """A small anisotropic network plan: in-plane-only first downsampling, (1,3,3) first kernel in 3D."""
    from automedseg.plans import NetworkPlan

    n = len(widths)
    if dims == 3:
        kernels = ((1, 3, 3),) + ((3, 3, 3),) * (n - 1)
        strides = ((1, 1, 1), (1, 2, 2)) + ((2, 2, 2),) * (n - 2)
    else:
        kernels = ((3, 3),) + ((3, 1),) * (n - 1)
        strides = ((1, 1), (1, 2)) + ((2, 2),) * (n - 2)
    return NetworkPlan(
        architecture=architecture,
        features_per_stage=widths,
        kernel_sizes=kernels,
        strides=strides,
        n_conv_per_stage_encoder=(n_enc,) * n,
        n_conv_per_stage_decoder=(n_dec,) * (n - 1),
        deep_supervision=deep_supervision,
    )


BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Imports a script of ``benchmarks/`` by name (that folder on ``sys.path`` for the test), forgotten after it."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        monkeypatch.syspath_prepend(str(BENCHMARKS_DIR))
        loaded.append(name)
        return importlib.import_module(name)

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture
def small_network_plan() -> Callable[..., NetworkPlan]:
    """Factory: ``small_network_plan(architecture, dims, widths=, deep_supervision=, n_enc=, n_dec=)``."""
    return _small_network_plan


@pytest.fixture
def synthetic_fingerprint() -> Callable[..., Fingerprint]:
    """Factory: ``synthetic_fingerprint(spacings, shapes, channel_names=, labels=, is_2d=, intensity=, classes=)``."""
    return _synthetic_fingerprint


@pytest.fixture
def write_volume() -> Callable[..., Path]:
    """``write_volume(path, array_zyx, spacing_zyx=..., origin_xyz=..., direction=..., is_vector=...)``."""
    return _write_volume


@pytest.fixture
def write_4d() -> Callable[..., Path]:
    """``write_4d(path, channels_czyx, spacing_zyx=..., origin_xyz=...)``: one 4D NIfTI (MSD layout)."""
    return _write_4d


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, array_zyx, version=1|2, byteorder="<"|">", spacing_zyx=..., extension=b"")``."""
    return _write_nifti


@pytest.fixture
def edit_nifti_header() -> Callable[..., Path]:
    """``edit_nifti_header(path, dims_xyz=..., pixdim_xyz=...)``: lie about size or spacing in a NIfTI-1 header."""
    return _edit_nifti_header


@pytest.fixture
def write_nnunet_dataset() -> Callable[..., SynthDataset]:
    """Factory: ``write_nnunet_dataset(root, n_cases=5, channel_names=("T2",), spacing_zyx=..., ...)``."""
    return _nnunet_dataset


@pytest.fixture
def nnunet_3d(tmp_path: Path) -> SynthDataset:
    """(a) nnU-Net v2 layout: 5 anisotropic (3.0, 0.8, 0.8) mm cases, labels 1 and 2, 2 oblique, 1 test case."""
    return _nnunet_dataset(tmp_path / "Dataset001_Aniso")


@pytest.fixture
def nnunet_2ch(tmp_path: Path) -> SynthDataset:
    """nnU-Net v2 layout with two channel files per case (T1, T2)."""
    return _nnunet_dataset(tmp_path / "Dataset002_TwoChannel", channel_names=("T1", "T2"), oblique_every=0)


@pytest.fixture
def msd_4d(tmp_path: Path) -> SynthDataset:
    """(b) MSD layout: 4D two-modality NIfTI images, labels stored as float32 with integral values."""
    root = tmp_path / "Task05_Multi"
    rng = np.random.default_rng(1)
    spacing = (2.0, 1.0, 1.0)
    ids, training = [], []
    for i in range(N_CASES):
        cid = f"multi_{i:03d}"
        image, label = planted_case(rng)
        channels = np.stack([image, 2.0 * image + 1.0]).astype(np.float32)
        _write_4d(root / "imagesTr" / f"{cid}.nii.gz", channels, spacing_zyx=spacing)
        _write_volume(root / "labelsTr" / f"{cid}.nii.gz", label.astype(np.float32), spacing_zyx=spacing)
        ids.append(cid)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    image, _ = planted_case(rng)
    _write_4d(root / "imagesTs" / "multi_010.nii.gz", np.stack([image, image]), spacing_zyx=spacing)
    _write_json(root, {
        "name": "Multi",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "outer", "2": "inner"},
        "numTraining": N_CASES,
        "numTest": 1,
        "training": training,
        "test": ["./imagesTs/multi_010.nii.gz"],
    })
    return SynthDataset(root, ids, spacing, SHAPE_3D, ("FLAIR", "T1w"), dict(LABELS), ["multi_010"])


def _png_dataset(root: Path, *, rgb: bool, n_cases: int = N_CASES, n_test: int = 1) -> SynthDataset:
    rng = np.random.default_rng(2 if rgb else 3)
    y, x = SHAPE_2D
    ids, test_ids = [], []
    for i in range(n_cases + n_test):
        cid = f"img_{i:03d}"
        label = np.zeros(SHAPE_2D, dtype=np.uint8)
        label[4 + i : 12 + i, 5:15] = 1
        gray = rng.integers(20, 60, SHAPE_2D).astype(np.uint8)
        gray[label == 1] = 200
        folder = "imagesTr" if i < n_cases else "imagesTs"
        if rgb:
            arr = np.stack([gray, gray // 2, 255 - gray], axis=-1)
            _write_volume(root / folder / f"{cid}_0000.png", arr, is_vector=True)
        else:
            _write_volume(root / folder / f"{cid}_0000.png", gray)
        if i < n_cases:
            _write_volume(root / "labelsTr" / f"{cid}.png", label)
            ids.append(cid)
        else:
            test_ids.append(cid)
    names = ("R", "G", "B") if rgb else ("gray",)
    _write_json(root, {
        "name": root.name,
        "channel_names": {str(c): n for c, n in enumerate(names)},
        "labels": {"background": 0, "object": 1},
        "numTraining": n_cases,
        "file_ending": ".png",
    })
    return SynthDataset(root, ids, (999.0, 1.0, 1.0), (1, y, x), names, {"background": 0, "object": 1}, test_ids,
                        ending=".png")


@pytest.fixture(scope="session")
def write_png_dataset() -> Callable[..., SynthDataset]:
    """Factory: ``write_png_dataset(root, rgb=False)``: the 2D PNG dataset of ``png_gray`` / ``png_rgb``."""
    return _png_dataset


@pytest.fixture
def png_gray(tmp_path: Path) -> SynthDataset:
    """(c) 2D grayscale PNG dataset, nnU-Net layout."""
    return _png_dataset(tmp_path / "Dataset003_Gray", rgb=False)


@pytest.fixture
def png_rgb(tmp_path: Path) -> SynthDataset:
    """(c) 2D RGB PNG dataset: one ``_0000.png`` file per case holds R, G and B (nnU-Net convention)."""
    return _png_dataset(tmp_path / "Dataset004_RGB", rgb=True)


@pytest.fixture
def ct_dataset(tmp_path: Path) -> SynthDataset:
    """(d) CT-like dataset: channel "CT", air -1000 HU everywhere outside the body, tissue ~40 HU."""
    root = tmp_path / "Dataset005_CT"
    rng = np.random.default_rng(4)
    spacing = (2.5, 0.7, 0.7)
    ids = []
    for i in range(N_CASES):
        cid = f"ct_{i:03d}"
        image, label = planted_case(rng, background=-1000.0, outer=40.0, inner=300.0)
        _write_volume(root / "imagesTr" / f"{cid}_0000.nii.gz", image, spacing_zyx=spacing)
        _write_volume(root / "labelsTr" / f"{cid}.nii.gz", label, spacing_zyx=spacing)
        ids.append(cid)
    _write_json(root, {
        "name": "CTlike",
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": N_CASES,
        "file_ending": ".nii.gz",
    })
    return SynthDataset(root, ids, spacing, SHAPE_3D, ("CT",), dict(LABELS))


@pytest.fixture
def demo_dataset(tmp_path: Path) -> Path:
    """The package's own demo dataset, 5 training cases and 1 test case."""
    from automedseg.demo import make_demo_dataset

    return make_demo_dataset(tmp_path / "Dataset_Demo", n_cases=N_CASES, n_test=1, seed=0)


@pytest.fixture(scope="module")
def search_planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The demo dataset (8 cases) planned for 3d_fullres on the nominal 2-core CPU with a 30 s fold budget and
    preprocessed: (dataset, Workspace). One per test module (searches write into its plans.json)."""
    from automedseg.demo import make_demo_dataset
    from automedseg.pipeline import run_plan
    from automedseg.workspace import Workspace

    root = tmp_path_factory.mktemp("search")
    dataset = make_demo_dataset(root / "Dataset_Demo", n_cases=8, n_test=0, seed=1)
    ws = Workspace.for_dataset(dataset)
    run_plan(dataset, ws, configurations=["3d_fullres"], jobs=1, device="reference-cpu-2core", time_budget_s=30.0)
    return dataset, ws


@pytest.fixture
def search_ws(search_planned: tuple[Path, Any], tmp_path: Path) -> Any:
    """A private copy of :func:`search_planned`'s work folder (plans.json, splits, preprocessed cache)."""
    import shutil

    from automedseg.workspace import Workspace

    src = search_planned[1].root
    dst = tmp_path / "work"
    dst.mkdir()
    for name in ("plans.json", "splits.json", "fingerprint.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    shutil.copytree(src / "preprocessed", dst / "preprocessed")
    return Workspace(dst)


def _moved(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(torch.int16) if obj.dtype == torch.uint8 else obj.clone()
    if isinstance(obj, dict):
        return {k: _moved(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_moved(v) for v in obj]
    return obj


@pytest.fixture
def moved() -> Callable[[Any], Any]:
    """``moved(obj)``: ``obj`` with its tensors changed as a ``map_location`` to a GPU changes them, as far as a
    CPU-only machine allows: byte tensors stop being CPU ``ByteTensor`` s (int16 here, same values), so
    ``torch.set_rng_state`` rejects them exactly as it rejects a CUDA tensor."""
    return _moved


@dataclass
class WindowCache:
    """A tiny preprocessed cache (what :class:`automedseg.augmentation.PatchSampler` reads) and its cases."""

    folder: Path
    case_ids: list[str]
    shape: tuple[int, int, int]


@pytest.fixture
def window_cache(tmp_path: Path) -> WindowCache:
    """Two cases of two channels, (12, 20, 20), label 1 in a block and label 2 in a smaller block inside it."""
    folder = tmp_path / "preprocessed" / "data_id"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    shape = (12, 20, 20)
    ids = ["win_a", "win_b"]
    for i, case in enumerate(ids):
        seg = np.zeros((1, *shape), dtype=np.int8)
        seg[0, 2:10, 4 + i : 15 + i, 5:16] = 1
        seg[0, 4:8, 7 + i : 11 + i, 8:12] = 2
        data = (rng.normal(0, 0.1, (2, *shape)) + seg).astype(np.float32)
        np.save(folder / f"{case}.npy", data)
        np.save(folder / f"{case}_seg.npy", seg)
        np.savez(folder / f"{case}_locs.npz",
                 **{f"class_{k}": np.argwhere(seg[0] == k).astype(np.int64) for k in (1, 2)})
    return WindowCache(folder, ids, shape)


def _configuration_plan(patch_size: Sequence[int], *, batch_size: int = 2, oversample: float = 0.33,
                        val_iterations: int = 2, seed: int = 3) -> Any:
    """A small plain-U-Net configuration of the cache fixtures' ``data_id`` (2D or 3D from ``patch_size``)."""
    from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, TrainingPlan

    dims = len(patch_size)
    return ConfigurationPlan(
        name=f"{dims}d", data_identifier="data_id", dims=dims, spacing_mm=(1.0, 1.0, 1.0),
        patch_size=tuple(int(p) for p in patch_size), batch_size=batch_size, median_shape=(12, 20, 20),
        normalization=(), image_order=3, label_order=1, separate_z=False, out_of_plane_order=0,
        network=NetworkPlan(architecture="plain_unet", features_per_stage=(4, 8), kernel_sizes=((3,) * dims,) * 2,
                            strides=((1,) * dims, (2,) * dims), n_conv_per_stage_encoder=(1, 1),
                            n_conv_per_stage_decoder=(1,)),
        augmentation=AugmentationPlan(),
        training=TrainingPlan(epochs=1, iterations_per_epoch=1, val_iterations=val_iterations, num_workers=0,
                              oversample_foreground=oversample, seed=seed))


@pytest.fixture
def configuration_plan() -> Callable[..., Any]:
    """``configuration_plan(patch_size, batch_size=2, oversample=0.33, val_iterations=2, seed=3)``: a small
    :class:`~automedseg.plans.ConfigurationPlan` for the cache fixtures (``data_id``)."""
    return _configuration_plan


@dataclass
class DecoyCache:
    """A preprocessed cache whose cases hold a foreground block (label 1) and, far from it, a decoy: a blob as
    bright as the foreground but labelled background. A model that thresholds the intensity finds the block and
    the decoy; a patch centred on the foreground never reaches the decoy."""

    folder: Path
    case_ids: list[str]
    foreground_voxels: int  # per case
    decoy_voxels: int  # per case


@pytest.fixture
def decoy_cache(tmp_path: Path) -> DecoyCache:
    """Three cases of one channel, (4, 48, 48): foreground [1:3, 4:10, 4:10], decoy [1:3, 34:44, 34:44]."""
    folder = tmp_path / "preprocessed" / "data_id"
    folder.mkdir(parents=True)
    ids = ["decoy_a", "decoy_b", "decoy_c"]
    seg = np.zeros((1, 4, 48, 48), dtype=np.int8)
    seg[0, 1:3, 4:10, 4:10] = 1
    data = seg.astype(np.float32)
    data[0, 1:3, 34:44, 34:44] = 1.0
    for case in ids:
        np.save(folder / f"{case}.npy", data)
        np.save(folder / f"{case}_seg.npy", seg)
        np.savez(folder / f"{case}_locs.npz", class_1=np.argwhere(seg[0] == 1).astype(np.int64))
    return DecoyCache(folder, ids, foreground_voxels=2 * 6 * 6, decoy_voxels=2 * 10 * 10)


# --- 2D source folders as people have them (for `automedseg import`) ---------------------------------------

MASK_COLOURS = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 255, 0)}  # class -> RGB of colour-coded masks


def _two_discs(i: int, shape: tuple[int, int] = SHAPE_2D, *, classes: int = 2) -> np.ndarray:
    """Class map (Y, X) of case ``i``: class 1 a disc of radius 5, class 2 (if ``classes`` is 2) a disc of 3."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.uint8)
    out[(yy - 7 - i % 3) ** 2 + (xx - 7) ** 2 <= 25] = 1
    if classes == 2:
        out[(yy - 14) ** 2 + (xx - 17 - i % 2) ** 2 <= 9] = 2
    return out


def encode_mask(classes: np.ndarray, style: str) -> tuple[np.ndarray, str]:
    """A class map as a mask file would hold it, and the Pillow mode to save it with.

    Styles: ``binary255`` / ``binary1`` (grey 0/255 or 0/1, every class as foreground), ``grey`` (class * 60),
    ``palette`` (palette indices = classes), ``rgb`` (:data:`MASK_COLOURS`), ``outline`` (the 1-pixel border of
    the foreground, 0/255), ``open_outline`` (that border with its right half missing), ``rgb_grey`` (0/255 as RGB).
    """
    from scipy import ndimage

    fg = classes > 0
    if style == "binary255":
        return fg.astype(np.uint8) * 255, "L"
    if style == "binary1":
        return fg.astype(np.uint8), "L"
    if style == "grey":
        return classes.astype(np.uint8) * 60, "L"
    if style == "palette":
        return classes.astype(np.uint8), "P"
    if style == "rgb":
        return np.array([MASK_COLOURS[c] for c in range(3)], np.uint8)[classes], "RGB"
    if style == "rgb_grey":
        return np.repeat((fg.astype(np.uint8) * 255)[..., None], 3, axis=-1), "RGB"
    if style in ("outline", "open_outline"):
        border = fg & ~ndimage.binary_erosion(fg)
        if style == "open_outline":
            border[:, classes.shape[1] // 3:] = False
        return border.astype(np.uint8) * 255, "L"
    raise ValueError(style)


def _save_raster(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Save with Pillow (format from the ending); ``P`` gets a palette with :data:`MASK_COLOURS`."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.new("P", (array.shape[1], array.shape[0]))
        im.putdata(array.ravel().tolist())
        im.putpalette([v for c in range(3) for v in MASK_COLOURS[c]] + [0, 0, 0] * 253)
    else:
        im = Image.fromarray(array)
    im.save(path)
    return path


def _case_image(i: int, classes: np.ndarray, *, rgb: bool = False, dtype: Any = np.uint8) -> np.ndarray:
    """An image whose brightness follows the classes, with a little noise (grey (Y, X) or RGB (Y, X, 3))."""
    rng = np.random.default_rng(i)
    scale = 200 if dtype == np.uint16 else 1
    grey = (30 + 80 * classes + rng.integers(0, 20, classes.shape)) * scale
    if rgb:
        return np.stack([grey, grey // 2, 255 - grey], axis=-1).astype(dtype)
    return grey.astype(dtype)


def _write_2d_source(root: Path, *, n: int = N_CASES, image: str = "{i:02d}_img.png",
                     mask: str | None = "{i:02d}_mask.png", fov: str | None = None, style: str = "binary255",
                     rgb: bool = False, dtype: Any = np.uint8, classes: int = 2) -> dict[str, np.ndarray]:
    """Write ``n`` cases into ``root`` named by the templates (``{i}`` = case number, may contain folders).

    Returns:
        Class map per image stem (what the imported labels must hold, up to the label order).
    """
    truth = {}
    for i in range(n):
        cls = _two_discs(i, classes=classes)
        img_path = root / image.format(i=i)
        _save_raster(img_path, _case_image(i, cls, rgb=rgb, dtype=dtype))
        if mask is not None:
            array, mode = encode_mask(cls, style)
            _save_raster(root / mask.format(i=i), array, mode)
        if fov is not None:
            inside = np.zeros(cls.shape, np.uint8)
            inside[1:-1, 1:-1] = 255
            _save_raster(root / fov.format(i=i), inside)
        truth[img_path.name.rsplit(".", 1)[0]] = cls
    return truth


@pytest.fixture
def write_2d_source() -> Callable[..., dict[str, np.ndarray]]:
    """``write_2d_source(root, n=5, image="{i:02d}_img.png", mask="{i:02d}_mask.png", fov=None, style="binary255",
    rgb=False, dtype=np.uint8, classes=2)``: a folder of 2D images and masks as people have them."""
    return _write_2d_source


@pytest.fixture
def save_raster() -> Callable[..., Path]:
    """``save_raster(path, array, mode=None)``: save with Pillow; mode ``P`` writes a palette image."""
    return _save_raster


@pytest.fixture
def two_discs() -> Callable[..., np.ndarray]:
    """``two_discs(i, shape=(20, 24), classes=2)``: the class map of synthetic 2D case ``i``."""
    return _two_discs


@pytest.fixture
def case_image() -> Callable[..., np.ndarray]:
    """``case_image(i, classes, rgb=False, dtype=np.uint8)``: the image ``write_2d_source`` writes for case ``i``."""
    return _case_image

@pytest.fixture(autouse=True, scope="session")
def _calibration_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """The CLI's calibration cache (``AUTOMEDSEG_CALIBRATION``) is a temporary file, never the user's ~/.cache."""
    old = os.environ.get("AUTOMEDSEG_CALIBRATION")
    os.environ["AUTOMEDSEG_CALIBRATION"] = str(tmp_path_factory.mktemp("calibration") / "calibration.json")
    yield
    if old is None:
        os.environ.pop("AUTOMEDSEG_CALIBRATION", None)
    else:
        os.environ["AUTOMEDSEG_CALIBRATION"] = old


def _trained_demo(root: Path, *, validate: bool) -> tuple[Path, Path]:
    """Demo dataset (6 cases, 2 test cases) under ``root``, planned for 3d_fullres through the CLI, and fold 0
    trained for 1 epoch of 2 iterations; returns (dataset, work folder)."""
    from click.testing import CliRunner

    from automedseg.cli import main
    from automedseg.demo import make_demo_dataset

    dataset = make_demo_dataset(root / "Dataset_Demo", n_cases=6, n_test=2, seed=5)
    work = root / "work"
    runner = CliRunner()
    r = runner.invoke(main, ["plan", str(dataset), "--work-dir", str(work), "-c", "3d_fullres", "-j", "1",
                             "--device", "reference-cpu-2core", "--time-budget", "1m"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["train", str(dataset), "--work-dir", str(work), "-f", "0", "--epochs", "1",
                             "--iterations-per-epoch", "2", "--workers", "0", "--threads", "1", "--device", "cpu",
                             *([] if validate else ["--no-validate"])])
    assert r.exit_code == 0, r.output
    return dataset, work


@pytest.fixture(scope="session")
def trained_demo() -> Callable[..., tuple[Path, Path]]:
    """Factory: ``trained_demo(root, validate=...)`` -> (dataset, work folder) with fold 0 trained briefly."""
    return _trained_demo


@pytest.fixture(scope="session")
def trained_demo_validated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """:func:`_trained_demo` with validation, trained once per session: (dataset, work folder).

    Shared: copy the work folder before changing anything in it.
    """
    return _trained_demo(tmp_path_factory.mktemp("demo_validated"), validate=True)


@pytest.fixture(scope="session")
def trained_demo_best(trained_demo_validated: tuple[Path, Path],
                      tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of ``trained_demo_validated`` after ``find-best``: (dataset, work folder); copy before changing it."""
    import shutil

    from click.testing import CliRunner

    from automedseg.cli import main

    dataset, validated = trained_demo_validated
    work = Path(shutil.copytree(validated, tmp_path_factory.mktemp("demo_best") / "work"))
    r = CliRunner().invoke(main, ["find-best", str(dataset), "--work-dir", str(work), "--no-ensembles"])
    assert r.exit_code == 0, r.output
    return dataset, work


def _write_dicom_series(volume: sitk.Image, folder: Path, *, series_number: int = 3,
                        study_uid: str = "1.2.826.0.1.3680043.8.498.1") -> dict[str, str]:
    """Write a 3D int16 SimpleITK image as a CT DICOM series, one file per slice (``slice_NNN.dcm``).

    Returns:
        The UIDs written: ``study``, ``series`` and ``frame_of_reference``.
    """
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    key = int(hashlib.sha256(str(folder).encode()).hexdigest()[:12], 16)
    uids = {"study": study_uid, "series": f"1.2.826.0.1.3680043.8.498.2.{key}",
            "frame_of_reference": f"1.2.826.0.1.3680043.8.498.3.{key}"}
    d = volume.GetDirection()
    tags = {"0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0060": "CT", "0020|000d": uids["study"],
            "0020|000e": uids["series"], "0020|0052": uids["frame_of_reference"], "0010|0010": "Synthetic^Patient",
            "0010|0020": "SYN001", "0010|0030": "19700101", "0010|0040": "O", "0008|0020": "20260101",
            "0008|0030": "120000", "0008|0050": "ACC1", "0020|0010": "STUDY1", "0008|0090": "",
            "0020|0011": str(series_number), "0028|1052": "0", "0028|1053": "1",
            "0018|0050": f"{volume.GetSpacing()[2]:g}",
            "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(volume.GetDepth()):
        s = volume[:, :, i]
        for k, v in tags.items():
            s.SetMetaData(k, v)
        s.SetMetaData("0008|0018", f"{uids['series']}.{i + 1}")
        s.SetMetaData("0020|0013", str(i + 1))
        s.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, i))))
        writer.SetFileName(str(folder / f"slice_{i:03d}.dcm"))
        writer.Execute(s)
    return uids


@pytest.fixture
def write_dicom_series() -> Callable[..., dict[str, str]]:
    """``write_dicom_series(volume, folder, series_number=3)``: a 3D SimpleITK image as a CT DICOM series."""
    return _write_dicom_series


def _untrained_model(dataset: Path, work: Path, configuration: str, *, seed: int = 0) -> Path:
    """``dataset`` planned into ``work`` for ``configuration`` (not preprocessed) and a fold 0 with random weights:
    all that inference reads (the fold's plan copy and a checkpoint). Returns the work folder."""
    import dataclasses

    from automedseg.network import build_network
    from automedseg.pipeline import run_plan
    from automedseg.workspace import Workspace

    ws = Workspace(work)
    plans = run_plan(dataset, ws, configurations=[configuration], jobs=1, device="reference-cpu-2core",
                     time_budget_s=60.0, preprocess=False)
    config = plans.configuration(configuration)
    torch.manual_seed(seed)
    model = build_network(config.network, in_channels=len(plans.channel_names), num_classes=plans.num_classes,
                          dims=config.dims)
    fold_dir = ws.fold_dir(configuration, 0)
    fold_dir.mkdir(parents=True, exist_ok=True)
    dataclasses.replace(plans, configurations={configuration: config}).save(fold_dir / "plans.json")
    torch.save({"model": model.state_dict()}, fold_dir / "checkpoint_final.pt")
    return work


@pytest.fixture(scope="session")
def untrained_model() -> Callable[..., Path]:
    """Factory: ``untrained_model(dataset, work, configuration)`` -> the work folder, planned, with a fold 0 of
    random weights (inference needs nothing more; nothing is trained or preprocessed)."""
    return _untrained_model


def _cpus_allowed(pid: int) -> set[int]:
    """The cores ``pid`` may run on, from ``/proc/<pid>/status`` (``Cpus_allowed_list: 0-2,5``)."""
    line = next(v for v in Path(f"/proc/{pid}/status").read_text().splitlines() if v.startswith("Cpus_allowed_list"))
    cpus: set[int] = set()
    for part in line.split(":")[1].strip().split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


@pytest.fixture
def allowed_cpus() -> Callable[[int], set[int]]:
    """A reader of the cores a process may run on (pid -> set); skips where pinning cannot be tested."""
    if not (hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
            and Path("/proc/self/status").is_file()):
        pytest.skip("needs os.sched_setaffinity, /proc and at least 2 usable cores")
    return _cpus_allowed
