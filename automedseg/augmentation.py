"""Training data pipeline: patches from the preprocessed cache to augmented batches.

Three layers, each usable on its own:

1. :class:`PatchSampler` reads patches from the memory-mapped cache (``<case>.npy``, ``<case>_seg.npy``,
   ``<case>_locs.npz``) with nnU-Net's foreground oversampling. It is a batchgenerators data loader
   (``next(sampler)`` returns a batch dict) and samples a patch larger than the training patch when the
   spatial augmentation rotates or scales, so that the transformed patch is covered by real image data
   (see :func:`sampling_patch_size`).
2. :func:`build_transforms` / :func:`build_validation_transforms` compose batchgenerators transforms:
   rotation and scaling (and optional elastic deformation) that crop back to the training patch, intensity
   augmentation, mirroring, deep-supervision targets (:func:`downsample_seg_for_deep_supervision`) and the
   conversion to contiguous arrays.
3. :func:`make_training_loader` / :func:`make_validation_loader` run sampler and transforms in background
   worker processes (or in-process for ``num_processes=0``) and wrap them in a :class:`BatchLoader`, an
   infinite iterator that measures how long ``next()`` waits and shuts the workers down on :meth:`close`
   or at the end of a ``with`` block.

Batches are dicts of numpy arrays, ready for ``torch.from_numpy`` (no copy)::

    {"data": float32 (B, C, *patch), "seg": int8 (B, 1, *patch), "keys": [case ids],
     "target": [int8 (B, 1, *patch // stride) for each deep-supervision level]}   # target: optional

Randomness: the sampler draws from its own ``np.random.Generator``; batchgenerators' transforms draw
from the global ``np.random`` and ``random`` modules, which every worker seeds from the loader seed and
its index. The in-process loader swaps a private copy of both global states in and out around each batch,
so it is deterministic for a given seed and leaves the caller's global random state untouched. Worker
``i`` of a background loader draws the same streams for every run with the same seed, and worker 0 draws
exactly what the in-process loader draws.

Example:
    >>> with make_training_loader(folder, train_ids, config) as loader:  # doctest: +SKIP
    ...     batch = next(loader)
    ...     loader.wait_seconds  # time the training loop spent waiting for batches
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    elastic_deform_coordinates,
    interpolate_img,
    rotate_coords_2d,
    rotate_coords_3d,
    scale_coords,
)
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform
from scipy.ndimage import map_coordinates

from automedseg.plans import AugmentationPlan, ConfigurationPlan

__all__ = [
    "BatchLoader",
    "Convert2DTo3DTransform",
    "Convert3DTo2DTransform",
    "DeepSupervisionTargetsTransform",
    "PatchSampler",
    "RotateScaleCropTransform",
    "ToContiguousArraysTransform",
    "build_transforms",
    "build_validation_transforms",
    "downsample_seg_for_deep_supervision",
    "make_training_loader",
    "make_validation_loader",
    "sampling_patch_size",
]

Stride = Sequence[int]


# --- seeds ------------------------------------------------------------------------------------------


def _derive_seed(*entropy: int) -> int:
    """A 32-bit seed (what ``np.random.seed`` accepts) derived from integers, stable across runs."""
    return int(np.random.SeedSequence([int(e) % (2**63) for e in entropy]).generate_state(1)[0])


_TAG_SAMPLER = 1
_TAG_GLOBAL = 2
_TAG_VALIDATION = 3


# --- initial patch size -----------------------------------------------------------------------------


def _rotation_matrices(angles: np.ndarray, dim: int) -> np.ndarray:
    """Rotation matrices for angle tuples (N, 1) in 2D or (N, 3) in 3D (one angle per axis)."""
    if dim == 2:
        c, s = np.cos(angles[:, 0]), np.sin(angles[:, 0])
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    mats = np.broadcast_to(np.eye(3), (len(angles), 3, 3)).copy()
    for axis in range(3):
        c, s = np.cos(angles[:, axis]), np.sin(angles[:, axis])
        r = np.broadcast_to(np.eye(3), (len(angles), 3, 3)).copy()
        i, j = [a for a in range(3) if a != axis]
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        mats = mats @ r
    return mats


def _rotated_extent(size: Sequence[int], angle_range: tuple[float, float]) -> np.ndarray:
    """Bounding box of a box of ``size`` rotated by any angle in ``angle_range`` (about every axis)."""
    dim = len(size)
    lo, hi = float(angle_range[0]), float(angle_range[1])
    angles_1d = np.unique(np.clip(np.concatenate([np.linspace(lo, hi, 13), [0.0]]), lo, hi))
    n_axes = 1 if dim == 2 else 3
    angles = np.array(list(itertools.product(angles_1d, repeat=n_axes)), dtype=float)
    half = np.asarray(size, dtype=float) / 2
    corners = np.array(list(itertools.product(*[(-h, h) for h in half])))  # (2**dim, dim)
    rotated = np.einsum("nij,kj->nki", _rotation_matrices(angles, dim), corners)
    return 2 * np.abs(rotated).max(axis=(0, 1))


def sampling_patch_size(
    patch_size: Sequence[int], aug: AugmentationPlan | None, *, dims: int
) -> tuple[int, ...]:
    """Size of the patch to read so that rotation and scaling can be cropped back to ``patch_size``.

    nnU-Net's "initial patch size": the bounding box of the training patch rotated by the largest angles of
    ``aug.rotation_range_rad`` (about every axis in 3D, in-plane only for 2D and ``do_dummy_2d``), times the
    largest zoom-out factor of ``aug.scale_range``. Without spatial augmentation it is ``patch_size``.

    Args:
        patch_size: Training patch, 2 (y, x) or 3 (z, y, x) entries.
        aug: Augmentation settings; ``None`` means no augmentation.
        dims: 2 or 3, the configuration's dimensionality (``len(patch_size)``).

    Returns:
        The sampling patch size, at least ``patch_size`` along every axis.
    """
    patch = np.asarray(patch_size, dtype=float)
    if len(patch) != dims:
        raise ValueError(f"patch_size {tuple(patch_size)} does not have {dims} entries")
    if aug is None:
        return tuple(int(p) for p in patch_size)
    in_plane = dims == 3 and aug.do_dummy_2d
    axes = slice(1, None) if in_plane else slice(None)
    extent = patch.copy()
    if aug.rotation_p > 0:
        extent[axes] = np.maximum(extent[axes], _rotated_extent(patch[axes], aug.rotation_range_rad))
    if aug.scale_p > 0:
        extent[axes] *= max(1.0, float(aug.scale_range[1]))
    return tuple(max(int(p), math.ceil(e - 1e-6)) for p, e in zip(patch_size, extent, strict=True))


# --- patch sampling ---------------------------------------------------------------------------------


def _copy_window(src: np.ndarray, lower: Sequence[int], out: np.ndarray) -> None:
    """Copy the window of ``src`` (C, *spatial) starting at ``lower`` into ``out`` (C, *size).

    Parts of the window outside ``src`` are left as they are in ``out`` (zeros).
    """
    src_sl, dst_sl = [slice(None)], [slice(None)]
    for lb, size, n in zip(lower, out.shape[1:], src.shape[1:], strict=True):
        a, b = max(lb, 0), min(lb + size, n)
        if b <= a:
            return
        src_sl.append(slice(a, b))
        dst_sl.append(slice(a - lb, b - lb))
    out[tuple(dst_sl)] = src[tuple(src_sl)]


class PatchSampler(SlimDataLoaderBase):
    """Infinite batchgenerators data loader of patches from the preprocessed cache.

    Each batch draws ``batch_size`` cases uniformly with replacement. The last
    ``ceil(batch_size * oversample_foreground)`` samples of a batch are forced to contain foreground
    (a batch of one is forced with probability ``oversample_foreground``): a foreground class is drawn
    uniformly among the classes of the sampler's cases (a small organ as often as a large one, whatever
    share of the cases contains it), then a case that contains it, then a voxel of that class from
    ``<case>_locs.npz``, and the training patch is centred on it (shifted to stay inside the image). Other
    samples are placed uniformly where the training patch lies inside the image; an image smaller than the
    patch is placed at a random offset in it. The returned window has ``sample_patch_size`` and is centred on
    the training patch, so a centre crop (what :func:`build_transforms` does) yields it. Voxels outside the
    image are zero in data and seg.

    For a 2D configuration (two-entry ``patch_size``) a z-slice is drawn (for forced foreground: the slice of
    the drawn voxel) and a 2D patch is taken from it.

    Arrays are opened with ``mmap_mode="r"`` and kept open per case (least recently used are closed beyond
    ``max_open_cases``); the class-location tables are kept in memory per case.

    Args:
        folder: Preprocessed cache folder (``<work>/preprocessed/<data_identifier>``).
        case_ids: Cases to sample from.
        patch_size: Training patch, (y, x) or (z, y, x).
        batch_size: Samples per batch.
        oversample_foreground: Fraction of each batch forced to contain foreground.
        sample_patch_size: Size of the window returned (default ``patch_size``); see
            :func:`sampling_patch_size`.
        seed: Integer seed, or a generator from which one is drawn once. Worker ``i`` of a background
            loader uses the stream ``(seed, i)``; the in-process stream is worker 0's.
        max_open_cases: Memory maps kept open at once.
    """

    def __init__(
        self,
        folder: Path | str,
        case_ids: Sequence[str],
        *,
        patch_size: Sequence[int],
        batch_size: int,
        oversample_foreground: float = 0.33,
        sample_patch_size: Sequence[int] | None = None,
        seed: int | np.random.Generator = 0,
        max_open_cases: int = 64,
    ) -> None:
        super().__init__(None, batch_size, None)
        if len(case_ids) == 0:
            raise ValueError("PatchSampler needs at least one case")
        if len(patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 entries, got {tuple(patch_size)}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError("oversample_foreground must be in [0, 1]")
        self.folder = Path(folder)
        self.case_ids = [str(c) for c in case_ids]
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sample_patch_size = tuple(int(p) for p in (sample_patch_size or patch_size))
        if len(self.sample_patch_size) != len(self.patch_size) or any(
            s < p for s, p in zip(self.sample_patch_size, self.patch_size, strict=True)
        ):
            raise ValueError(
                f"sample_patch_size {self.sample_patch_size} must cover patch_size {self.patch_size}"
            )
        self.dims = len(self.patch_size)
        self.oversample_foreground = float(oversample_foreground)
        if isinstance(seed, np.random.Generator):
            seed = int(seed.integers(2**63))
        self.seed = int(seed)
        self.max_open_cases = int(max_open_cases)
        self._arrays: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._locs: dict[str, dict[int, np.ndarray]] = {}
        self._class_cases: dict[int, list[str]] | None = None
        self.rng = np.random.default_rng([self.seed, _TAG_SAMPLER, 0])
        self.worker_niceness = 0

    def set_thread_id(self, thread_id: int) -> None:
        """Select the random stream of worker ``thread_id`` and seed the global ``random`` module with it.

        batchgenerators calls this in each worker process (after seeding ``np.random``) before the first
        batch; batchgenerators' transforms also draw from ``random``.
        """
        self.thread_id = int(thread_id)
        _terminate_with_parent()
        if self.worker_niceness > 0:  # in a worker process: yield the cores to the training threads first
            os.nice(self.worker_niceness)
        self.rng = np.random.default_rng([self.seed, _TAG_SAMPLER, self.thread_id])
        random.seed(_derive_seed(self.seed, _TAG_GLOBAL, self.thread_id))

    def __getstate__(self) -> dict[str, Any]:
        # memory maps must not be pickled (that would copy the arrays); workers reopen them lazily
        state = self.__dict__.copy()
        state["_arrays"] = OrderedDict()
        state["_locs"] = {}
        return state

    # --- cache access ---------------------------------------------------------------------------

    def _case_arrays(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(case)
        if arrays is not None:
            self._arrays.move_to_end(case)
            return arrays
        data = np.load(self.folder / f"{case}.npy", mmap_mode="r")
        seg = np.load(self.folder / f"{case}_seg.npy", mmap_mode="r")
        if data.ndim != 4 or seg.shape[-3:] != data.shape[-3:]:
            raise ValueError(
                f"{case}: data {data.shape} and seg {seg.shape} are not (C, Z, Y, X) / (1, Z, Y, X)"
            )
        if seg.ndim == 3:
            seg = seg[None]
        self._arrays[case] = (data, seg)
        while len(self._arrays) > self.max_open_cases:
            self._arrays.popitem(last=False)
        return data, seg

    def _case_locations(self, case: str) -> dict[int, np.ndarray]:
        locs = self._locs.get(case)
        if locs is None:
            with np.load(self.folder / f"{case}_locs.npz", allow_pickle=False) as npz:
                locs = {
                    int(k.split("_", 1)[1]): np.asarray(npz[k]).reshape(-1, 3)
                    for k in npz.files
                    if k.startswith("class_")
                }
            self._locs[case] = {k: v for k, v in locs.items() if len(v) > 0}
            locs = self._locs[case]
        return locs

    # --- sampling -------------------------------------------------------------------------------

    def n_forced_foreground(self) -> int:
        """Number of samples at the end of a batch forced to contain foreground (random for batch 1)."""
        if self.batch_size == 1:
            return int(self.rng.random() < self.oversample_foreground)
        return min(self.batch_size, math.ceil(self.batch_size * self.oversample_foreground - 1e-9))

    def _patch_lower(self, shape: Sequence[int], voxel: Sequence[int] | None) -> list[int]:
        """Lower corner of the training patch in an image of ``shape``, around ``voxel`` if given."""
        lower = []
        for d, (n, p) in enumerate(zip(shape, self.patch_size, strict=True)):
            lo, hi = min(0, n - p), max(0, n - p)
            if voxel is None:
                lower.append(int(self.rng.integers(lo, hi + 1)))
            else:
                lower.append(int(np.clip(int(voxel[d]) - p // 2, lo, hi)))
        return lower

    def class_cases(self) -> dict[int, list[str]]:
        """Foreground class -> the sampler's cases that contain it (read once from the location tables)."""
        if self._class_cases is None:
            table: dict[int, list[str]] = {}
            for case in self.case_ids:
                for k in self._case_locations(case):
                    table.setdefault(k, []).append(case)
            self._class_cases = {k: table[k] for k in sorted(table)}
        return self._class_cases

    def draw_class_first(self) -> tuple[str, int | None]:
        """A foreground class drawn uniformly (rare classes as often as common ones), then a case that has it."""
        table = self.class_cases()
        if not table:
            return self.case_ids[int(self.rng.integers(len(self.case_ids)))], None
        classes = list(table)
        k = classes[int(self.rng.integers(len(classes)))]
        return table[k][int(self.rng.integers(len(table[k])))], k

    def sample(self, case: str, force_foreground: bool, cls: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One (data, seg) window of ``sample_patch_size`` from ``case``, centred on class ``cls`` if given."""
        data, seg = self._case_arrays(case)
        voxel = None
        if force_foreground:
            locs = self._case_locations(case)
            if locs:
                classes = sorted(locs)
                table = locs[cls if cls in locs else classes[int(self.rng.integers(len(classes)))]]
                voxel = table[int(self.rng.integers(len(table)))]
        if self.dims == 2:
            z = int(voxel[0]) if voxel is not None else int(self.rng.integers(data.shape[1]))
            data, seg = data[:, z], seg[:, z]
            voxel = voxel[1:] if voxel is not None else None
        lower = self._patch_lower(data.shape[1:], voxel)
        margins = [(s - p) // 2 for s, p in zip(self.sample_patch_size, self.patch_size, strict=True)]
        lower = [lb - m for lb, m in zip(lower, margins, strict=True)]
        data_out = np.zeros((data.shape[0], *self.sample_patch_size), dtype=np.float32)
        seg_out = np.zeros((seg.shape[0], *self.sample_patch_size), dtype=seg.dtype)
        _copy_window(data, lower, data_out)
        _copy_window(seg, lower, seg_out)
        return data_out, seg_out

    def generate_train_batch(self) -> dict[str, Any]:
        """Return ``{"data": float32 (B, C, *S), "seg": (B, 1, *S) cache dtype, "keys": [case ids]}``."""
        n_forced = self.n_forced_foreground()
        picks = self.rng.integers(len(self.case_ids), size=self.batch_size)
        keys = [self.case_ids[int(i)] for i in picks]
        classes: list[int | None] = [None] * self.batch_size
        for b in range(self.batch_size - n_forced, self.batch_size):  # forced: class first, then a case with it
            keys[b], classes[b] = self.draw_class_first()
        samples = [self.sample(case, b >= self.batch_size - n_forced, classes[b]) for b, case in enumerate(keys)]
        return {
            "data": np.stack([s[0] for s in samples]),
            "seg": np.stack([s[1] for s in samples]),
            "keys": keys,
        }


# --- transforms -------------------------------------------------------------------------------------


class Convert3DTo2DTransform(AbstractTransform):
    """Fold z into the channels, (B, C, Z, Y, X) -> (B, C*Z, Y, X), so 2D transforms act on each slice."""

    def __init__(self, keys: Sequence[str] = ("data", "seg")) -> None:
        self.keys = tuple(keys)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        for key in self.keys:
            arr = data_dict.get(key)
            if arr is None:
                continue
            if arr.ndim != 5:
                raise ValueError(f"Convert3DTo2DTransform: {key} must be 5D, got shape {arr.shape}")
            data_dict[f"_orig_shape_{key}"] = arr.shape
            data_dict[key] = arr.reshape(arr.shape[0], arr.shape[1] * arr.shape[2], *arr.shape[3:])
        return data_dict


class Convert2DTo3DTransform(AbstractTransform):
    """Undo :class:`Convert3DTo2DTransform`: (B, C*Z, Y', X') -> (B, C, Z, Y', X')."""

    def __init__(self, keys: Sequence[str] = ("data", "seg")) -> None:
        self.keys = tuple(keys)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        for key in self.keys:
            shape = data_dict.pop(f"_orig_shape_{key}", None)
            if shape is None or data_dict.get(key) is None:
                continue
            arr = data_dict[key]
            data_dict[key] = arr.reshape(shape[0], shape[1], shape[2], *arr.shape[2:])
        return data_dict


class RotateScaleCropTransform(AbstractTransform):
    """Rotation, scaling and elastic deformation, then a centre crop to ``patch_size``.

    The same augmentation as batchgenerators' ``SpatialTransform`` with ``random_crop=False`` and the
    same parameter draws (built from its coordinate utilities), but it interpolates only the bounding box
    of the transformed sampling grid (plus a margin for the spline support) rather than the whole input
    window: the cubic-spline prefilter, which dominates the cost, then runs on that box, not on the
    enlarged window. Samples that draw no spatial augmentation are centre-cropped without interpolation.
    Outside the input window, data and seg are 0.

    Args:
        patch_size: Output spatial size (2 or 3 entries, matching the batch's spatial axes).
        rotation_p: Probability per sample of a rotation (about every axis in 3D).
        rotation_range_rad: Angle range, radians.
        scale_p: Probability per sample of an isotropic scaling (> 1 zooms out).
        scale_range: Scale range; half of the draws fall below 1 when the range spans 1.
        elastic_p: Probability per sample of an elastic deformation.
        elastic_alpha: Deformation magnitude range.
        elastic_sigma: Deformation smoothness range.
        order_data: Spline order for the image.
        order_seg: 0 (nearest) or 1 (linear per-label indicators, argmax) for the labels.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        *,
        rotation_p: float = 0.0,
        rotation_range_rad: tuple[float, float] = (0.0, 0.0),
        scale_p: float = 0.0,
        scale_range: tuple[float, float] = (1.0, 1.0),
        elastic_p: float = 0.0,
        elastic_alpha: tuple[float, float] = (0.0, 0.0),
        elastic_sigma: tuple[float, float] = (10.0, 13.0),
        order_data: int = 3,
        order_seg: int = 1,
    ) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.rotation_p = float(rotation_p)
        self.rotation_range_rad = tuple(float(a) for a in rotation_range_rad)
        self.scale_p = float(scale_p)
        self.scale_range = tuple(float(a) for a in scale_range)
        self.elastic_p = float(elastic_p)
        self.elastic_alpha = tuple(float(a) for a in elastic_alpha)
        self.elastic_sigma = tuple(float(a) for a in elastic_sigma)
        self.order_data = int(order_data)
        self.order_seg = int(order_seg)

    def _draw_coordinates(self) -> np.ndarray | None:
        """Zero-centred sampling grid of the transformed patch, or None if nothing was drawn."""
        dim = len(self.patch_size)
        coords = None
        if self.elastic_p > 0 and np.random.uniform() < self.elastic_p:
            alpha = np.random.uniform(*self.elastic_alpha)
            sigma = np.random.uniform(*self.elastic_sigma)
            coords = elastic_deform_coordinates(
                create_zero_centered_coordinate_mesh(self.patch_size), alpha, sigma
            )
        if self.rotation_p > 0 and np.random.uniform() < self.rotation_p:
            if coords is None:
                coords = create_zero_centered_coordinate_mesh(self.patch_size)
            angles = [np.random.uniform(*self.rotation_range_rad) for _ in range(1 if dim == 2 else 3)]
            coords = rotate_coords_2d(coords, angles[0]) if dim == 2 else rotate_coords_3d(coords, *angles)
        if self.scale_p > 0 and np.random.uniform() < self.scale_p:
            if coords is None:
                coords = create_zero_centered_coordinate_mesh(self.patch_size)
            low, high = self.scale_range
            if np.random.uniform() < 0.5 and low < 1:
                factor = np.random.uniform(low, 1)
            else:
                factor = np.random.uniform(max(low, 1), high)
            coords = scale_coords(coords, factor)
        return coords

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict["data"]
        seg = data_dict.get("seg")
        dim = len(self.patch_size)
        if data.ndim != dim + 2:
            raise ValueError(f"RotateScaleCropTransform: data {data.shape} does not have {dim} spatial axes")
        shape = np.array(data.shape[2:])
        data_out = np.zeros((data.shape[0], data.shape[1], *self.patch_size), dtype=np.float32)
        seg_out = None
        if seg is not None:
            seg_out = np.zeros((seg.shape[0], seg.shape[1], *self.patch_size), dtype=np.float32)
        margin = max(self.order_data, self.order_seg) + 2
        for b in range(data.shape[0]):
            coords = self._draw_coordinates()
            if coords is None:
                lower = (shape - np.array(self.patch_size)) // 2
                window = tuple(slice(lo, lo + p) for lo, p in zip(lower, self.patch_size, strict=True))
                data_out[b] = data[(b, slice(None), *window)]
                if seg is not None:
                    seg_out[b] = seg[(b, slice(None), *window)]
                continue
            coords += (shape.astype(float) / 2 - 0.5).reshape(-1, *([1] * dim))
            flat = coords.reshape(dim, -1)
            lower = np.clip(np.floor(flat.min(axis=1)).astype(int) - margin, 0, shape)
            upper = np.clip(np.ceil(flat.max(axis=1)).astype(int) + margin + 1, lower, shape)
            coords -= lower.reshape(-1, *([1] * dim))
            box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper, strict=True))
            for c in range(data.shape[1]):
                region = np.asarray(data[(b, c, *box)], dtype=np.float32)
                if region.size == 0:
                    continue
                map_coordinates(
                    region, coords, order=self.order_data, mode="constant", cval=0.0, output=data_out[b, c]
                )
            if seg is not None:
                for c in range(seg.shape[1]):
                    region = np.asarray(seg[(b, c, *box)])
                    if region.size == 0:
                        continue
                    seg_out[b, c] = interpolate_img(
                        region, coords, self.order_seg, "constant", cval=0, is_seg=True
                    )
        data_dict["data"] = data_out
        if seg is not None:
            data_dict["seg"] = seg_out
        return data_dict


