"""Preprocessing: crop to nonzero, transpose, normalise, resample; and the exact inverse for predictions.

Training cases are written to a cache the trainer memory-maps (``preprocessed/<data_identifier>/``):
``<case>.npy`` (float32 ``(C, Z, Y, X)``), ``<case>_seg.npy`` (``(1, Z, Y, X)`` training indices
``0..K-1`` of :meth:`Plans.to_indices`, int8 up to 128 classes, else int16), ``<case>_locs.npz``
(per-class voxel coordinates for foreground oversampling, keyed ``class_<index>``) and ``<case>.json``
(the geometry and bookkeeping needed to undo every step). Inference calls :func:`preprocess_image` and
:func:`restore_probabilities` from here, so it needs the plan and nothing of the training code.

Example:
    >>> img = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    >>> resample_image(img, (1, 4, 8), order=1).shape
    (1, 1, 4, 8)
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from automedseg.artifacts import read_json_file
from automedseg.atomic import fsync_path, remove_stale_temp_files
from automedseg.errors import InputError
from automedseg.fingerprint import nonzero_bbox
from automedseg.intensity_matching import match_to_landmarks
from automedseg.io import (
    CaseFiles,
    DatasetSpec,
    Geometry,
    atomic_save_npy,
    atomic_save_npz,
    atomic_write_json,
    read_images,
    read_label,
)
from automedseg.parallel import parallel_map
from automedseg.plans import ChannelNormalization, ConfigurationPlan, Plans

MAX_LOCATIONS_PER_CLASS = 10_000


# --- resampling ----------------------------------------------------------------------------------------


def _zoom(volume: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample one 3D volume to ``new_shape`` with voxel centres aligned (like skimage's resize)."""
    old = np.asarray(volume.shape, dtype=float)
    new = np.asarray(new_shape, dtype=float)
    if tuple(volume.shape) == tuple(int(s) for s in new_shape):
        return volume
    scale = old / new
    offset = 0.5 * scale - 0.5
    return ndimage.affine_transform(volume, scale, offset=offset, output_shape=tuple(int(s) for s in new_shape),
                                    order=order, mode="nearest", prefilter=order > 1)


def resample_image(image: np.ndarray, new_shape: Sequence[int], *, order: int = 3,
                   separate_z: bool = False, out_of_plane_order: int = 0) -> np.ndarray:
    """Resample a ``(C, Z, Y, X)`` array to spatial ``new_shape``.

    With ``separate_z`` the in-plane axes are resampled with ``order`` and z with ``out_of_plane_order``
    (nnU-Net's treatment of anisotropic data).
    """
    new_shape = tuple(int(s) for s in new_shape)
    if image.shape[1:] == new_shape:
        return image
    out = np.empty((image.shape[0], *new_shape), dtype=np.float32)
    for c in range(image.shape[0]):
        vol = image[c].astype(np.float32, copy=False)
        if separate_z and vol.shape[0] != new_shape[0]:
            vol = _zoom(vol, (vol.shape[0], *new_shape[1:]), order)
            vol = _zoom(vol, new_shape, out_of_plane_order)
        else:
            vol = _zoom(vol, new_shape, order)
        out[c] = vol
    return out


def resample_labels(label: np.ndarray, new_shape: Sequence[int], *, order: int = 1,
                    separate_z: bool = False, out_of_plane_order: int = 0) -> np.ndarray:
    """Resample an integer ``(Z, Y, X)`` label map: each class one-hot, interpolated, thresholded at 0.5."""
    new_shape = tuple(int(s) for s in new_shape)
    if label.shape == new_shape:
        return label
    out = np.zeros(new_shape, dtype=label.dtype)
    for k in np.unique(label):
        if k == 0:
            continue
        onehot = (label == k).astype(np.float32)[None]
        res = resample_image(onehot, new_shape, order=order, separate_z=separate_z,
                             out_of_plane_order=out_of_plane_order)[0]
        out[res >= 0.5] = k
    return out


