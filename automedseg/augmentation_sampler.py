"""Patch sampling of the training data pipeline (:mod:`automedseg.augmentation`): :class:`PatchSampler` reads
windows from the memory-mapped cache with foreground oversampling; :func:`sampling_patch_size` sizes them so
that rotated and scaled patches stay covered by image data; the seeds every loader derives from.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import random
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase

from automedseg.allocator import release_freed_memory
from automedseg.class_sampling import SharedClassWeights
from automedseg.plans import AugmentationPlan
from automedseg.thread_placement import pin_process

Stride = Sequence[int]


# --- seeds ------------------------------------------------------------------------------------------


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed (what ``np.random.seed`` accepts) derived from integers, stable across runs."""
    return int(np.random.SeedSequence([int(e) % (2**63) for e in entropy]).generate_state(1)[0])


TAG_SAMPLER = 1
TAG_GLOBAL = 2
TAG_VALIDATION = 3


def terminate_with_parent() -> None:
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
        class_weights: Weights of the forced-foreground class draw (shared with the worker processes; see
            :mod:`automedseg.class_sampling`); ``None``: every class equally often.
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
        class_weights: SharedClassWeights | None = None,
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
        self.rng = np.random.default_rng([self.seed, TAG_SAMPLER, 0])
        self.worker_niceness = 0
        self.owner_pid = os.getpid()  # the process that made the loader (a worker is any other)
        self.worker_cpus: tuple[int, ...] | None = None  # cores a worker process pins itself to (thread_placement)
        self.class_weights = class_weights

    def set_thread_id(self, thread_id: int) -> None:
        """Select the random stream of worker ``thread_id`` and seed the global ``random`` module with it.

        batchgenerators calls this in each worker process (after seeding ``np.random``) before the first
        batch; batchgenerators' transforms also draw from ``random``.
        """
        self.thread_id = int(thread_id)
        terminate_with_parent()
        if os.getpid() != self.owner_pid:  # a forked worker: its peak need not stay resident (automedseg.allocator)
            release_freed_memory()
        if self.worker_niceness > 0:  # in a worker process: yield the cores to the training threads first
            os.nice(self.worker_niceness)
        if self.worker_cpus:  # the worker's own core (automedseg.thread_placement, placement own_core)
            pin_process(self.worker_cpus)
        self.rng = np.random.default_rng([self.seed, TAG_SAMPLER, self.thread_id])
        random.seed(derive_seed(self.seed, TAG_GLOBAL, self.thread_id))

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
        """A foreground class, then a case that has it.

        The class is drawn uniformly (rare classes as often as common ones), or with :attr:`class_weights`
        where given (classes not yet learned more often).
        """
        table = self.class_cases()
        if not table:
            return self.case_ids[int(self.rng.integers(len(self.case_ids)))], None
        classes = list(table)
        if self.class_weights is None:
            k = classes[int(self.rng.integers(len(classes)))]
        else:
            k = self.class_weights.pick(classes, float(self.rng.random()))
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