def downsample_seg_for_deep_supervision(seg: np.ndarray, strides: Sequence[Stride]) -> list[np.ndarray]:
    """Nearest-neighbour (order 0) segmentation targets for each deep-supervision output.

    Level ``k`` keeps every ``strides[k][d]``-th voxel along spatial axis ``d`` starting at 0, i.e. the
    voxel each output of a stride-``s`` convolution stack (kernel 3, padding 1) is centred on; its size is
    ``ceil(n / s)``, the size of that convolution output.

    Args:
        seg: (B, C, *spatial) segmentation batch.
        strides: Cumulative stride of each output relative to full resolution, highest resolution first,
            e.g. ``[(1, 1, 1), (1, 2, 2), (2, 4, 4)]``; one entry per spatial axis.

    Returns:
        One array per level (C-contiguous); a level of stride 1 is ``seg`` itself.
    """
    spatial = seg.ndim - 2
    out = []
    for stride in strides:
        if len(stride) != spatial:
            raise ValueError(f"stride {tuple(stride)} does not match the {spatial} spatial axes of seg")
        if any(int(s) < 1 for s in stride):
            raise ValueError(f"strides must be positive, got {tuple(stride)}")
        if all(int(s) == 1 for s in stride):
            out.append(seg)
        else:
            out.append(
                np.ascontiguousarray(
                    seg[(slice(None), slice(None), *(slice(None, None, int(s)) for s in stride))]
                )
            )
    return out