def normalize(image: np.ndarray, schemes: Sequence[ChannelNormalization]) -> np.ndarray:
    """Normalise each channel of a ``(C, Z, Y, X)`` float array as the plan says.

    A channel with ``landmarks`` is first standardised: its nonzero intensities mapped onto them
    (:func:`~automedseg.intensity_matching.match_to_landmarks`).

    Example:
        >>> x = np.array([[[[1.0, 3.0]]]], dtype=np.float32)
        >>> normalize(x, [ChannelNormalization("zscore")]).ravel().tolist()
        [-1.0, 1.0]
    """
    if len(schemes) != image.shape[0]:
        raise ValueError(f"the plan normalises {len(schemes)} channel(s), the image has {image.shape[0]}")
    out = np.empty(image.shape, dtype=np.float32)
    for c, norm in enumerate(schemes):
        x = image[c].astype(np.float32, copy=False)
        if norm.landmarks is not None:
            x = match_to_landmarks(x, reference=norm.landmarks)
        if norm.scheme == "ct":
            assert norm.clip_low is not None and norm.clip_high is not None
            assert norm.mean is not None and norm.std is not None
            out[c] = (np.clip(x, norm.clip_low, norm.clip_high) - norm.mean) / max(norm.std, 1e-8)
        elif norm.scheme == "zscore":
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif norm.scheme == "rgb_to_01":
            out[c] = x / 255.0
        else:
            out[c] = x
    return out


# --- forward and inverse ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseProperties:
    """What is needed to map a prediction back onto the original image."""

    case_id: str
    geometry: Geometry
    original_shape: tuple[int, int, int]
    crop_bbox: tuple[tuple[int, int], ...]
    shape_after_crop_transposed: tuple[int, int, int]
    spacing_transposed_mm: tuple[float, float, float]
    shape_after_resample: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "geometry": self.geometry.to_dict(),
            "original_shape": list(self.original_shape),
            "crop_bbox": [list(b) for b in self.crop_bbox],
            "shape_after_crop_transposed": list(self.shape_after_crop_transposed),
            "spacing_transposed_mm": list(self.spacing_transposed_mm),
            "shape_after_resample": list(self.shape_after_resample),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseProperties:
        return cls(
            case_id=d["case_id"],
            geometry=Geometry.from_dict(d["geometry"]),
            original_shape=tuple(d["original_shape"]),  # type: ignore[arg-type]
            crop_bbox=tuple(tuple(b) for b in d["crop_bbox"]),  # type: ignore[arg-type]
            shape_after_crop_transposed=tuple(d["shape_after_crop_transposed"]),  # type: ignore[arg-type]
            spacing_transposed_mm=tuple(d["spacing_transposed_mm"]),  # type: ignore[arg-type]
            shape_after_resample=tuple(d["shape_after_resample"]),  # type: ignore[arg-type]
        )


def target_shape(shape: Sequence[int], spacing_mm: Sequence[float], config: ConfigurationPlan) -> tuple[int, int, int]:
    """Shape after resampling to the configuration's spacing (2D configurations keep z)."""
    target = list(config.spacing_mm)
    if config.dims == 2 or shape[0] == 1:
        target[0] = spacing_mm[0]
    return tuple(max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing_mm, target))  # type: ignore[return-value]


