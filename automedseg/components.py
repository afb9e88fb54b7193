"""Connected components of integer label maps: keep the largest, remove the small ones.

Two operations (what :mod:`automedseg.postprocessing` chooses between on cross-validation):

* :func:`keep_largest_component`: keep only the largest connected component, either of the whole
  foreground (``labels=None``: the components of ``seg > 0``; a component may mix classes) or of each
  listed class separately. Removed voxels become background (0).
* :func:`remove_small_components`: remove components smaller than ``min_voxels``, or (version 2 of
  ``postprocessing.json``) :func:`remove_small_components_mm3`: smaller than ``min_size_mm3`` cubic millimetres,
  which means the same size on images of different spacing (:func:`voxel_volume_mm3`).

Connectivity is *full* (26-neighbourhood in 3D, 8 in 2D): voxels touching at a corner belong to the same
component, so thin diagonal structures are not cut into pieces.

Example:
    >>> seg = np.zeros((1, 6, 6), np.uint8); seg[0, :2, :2] = 1; seg[0, 5, 5] = 1
    >>> int(keep_largest_component(seg, labels=None).sum())
    4
    >>> int(remove_small_components(seg, min_voxels=2).sum())
    4
    >>> int(remove_small_components_mm3(seg, min_size_mm3=2.0, spacing_mm=(1.0, 0.8, 0.8)).sum())  # 0.64 mm^2 each
    4
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (full connectivity) of a binary mask and their sizes.

    Returns:
        ``(labeled, sizes)``: the component number of each voxel (0: outside the mask) and the voxel count of
        each component number (``sizes[0]`` counts the background).
    """
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labeled, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labeled.ravel(), minlength=n + 1)
    return labeled, sizes


def largest_only(mask: np.ndarray) -> np.ndarray:
    """The largest component of a binary mask (the first one on ties); an empty mask stays empty."""
    if not mask.any():
        return mask
    labeled, sizes = label_components(mask)
    sizes[0] = 0
    return labeled == int(np.argmax(sizes))


def without_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """The binary mask without its components of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    labeled, sizes = label_components(mask)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labeled]


def voxel_volume_mm3(spacing_mm: Sequence[float], shape: Sequence[int]) -> float:
    """The volume of one voxel in mm^3: the product of the spacing over the axes longer than one voxel.

    An axis of one voxel has no extent (a 2D image stored as ``(1, Y, X)`` carries a dummy z spacing), so for
    a single-slice image this is the pixel area in mm^2.

    Example:
        >>> voxel_volume_mm3((3.0, 0.5, 0.5), (10, 64, 64)), voxel_volume_mm3((999.0, 0.5, 0.5), (1, 64, 64))
        (0.75, 0.25)
    """
    if len(spacing_mm) != len(shape) or not all(0 < float(s) < math.inf for s in spacing_mm):
        raise ValueError(f"spacing_mm {tuple(spacing_mm)}: need {len(shape)} positive numbers, one per axis of "
                         f"shape {tuple(shape)}")
    return float(math.prod(float(s) for s, n in zip(spacing_mm, shape) if n > 1))


def without_small_mm3(mask: np.ndarray, *, min_size_mm3: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """The binary mask without its components smaller than ``min_size_mm3`` (:func:`voxel_volume_mm3` each)."""
    if not mask.any():
        return mask
    labeled, sizes = label_components(mask)
    keep = sizes * voxel_volume_mm3(spacing_mm, mask.shape) >= float(min_size_mm3)
    keep[0] = False
    return keep[labeled]


def _check_labels(labels: Iterable[int] | None) -> list[int] | None:
    if labels is None:
        return None
    out = [int(v) for v in labels]
    if any(v <= 0 for v in out):
        raise ValueError(f"labels must be foreground classes (> 0), got {out}")
    return out


def keep_largest_component(seg: np.ndarray, *, labels: Sequence[int] | None = None) -> np.ndarray:
    """Keep only the largest connected component; everything removed becomes background.

    Args:
        seg: Integer label map of any dimensionality, e.g. (Z, Y, X) or (1, Z, Y, X).
        labels: ``None``: the foreground as a whole (components of ``seg > 0``, possibly of several
            classes). Otherwise each listed class separately.

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: A listed label is not a foreground class (> 0).
    """
    seg = np.asarray(seg)
    labels = _check_labels(labels)
    out = seg.copy()
    if labels is None:
        mask = seg > 0
        out[mask & ~largest_only(mask)] = 0
        return out
    for label in labels:
        mask = seg == label
        out[mask & ~largest_only(mask)] = 0
    return out


def remove_small_components(seg: np.ndarray, *, min_voxels: int,
                            labels: Sequence[int] | None = None) -> np.ndarray:
    """Remove connected components with fewer than ``min_voxels`` voxels (they become background).

    Args:
        seg: Integer label map of any dimensionality.
        min_voxels: Smallest component size kept; 0 or 1 keep everything.
        labels: ``None``: components of the whole foreground; otherwise of each listed class separately.

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: ``min_voxels`` is not a non-negative integer, or a listed label is not a foreground class.
    """
    if int(min_voxels) != min_voxels or min_voxels < 0:
        raise ValueError(f"min_voxels must be a non-negative integer, got {min_voxels!r}")
    seg = np.asarray(seg)
    labels = _check_labels(labels)
    out = seg.copy()
    masks = [seg > 0] if labels is None else [seg == label for label in labels]
    for mask in masks:
        out[mask & ~without_small(mask, int(min_voxels))] = 0
    return out


def remove_small_components_mm3(seg: np.ndarray, *, min_size_mm3: float, spacing_mm: Sequence[float],
                                labels: Sequence[int] | None = None) -> np.ndarray:
    """Remove connected components smaller than ``min_size_mm3`` cubic millimetres (they become background).

    Args:
        seg: Integer label map, e.g. ``(Z, Y, X)``.
        min_size_mm3: Smallest component volume kept, in mm^3 (mm^2 for a single-slice image, see
            :func:`voxel_volume_mm3`); 0 keeps everything.
        spacing_mm: Voxel spacing in mm, one per axis of ``seg``.
        labels: ``None``: components of the whole foreground; otherwise of each listed class separately.

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: A negative or non-finite size, a spacing that does not fit ``seg``, or a listed label that is
            not a foreground class.
    """
    if not 0 <= float(min_size_mm3) < math.inf:
        raise ValueError(f"min_size_mm3 must be a non-negative number, got {min_size_mm3!r}")
    seg = np.asarray(seg)
    voxel_volume_mm3(spacing_mm, seg.shape)  # checked even when nothing is removed
    labels = _check_labels(labels)
    out = seg.copy()
    masks = [seg > 0] if labels is None else [seg == label for label in labels]
    for mask in masks:
        out[mask & ~without_small_mm3(mask, min_size_mm3=min_size_mm3, spacing_mm=spacing_mm)] = 0
    return out