class DeepSupervisionTargetsTransform(AbstractTransform):
    """Add ``output_key``: the list of :func:`downsample_seg_for_deep_supervision` targets of ``seg``."""

    def __init__(self, strides: Sequence[Stride], input_key: str = "seg", output_key: str = "target") -> None:
        self.strides = [tuple(int(s) for s in stride) for stride in strides]
        self.input_key = input_key
        self.output_key = output_key

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data_dict[self.output_key] = downsample_seg_for_deep_supervision(
            data_dict[self.input_key], self.strides
        )
        return data_dict


class ToContiguousArraysTransform(AbstractTransform):
    """Make ``data`` C-contiguous float32 and ``seg`` C-contiguous int8 (int16 if labels exceed 127)."""

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data_dict["data"] = np.ascontiguousarray(data_dict["data"], dtype=np.float32)
        seg = data_dict.get("seg")
        if seg is not None:
            if seg.dtype.kind == "f":
                seg = np.rint(seg)
            dtype = np.int8 if seg.size == 0 or (seg.min() >= -128 and seg.max() <= 127) else np.int16
            data_dict["seg"] = np.ascontiguousarray(seg, dtype=dtype)
        return data_dict


def _mirror_axes(aug: AugmentationPlan, dims: int) -> tuple[int, ...]:
    return tuple(sorted({int(a) for a in aug.mirror_axes if 0 <= int(a) < dims}))