def preprocess_image(image: np.ndarray, geometry: Geometry, plans: Plans, config: ConfigurationPlan, *,
                     case_id: str = "", label: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Crop, transpose, normalise and resample one image (and its label, for training).

    Args:
        image: float32 ``(C, Z, Y, X)`` as read by :func:`automedseg.io.read_images`.
        geometry: Its geometry.
        plans: The plan (for the axis order).
        config: The configuration (spacing, normalisation, resampling orders).
        case_id: Name recorded in the properties.
        label: Optional integer ``(Z, Y, X)`` label map.

    Returns:
        The preprocessed image, the preprocessed label (``None`` without one) and the properties.
    """
    bbox = nonzero_bbox(image)
    sl = tuple(slice(a, b) for a, b in bbox)
    img = image[(slice(None), *sl)]
    tf = list(plans.transpose_forward)
    img = img.transpose(0, *[t + 1 for t in tf])
    spacing = tuple(float(geometry.spacing_zyx[t]) for t in tf)
    cropped_shape = img.shape[1:]
    img = normalize(img, config.normalization)
    new_shape = target_shape(cropped_shape, spacing, config)
    img = resample_image(img, new_shape, order=config.image_order, separate_z=config.separate_z,
                         out_of_plane_order=config.out_of_plane_order)
    seg = None
    if label is not None:
        seg = label[sl].transpose(tf)
        seg = resample_labels(seg, new_shape, order=config.label_order, separate_z=config.separate_z,
                              out_of_plane_order=config.out_of_plane_order)
    props = CaseProperties(
        case_id=case_id,
        geometry=geometry,
        original_shape=tuple(image.shape[1:]),  # type: ignore[arg-type]
        crop_bbox=bbox,
        shape_after_crop_transposed=tuple(cropped_shape),  # type: ignore[arg-type]
        spacing_transposed_mm=spacing,  # type: ignore[arg-type]
        shape_after_resample=tuple(new_shape),  # type: ignore[arg-type]
    )
    return np.ascontiguousarray(img, dtype=np.float32), seg, props


def restore_probabilities(probabilities: np.ndarray, props: CaseProperties, plans: Plans,
                          config: ConfigurationPlan) -> np.ndarray:
    """Map class probabilities ``(K, Z', Y', X')`` from preprocessed space back to the original image.

    Resamples (order 1) to the cropped shape, undoes the transposition and pads the crop back with
    background (probability 1 for class 0).
    """
    probs = resample_image(probabilities.astype(np.float32, copy=False), props.shape_after_crop_transposed,
                           order=1, separate_z=config.separate_z, out_of_plane_order=config.out_of_plane_order)
    back = list(plans.transpose_backward)
    probs = probs.transpose(0, *[t + 1 for t in back])
    full = np.zeros((probs.shape[0], *props.original_shape), dtype=np.float32)
    full[0] = 1.0
    sl = tuple(slice(a, b) for a, b in props.crop_bbox)
    full[(slice(None), *sl)] = probs
    return full


# --- the training cache --------------------------------------------------------------------------------


def class_locations(seg: np.ndarray, *, labels: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """Coordinates ``(N, 3)`` of each foreground class, subsampled to at most 10000 per class.

    ``labels`` are the classes as ``seg`` holds them (the cache: training indices); the keys are
    ``class_<label>``, the key space :class:`automedseg.augmentation.PatchSampler` draws from.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for k in labels:
        if k == 0:
            continue
        coords = np.argwhere(seg == k)
        if len(coords) > MAX_LOCATIONS_PER_CLASS:
            coords = coords[np.sort(rng.choice(len(coords), MAX_LOCATIONS_PER_CLASS, replace=False))]
        out[f"class_{k}"] = coords.astype(np.int64)
    return out


def preprocessing_key(plans: Plans, config: ConfigurationPlan) -> str:
    """Hash of everything that changes the cache content; a cached case with another key is redone."""
    payload = {
        "transpose": plans.transpose_forward,
        "data_identifier": config.data_identifier,
        "spacing": config.spacing_mm,
        "normalization": [{k: v for k, v in n.__dict__.items() if v is not None or k != "landmarks"}
                          for n in config.normalization],  # no landmarks: the key as before they existed
        "orders": [config.image_order, config.label_order, config.separate_z, config.out_of_plane_order],
        "labels": plans.labels,
    }
    if plans.label_values != tuple(range(plans.num_classes)):  # sparse values: the cache holds indices
        payload["label_indices"] = list(plans.label_values)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def case_is_cached(folder: Path, case_id: str, key: str) -> bool:
    """True when the case's files exist and were made with the same preprocessing key."""
    meta = folder / f"{case_id}.json"
    if not meta.is_file():
        return False
    try:
        return read_case_meta(folder, case_id).preprocessing_key == key and all(
            (folder / f"{case_id}{s}").is_file() for s in (".npy", "_seg.npy", "_locs.npz")
        )
    except (OSError, InputError):
        return False


def _preprocess_worker(args: tuple[CaseFiles, DatasetSpec, Plans, str, Path, str]) -> str:
    case, spec, plans, config_name, folder, key = args
    config = plans.configurations[config_name]
    image, geometry = read_images(case, n_channels=len(spec.channel_names), spacing_2d_mm=spec.spacing_2d_mm)
    assert case.label is not None
    label, _ = read_label(case.label, spacing_2d_mm=spec.spacing_2d_mm)
    data, seg, props = preprocess_image(image, geometry, plans, config, case_id=case.case_id, label=label)
    assert seg is not None
    seg = plans.to_indices(seg)  # declared values -> training indices 0..K-1 (int8, int16 above 128 classes)
    locs = class_locations(seg, labels=range(plans.num_classes), seed=zlib.crc32(case.case_id.encode()))
    atomic_save_npy(folder / f"{case.case_id}.npy", data)
    atomic_save_npy(folder / f"{case.case_id}_seg.npy", seg[None])
    atomic_save_npz(folder / f"{case.case_id}_locs.npz", **locs)
    # The properties file is written last: its presence marks a complete case.
    write_case_meta(folder, CaseMeta(props, key, tuple(str(p.resolve()) for p in case.images),
                                     str(case.label.resolve())))
    return case.case_id


def preprocess_dataset(spec: DatasetSpec, plans: Plans, preprocessed_root: Path, *,
                       configurations: Sequence[str] | None = None, jobs: int = 2, overwrite: bool = False,
                       progress: bool = False) -> dict[str, int]:
    """Preprocess every training case for the given configurations; shared caches are made once.

    Returns:
        Number of cases (re)computed per data identifier.
    """
    names = list(configurations or plans.configurations)
    done: dict[str, int] = {}
    for name in names:
        config = plans.configuration(name)
        ident = config.data_identifier
        if ident in done:
            continue
        folder = Path(preprocessed_root) / ident
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(folder)
        key = preprocessing_key(plans, config)
        case_ids = [c.case_id for c in spec.cases]
        todo = [c for c in spec.cases if overwrite or not case_is_cached(folder, c.case_id, key)]
        done[ident] = len(todo)
        if not todo and read_cache_manifest(folder) == CacheManifest(key, tuple(case_ids)):
            continue  # complete and vouched for: nothing is rewritten
        # Withdraw the completion mark first: a run killed from here on leaves a cache training refuses.
        (folder / CACHE_MANIFEST).unlink(missing_ok=True)
        fsync_path(folder)
        for _ in parallel_map(_preprocess_worker, [(c, spec, plans, name, folder, key) for c in todo],
                              jobs=jobs, desc=f"preprocess {ident}", progress=progress):
            pass
        atomic_write_json(folder / CACHE_MANIFEST, {"preprocessing_key": key, "cases": case_ids})
    return done


# --- the completion mark of a cache ----------------------------------------------------------------------

#: Written last by :func:`preprocess_dataset`: the cache is complete for this key and exactly these cases.
CACHE_MANIFEST = "cache_complete.json"


@dataclass(frozen=True)
class CacheManifest:
    """What a completed preprocessing run vouches for."""

    preprocessing_key: str
    cases: tuple[str, ...]


def read_cache_manifest(folder: Path) -> CacheManifest | None:
    """The completion mark of a cache folder, or ``None`` when absent or unreadable."""
    try:
        data = json.loads((Path(folder) / CACHE_MANIFEST).read_text())
        return CacheManifest(str(data["preprocessing_key"]), tuple(str(c) for c in data["cases"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_cases(folder: Path, plans: Plans, config: ConfigurationPlan) -> list[str]:
    """The case ids of a complete cache made with this plan's preprocessing.

    Raises:
        InputError: The cache is missing, incomplete (``plan`` was interrupted) or made for another plan.
    """
    folder = Path(folder)
    manifest = read_cache_manifest(folder)
    if manifest is None:
        state = "is incomplete (was `automedseg plan` interrupted?)" if folder.is_dir() else "does not exist"
        raise InputError(f"{folder}: the preprocessed cache {state}; run `automedseg plan` again to finish it")
    if manifest.preprocessing_key != preprocessing_key(plans, config):
        raise InputError(f"{folder}: the preprocessed cache was made for another plan; run `automedseg plan` again")
    missing = [c for c in manifest.cases if not case_is_cached(folder, c, manifest.preprocessing_key)]
    if missing:
        raise InputError(f"{folder}: {len(missing)} cached case(s) are missing or damaged (e.g. {missing[0]}); "
                         "run `automedseg plan` again")
    return sorted(manifest.cases)


def load_case_properties(folder: Path, case_id: str) -> CaseProperties:
    """Read a cached case's properties."""
    meta = read_case_meta(folder, case_id)
    if meta.properties is None:
        raise InputError(f"{case_meta_path(folder, case_id)}: has no case properties (case_id, geometry, ...)")
    return meta.properties


@dataclass(frozen=True)
class CaseMeta:
    """A preprocessed case's ``<case>.json``: its properties, how it was made and its raw files.

    Attributes:
        properties: Geometry, crop and resampling of the case (``None``: a file that names only the raw files).
        preprocessing_key: :func:`preprocessing_key` of the plan it was made with (``None``: older caches).
        image_files: The raw image files (one per channel), absolute.
        label_file: The raw reference label file, absolute (``None`` when unknown).
    """

    properties: CaseProperties | None = None
    preprocessing_key: str | None = None
    image_files: tuple[str, ...] = ()
    label_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        props = self.properties.to_dict() if self.properties is not None else {}
        return {**props, "preprocessing_key": self.preprocessing_key,
                "image_files": list(self.image_files), "label_file": self.label_file}


def case_meta_path(folder: Path, case_id: str) -> Path:
    """``<preprocessed>/<data_identifier>/<case>.json``."""
    return Path(folder) / f"{case_id}.json"


def write_case_meta(folder: Path, meta: CaseMeta) -> None:
    """Write a case's JSON atomically (last of its files: its presence marks a complete case)."""
    assert meta.properties is not None, "a cached case has properties"
    atomic_write_json(case_meta_path(folder, meta.properties.case_id), meta.to_dict())


def read_case_meta(folder: Path, case_id: str) -> CaseMeta:
    """Read a preprocessed case's ``<case>.json``.

    Raises:
        FileNotFoundError: The case is not cached.
        InputError: The file is not JSON or lacks a field (the message names the file and the field).
    """
    path = case_meta_path(folder, case_id)
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object, got {type(data).__name__}")
    try:
        properties = CaseProperties.from_dict(data) if "case_id" in data else None
    except KeyError as e:
        raise InputError(f"{path}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: malformed case properties ({e})") from None
    key, images, label = data.get("preprocessing_key"), data.get("image_files", []), data.get("label_file")
    if key is not None and not isinstance(key, str):
        raise InputError(f"{path}: preprocessing_key: expected a string, got {key!r}")
    if not isinstance(images, list) or not all(isinstance(f, str) for f in images):
        raise InputError(f"{path}: image_files: expected a list of strings, got {images!r}")
    if label is not None and not isinstance(label, str):
        raise InputError(f"{path}: label_file: expected a string, got {label!r}")
    return CaseMeta(properties, key, tuple(images), label or None)
