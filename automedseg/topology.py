"""Spacing and topology rules of the planner (nnU-Net v2's): the target spacing with the anisotropy rule, the
initial patch, and the pooling topology (which axes each stage pools, and the kernel sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from automedseg.fingerprint_types import CaseFingerprint

ANISO_THRESHOLD = 3.0
MIN_FEATURE_MAP = 4


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing, with nnU-Net's anisotropy rule for the coarsest axis.

    When the coarsest axis is more than 3x coarser than the others *and* would have 3x fewer voxels, its
    target is the 10th percentile of its spacings (so thin-slice cases are not downsampled too much).

    Example:
        >>> sp = np.array([[5.0, 0.8, 0.8], [3.0, 0.8, 0.8], [5.0, 0.8, 0.8]])
        >>> target_spacing(sp, np.array([[20, 512, 512]] * 3)).round(2).tolist()
        [3.4, 0.8, 0.8]
    """
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    resampled = np.median(shapes * spacings / target, axis=0)
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[others])
    aniso_voxels = resampled[worst] * ANISO_THRESHOLD < min(resampled[others])
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(spacings[:, worst], 10))
        if t < max(target[others]):
            t = max(max(target[others]), t) + 1e-5
        target[worst] = t
    return target


def pooling_topology(spacing: Sequence[float], patch: Sequence[int], *, max_stages: int = 7
                     ) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Kernel sizes, strides and the patch rounded up to divisibility, following nnU-Net v2's rules.

    Each round pools the axes that can still be halved (size at least ``2 * MIN_FEATURE_MAP``) and whose
    spacing is within 2x of the finest *poolable* axis; a lone axis needs ``3 * MIN_FEATURE_MAP``. An axis
    gets 3-wide kernels once its spacing is within 2x of the finest spacing, and keeps them; the bottleneck
    is 3 on every axis.

    Returns:
        ``(kernel_sizes, strides, patch)`` with one entry per stage; ``strides[0]`` is all ones.

    Example:
        >>> k, s, p = pooling_topology([5.0, 1.0, 1.0], [16, 64, 64])
        >>> k[0], s[1], p
        ([1, 3, 3], [1, 2, 2], [16, 64, 64])
    """
    dims = len(spacing)
    cur_spacing = [float(v) for v in spacing]
    cur_size = [float(v) for v in patch]
    kernel = [1] * dims
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * dims]
    while len(strides) < max_stages:
        poolable = [i for i in range(dims) if cur_size[i] >= 2 * MIN_FEATURE_MAP]
        if not poolable:
            break
        finest_poolable = min(cur_spacing[i] for i in poolable)
        axes = [i for i in poolable if cur_spacing[i] / finest_poolable < 2]
        if len(axes) == 1 and cur_size[axes[0]] < 3 * MIN_FEATURE_MAP:
            break
        finest = min(cur_spacing)
        for i in range(dims):
            if cur_spacing[i] / finest < 2:
                kernel[i] = 3
        kernels.append(list(kernel))
        strides.append([2 if i in axes else 1 for i in range(dims)])
        for i in axes:
            cur_spacing[i] *= 2
            cur_size[i] = math.ceil(cur_size[i] / 2)
    kernels.append([3] * dims)  # bottleneck
    divisor = [math.prod(s[i] for s in strides) for i in range(dims)]
    rounded = [int(math.ceil(p / d) * d) for p, d in zip(patch, divisor)]
    return kernels, strides, rounded


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float], *, dims: int) -> list[int]:
    """nnU-Net's starting patch: 256^3 (3D) or 2048^2 (2D) voxels shaped by the spacing, clipped to the median."""
    inv = 1.0 / np.asarray(spacing, dtype=float)
    budget = 256.0**3 if dims == 3 else 2048.0**2
    patch = inv * (budget / np.prod(inv)) ** (1.0 / dims)
    return [int(max(1, round(min(p, m)))) for p, m in zip(patch, median_shape)]


#: After coarsening a 2D dataset's pixel grid, its small structures (a class's 10th-percentile size, see
#: :func:`automedseg.fingerprint.structure_size_px`) keep at least this many pixels: a half-pixel boundary error
#: then costs a round structure at most ~3 % Dice.
MIN_STRUCTURE_PX = 16.0
#: In-plane coarsening factors the 2D scale rule tries, finest first.
SCALE_LADDER_2D = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def coarsening_limit(sizes_mm: Sequence[float], spacing_mm: float) -> float:
    """Largest in-plane coarsening of ``spacing_mm`` that keeps every structure at :data:`MIN_STRUCTURE_PX`.

    Args:
        sizes_mm: One size per class (its 10th percentile over the cases) in mm.
        spacing_mm: The in-plane target spacing before coarsening.

    Example:
        >>> coarsening_limit([28.0, 60.0], 0.131)   # fetal heads: ~13x coarser still keeps 16 px
        13.358778625954198
        >>> coarsening_limit([0.06], 0.02)          # vessels 3 px wide: no coarsening
        1.0
    """
    if not sizes_mm:
        return 1.0
    return max(1.0, min(sizes_mm) / (MIN_STRUCTURE_PX * spacing_mm))


def class_sizes_mm(cases: Sequence[CaseFingerprint]) -> list[float]:
    """Each class's 10th-percentile in-plane structure size (``size_px`` x in-plane spacing) in mm, over the
    cases that contain it."""
    per_class: dict[str, list[float]] = {}
    for case in cases:
        in_plane = float(np.mean(case.spacing_mm[1:]))
        for k, c in case.classes.items():
            if c.size_px:
                per_class.setdefault(k, []).append(c.size_px * in_plane)
    return [float(np.percentile(v, 10)) for v in per_class.values() if v]