def build_transforms(
    aug: AugmentationPlan,
    *,
    patch_size: Sequence[int],
    dims: int,
    deep_supervision_strides: Sequence[Stride] | None = None,
    order_data: int = 3,
    order_seg: int = 1,
    inverted_gamma_p: float = 0.1,
) -> Compose:
    """The training augmentation pipeline (batchgenerators), nnU-Net's default recipe.

    Expects batches of windows of ``sampling_patch_size(patch_size, aug, dims=dims)`` (what
    :class:`PatchSampler` returns) and crops them back to ``patch_size`` around their centre. Steps:
    rotation (about every axis in 3D, in-plane for 2D and ``do_dummy_2d``), scaling and optional elastic
    deformation; Gaussian noise; Gaussian blur; multiplicative brightness; contrast; low-resolution
    simulation (in-plane only for ``do_dummy_2d``); inverted gamma (``inverted_gamma_p``) and gamma;
    mirroring over ``aug.mirror_axes`` that exist in the patch; deep-supervision targets; contiguous
    float32 / int8 arrays.

    Args:
        aug: Probabilities and ranges.
        patch_size: Training patch, (y, x) or (z, y, x).
        dims: 2 or 3.
        deep_supervision_strides: If given, adds ``"target"`` (see
            :func:`downsample_seg_for_deep_supervision`).
        order_data: Spline order for resampling the image in the spatial transform.
        order_seg: Order for the labels (1: linear per-label indicators + argmax, as nnU-Net; 0: nearest).
        inverted_gamma_p: Probability of gamma on the inverted image (0 disables it).

    Returns:
        A :class:`~batchgenerators.transforms.abstract_transforms.Compose`.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != dims:
        raise ValueError(f"patch_size {patch_size} does not have {dims} entries")
    dummy_2d = dims == 3 and aug.do_dummy_2d
    transforms: list[AbstractTransform] = []
    if dummy_2d:
        transforms.append(Convert3DTo2DTransform())
    spatial_patch = patch_size[1:] if dummy_2d else patch_size
    transforms.append(
        RotateScaleCropTransform(
            spatial_patch,
            rotation_p=aug.rotation_p,
            rotation_range_rad=aug.rotation_range_rad,
            scale_p=aug.scale_p,
            scale_range=aug.scale_range,
            elastic_p=aug.elastic_p,
            elastic_alpha=aug.elastic_alpha,
            elastic_sigma=aug.elastic_sigma,
            order_data=order_data,
            order_seg=order_seg,
        )
    )
    if dummy_2d:
        transforms.append(Convert2DTo3DTransform())
    if aug.noise_p > 0:
        transforms.append(GaussianNoiseTransform(tuple(aug.noise_variance), p_per_sample=aug.noise_p))
    if aug.blur_p > 0:
        transforms.append(
            GaussianBlurTransform(
                tuple(aug.blur_sigma),
                different_sigma_per_channel=True,
                p_per_sample=aug.blur_p,
                p_per_channel=0.5,
            )
        )
    if aug.brightness_p > 0:
        transforms.append(
            BrightnessMultiplicativeTransform(
                multiplier_range=tuple(aug.brightness_range), p_per_sample=aug.brightness_p
            )
        )
    if aug.contrast_p > 0:
        transforms.append(
            ContrastAugmentationTransform(tuple(aug.contrast_range), p_per_sample=aug.contrast_p)
        )
    if aug.lowres_p > 0:
        transforms.append(
            SimulateLowResolutionTransform(
                zoom_range=tuple(aug.lowres_zoom_range),
                per_channel=True,
                p_per_channel=0.5,
                order_downsample=0,
                order_upsample=3,
                p_per_sample=aug.lowres_p,
                ignore_axes=(0,) if dummy_2d else None,
            )
        )
    if aug.gamma_p > 0:
        if inverted_gamma_p > 0:
            transforms.append(
                GammaTransform(
                    tuple(aug.gamma_range), True, True, retain_stats=True, p_per_sample=inverted_gamma_p
                )
            )
        transforms.append(
            GammaTransform(tuple(aug.gamma_range), False, True, retain_stats=True, p_per_sample=aug.gamma_p)
        )
    mirror_axes = _mirror_axes(aug, dims)
    if mirror_axes:
        transforms.append(MirrorTransform(mirror_axes))
    transforms.append(ToContiguousArraysTransform())
    if deep_supervision_strides is not None:
        transforms.append(DeepSupervisionTargetsTransform(deep_supervision_strides))
    return Compose(transforms)


def build_validation_transforms(*, deep_supervision_strides: Sequence[Stride] | None = None) -> Compose:
    """No augmentation: optional deep-supervision targets and contiguous float32 / int8 arrays."""
    transforms: list[AbstractTransform] = [ToContiguousArraysTransform()]
    if deep_supervision_strides is not None:
        transforms.append(DeepSupervisionTargetsTransform(deep_supervision_strides))
    return Compose(transforms)


# --- loaders ----------------------------------------------------------------------------------------


def _terminate_with_parent() -> None:
    """In a worker process, ask Linux to send SIGTERM when the parent dies; no-op in a main process or elsewhere.

    A training process killed with SIGKILL cannot tell its augmentation workers to stop; without this
    they would poll their full queues forever, holding memory and a little CPU (seen after killing a
    search: a 760 MiB worker at 12% of a core, reparented to PID 1). Linux signals the death of the
    *thread* that started the worker; loaders are started from the training's main thread.
    """
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent.pid is not None and os.getppid() != parent.pid:
        os._exit(1)  # the parent died before the request took effect


class _InProcessAugmenter:
    """Sampler + transform in the calling process, with a private copy of the global random states."""

    def __init__(self, sampler: PatchSampler, transform: AbstractTransform | None, seed: int) -> None:
        self.sampler = sampler
        self.transform = transform
        self._np_state = np.random.RandomState(_derive_seed(seed, _TAG_GLOBAL, 0)).get_state()
        self._py_state = random.Random(_derive_seed(seed, _TAG_GLOBAL, 0)).getstate()

    def __iter__(self) -> _InProcessAugmenter:
        return self

    def __next__(self) -> dict[str, Any]:
        saved_np, saved_py = np.random.get_state(), random.getstate()
        np.random.set_state(self._np_state)
        random.setstate(self._py_state)
        try:
            batch = next(self.sampler)
            if self.transform is not None:
                batch = self.transform(**batch)
        finally:
            self._np_state, self._py_state = np.random.get_state(), random.getstate()
            np.random.set_state(saved_np)
            random.setstate(saved_py)
        return batch


class BatchLoader:
    """Infinite iterator of batches that measures the time ``next()`` waits; closes background workers.

    Attributes:
        wait_seconds: Total time spent inside ``next()`` since the last :meth:`reset_timing`.
        batches: Batches returned since the last :meth:`reset_timing`.
        num_processes: Background worker processes (0: batches are made in the calling process, so the
            wait is the full production time).
    """

    def __init__(self, augmenter: Iterator[dict[str, Any]], *, num_processes: int) -> None:
        self._augmenter = augmenter
        self.num_processes = int(num_processes)
        self.wait_seconds = 0.0
        self.batches = 0
        self._closed = False

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("BatchLoader is closed")
        start = time.perf_counter()
        batch = next(self._augmenter)
        self.wait_seconds += time.perf_counter() - start
        self.batches += 1
        return batch

    def reset_timing(self) -> None:
        """Zero :attr:`wait_seconds` and :attr:`batches` (e.g. at the start of an epoch)."""
        self.wait_seconds = 0.0
        self.batches = 0

    def close(self) -> None:
        """Stop the background workers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        finish = getattr(self._augmenter, "_finish", None)
        if finish is not None:
            finish()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _start_loader(
    sampler: PatchSampler,
    transform: AbstractTransform,
    *,
    num_processes: int,
    seed: int,
    nondeterministic: bool,
    num_cached_per_worker: int,
) -> BatchLoader:
    if num_processes < 0:
        raise ValueError("num_processes must be >= 0")
    if num_processes == 0:
        return BatchLoader(_InProcessAugmenter(sampler, transform, seed), num_processes=0)
    seeds = [_derive_seed(seed, _TAG_GLOBAL, i) for i in range(num_processes)]
    cls = NonDetMultiThreadedAugmenter if nondeterministic else MultiThreadedAugmenter
    augmenter = cls(
        sampler,
        transform,
        num_processes,
        num_cached_per_queue=num_cached_per_worker,
        seeds=seeds,
        pin_memory=False,
    )
    augmenter._start()
    return BatchLoader(augmenter, num_processes=num_processes)


def make_training_loader(
    folder: Path | str,
    case_ids: Sequence[str],
    config: ConfigurationPlan,
    *,
    deep_supervision_strides: Sequence[Stride] | None = None,
    num_processes: int | None = None,
    seed: int | None = None,
    augment: bool = True,
    nondeterministic: bool = False,
    num_cached_per_worker: int = 2,
    worker_niceness: int = 0,
    windows_only: bool = False,
) -> BatchLoader:
    """Augmented training batches of ``config`` from the cache, made in background workers.

    Args:
        folder: Preprocessed cache folder of ``config.data_identifier``.
        case_ids: Training cases.
        config: Supplies dims, patch_size, batch_size, augmentation and training.oversample_foreground,
            num_workers and seed.
        deep_supervision_strides: Cumulative strides of the network outputs (highest resolution first);
            adds ``"target"`` to each batch.
        num_processes: Worker processes (default ``config.training.num_workers``; 0: in-process).
        seed: Overrides ``config.training.seed``.
        augment: False samples like validation (training-patch windows, no augmentation).
        nondeterministic: Use batchgenerators' NonDetMultiThreadedAugmenter (batches in the order they
            are ready instead of round-robin over workers).
        num_cached_per_worker: Batches each worker may queue ahead.
        worker_niceness: Raise the workers' nice value by this much, so that on a CPU with few cores the
            training threads (which synchronise with each other) are not the ones descheduled.
        windows_only: Return the sampling windows untransformed (contiguous float32 / int8, no targets): the
            augmentation then runs batched on the training device (:mod:`automedseg.device_batches`).

    Returns:
        A :class:`BatchLoader`; use it as a context manager or call :meth:`BatchLoader.close`.
    """
    seed = config.training.seed if seed is None else int(seed)
    num_processes = config.training.num_workers if num_processes is None else int(num_processes)
    aug = config.augmentation if augment else None
    sampler = PatchSampler(
        folder,
        case_ids,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        oversample_foreground=config.training.oversample_foreground,
        sample_patch_size=sampling_patch_size(config.patch_size, aug, dims=config.dims),
        seed=seed,
    )
    sampler.worker_niceness = int(worker_niceness)
    if windows_only:
        transform = build_validation_transforms()
    elif aug is None:
        transform = build_validation_transforms(deep_supervision_strides=deep_supervision_strides)
    else:
        transform = build_transforms(
            aug,
            patch_size=config.patch_size,
            dims=config.dims,
            deep_supervision_strides=deep_supervision_strides,
        )
    return _start_loader(
        sampler,
        transform,
        num_processes=num_processes,
        seed=seed,
        nondeterministic=nondeterministic,
        num_cached_per_worker=num_cached_per_worker,
    )


def make_validation_loader(
    folder: Path | str,
    case_ids: Sequence[str],
    config: ConfigurationPlan,
    *,
    deep_supervision_strides: Sequence[Stride] | None = None,
    num_processes: int = 0,
    seed: int | None = None,
) -> BatchLoader:
    """Unaugmented batches of ``config``'s patch size with the training oversampling (for pseudo-Dice).

    Sampling is as in training but without the enlarged window; the seed stream differs from the
    training loader's. Defaults to in-process (``num_processes=0``): without augmentation a batch is a
    few memory-mapped reads.
    """
    seed = config.training.seed if seed is None else int(seed)
    seed = _derive_seed(seed, _TAG_VALIDATION)
    sampler = PatchSampler(
        folder,
        case_ids,
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        oversample_foreground=config.training.oversample_foreground,
        seed=seed,
    )
    transform = build_validation_transforms(deep_supervision_strides=deep_supervision_strides)
    return _start_loader(
        sampler,
        transform,
        num_processes=num_processes,
        seed=seed,
        nondeterministic=False,
        num_cached_per_worker=2,
    )
