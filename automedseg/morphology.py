"""Morphological post-processing of label maps in physical units: opening, closing, hole filling.

What :mod:`automedseg.postprocessing` chooses between on cross-validation, per class, after the connected-component
rules of :mod:`automedseg.components`:

* :func:`open_mask` / :func:`open_classes`: morphological opening (erosion, then dilation) with a ball of
  ``radius_mm``: removes spurs, thin bridges and specks thinner than the ball. Removed voxels become background.
* :func:`close_mask` / :func:`close_classes`: closing (dilation, then erosion): bridges gaps and notches narrower
  than the ball. Only background voxels are added; a voxel of another class is never taken.
* :func:`fill_holes_mask` / :func:`fill_holes`: fills the holes of a class mask, the background regions it fully
  encloses, either in 3D (``mode="3d"``: enclosed in the volume) or slice by slice along the first array axis z
  (``mode="2d"``: enclosed within each slice; every 3D hole is also a hole of each slice through it). Only
  background voxels are filled (a class enclosed by another, a tumour inside an organ, stays).

The structuring element is a ball of ``radius_mm`` in millimetres, so in voxels an ellipsoid that respects the
spacing (:func:`ellipsoid_element`): with spacing (3, 0.8, 0.8) mm a 1 mm ball reaches one voxel in-plane and
none along z. Opening and closing are computed exactly with Euclidean distance transforms in millimetres (the
same set as :func:`scipy.ndimage.binary_dilation` with that element, at a cost independent of the radius), on
the bounding box of the mask with a margin; beyond the image border the image is taken to continue as its edge
(an object cut by the field of view is neither eroded nor closed against the border).

The label-map functions change the classes independently, each from the map they are given; a background voxel
that the closing (or hole filling) of two classes would both take stays background, so the result does not
depend on the order of the classes. Arrays are in array order with ``spacing_mm`` in the same order; an axis of
one voxel (a 2D image stored as ``(1, Y, X)``) is flat: nothing reaches across it.

Example:
    >>> ring = np.zeros((1, 5, 5), np.uint8); ring[0, 1:4, 1:4] = 1; ring[0, 2, 2] = 0
    >>> int(fill_holes(ring, modes={1: "3d"})[0, 2, 2])
    1
    >>> ellipsoid_element(radius_mm=1.0, spacing_mm=(3.0, 1.0, 1.0)).shape
    (1, 3, 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

HOLE_MODES: tuple[str, ...] = ("3d", "2d")
"""Hole filling: ``3d`` (enclosed in the volume) or ``2d`` (enclosed within each slice along z)."""
_EPS = 1e-9


def _check(shape: Sequence[int], radius_mm: float, spacing_mm: Sequence[float]) -> tuple[float, tuple[float, ...]]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != len(shape) or not all(0 < s < math.inf for s in spacing):
        raise ValueError(f"spacing_mm {tuple(spacing_mm)}: need {len(shape)} positive numbers, one per axis of a "
                         f"mask of shape {tuple(shape)}")
    radius = float(radius_mm)
    if not 0 < radius < math.inf:
        raise ValueError(f"radius_mm must be a positive number, got {radius_mm!r}")
    return radius, spacing


def _reach(radius_mm: float, spacing_mm: Sequence[float], shape: Sequence[int]) -> tuple[int, ...]:
    """Voxels the ball reaches along each axis (0 along an axis of one voxel)."""
    return tuple(int(math.floor(radius_mm / s * (1 + _EPS))) if n > 1 else 0 for s, n in zip(spacing_mm, shape))


def ellipsoid_element(*, radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """The structuring element of a ball of ``radius_mm`` on a grid of ``spacing_mm``: an ellipsoid in voxels.

    A voxel offset ``d`` belongs to it when ``sum((d_i * spacing_i)**2) <= radius_mm**2``.

    Args:
        radius_mm: Radius of the ball in mm.
        spacing_mm: Voxel spacing in mm, one per axis (array order).

    Returns:
        A boolean array of odd size ``2 * floor(radius_mm / spacing_i) + 1`` per axis, centred.

    Example:
        >>> ellipsoid_element(radius_mm=1.0, spacing_mm=(1.0, 1.0)).astype(int)
        array([[0, 1, 0],
               [1, 1, 1],
               [0, 1, 0]])
        >>> ellipsoid_element(radius_mm=3.0, spacing_mm=(3.0, 1.5, 1.5)).astype(int)[:, 2]
        array([[0, 0, 1, 0, 0],
               [1, 1, 1, 1, 1],
               [0, 0, 1, 0, 0]])
    """
    radius, spacing = _check((2,) * len(spacing_mm), radius_mm, spacing_mm)
    reach = _reach(radius, spacing, (2,) * len(spacing))
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(reach, spacing)], indexing="ij")
    return sum(g ** 2 for g in grids) <= radius ** 2 * (1 + _EPS)  # type: ignore[no-any-return]


def _box(mask: np.ndarray, margin: Sequence[int]) -> tuple[tuple[slice, ...], list[tuple[int, int]], tuple[slice, ...]]:
    """The mask's bounding box grown by ``margin``: the part inside the image, the edge padding beyond it, and
    where the part lies in the padded array."""
    (box,) = ndimage.find_objects(mask.astype(np.uint8))
    inside, pad, back = [], [], []
    for sl, m, n in zip(box, margin, mask.shape):
        lo, hi = sl.start - m, sl.stop + m
        inside.append(slice(max(lo, 0), min(hi, n)))
        pad.append((max(0, -lo), max(0, hi - n)))
        back.append(slice(max(0, -lo), max(0, -lo) + min(hi, n) - max(lo, 0)))
    return tuple(inside), pad, tuple(back)


def _dilate(mask: np.ndarray, radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    if mask.all() or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing_mm) <= radius_mm * (1 + _EPS)  # type: ignore


def _erode(mask: np.ndarray, radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    if mask.all() or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(mask, sampling=spacing_mm) > radius_mm * (1 + _EPS)  # type: ignore


def _morph(mask: np.ndarray, radius_mm: float, spacing_mm: Sequence[float], *, closing: bool) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    radius, spacing = _check(mask.shape, radius_mm, spacing_mm)
    if not mask.any():
        return mask.copy()
    reach = _reach(radius, spacing, mask.shape)
    inside, pad, back = _box(mask, [2 * h for h in reach])
    part = np.pad(mask[inside], pad, mode="edge")
    if closing:
        part = _erode(_dilate(part, radius, spacing), radius, spacing)
    else:
        part = _dilate(_erode(part, radius, spacing), radius, spacing)
    out = np.zeros_like(mask)
    out[inside] = part[back]
    return out


def open_mask(mask: np.ndarray, *, radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """Morphological opening of a binary mask with a ball of ``radius_mm`` (never adds a voxel).

    Args:
        mask: Binary mask, e.g. ``(Z, Y, X)``.
        radius_mm: Radius of the ball in mm.
        spacing_mm: Voxel spacing in mm, one per axis of ``mask``.

    Returns:
        A new boolean mask: the union of the balls that fit inside ``mask``.

    Raises:
        ValueError: A radius that is not positive, or a spacing that does not fit the mask.

    Example:
        >>> m = np.zeros((1, 5, 6), bool); m[0, 1:4, 1:4] = True; m[0, 2, 4] = True  # a square with a spur
        >>> open_mask(m, radius_mm=1.5, spacing_mm=(1.0, 1.0, 1.0))[0].astype(int)  # a 3 x 3 element
        array([[0, 0, 0, 0, 0, 0],
               [0, 1, 1, 1, 0, 0],
               [0, 1, 1, 1, 0, 0],
               [0, 1, 1, 1, 0, 0],
               [0, 0, 0, 0, 0, 0]])
    """
    return _morph(mask, radius_mm, spacing_mm, closing=False)


def close_mask(mask: np.ndarray, *, radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """Morphological closing of a binary mask with a ball of ``radius_mm`` (never removes a voxel).

    Args:
        mask: Binary mask, e.g. ``(Z, Y, X)``.
        radius_mm: Radius of the ball in mm.
        spacing_mm: Voxel spacing in mm, one per axis of ``mask``.

    Returns:
        A new boolean mask: ``mask`` with the gaps narrower than the ball bridged.

    Raises:
        ValueError: A radius that is not positive, or a spacing that does not fit the mask.

    Example:
        >>> m = np.zeros((1, 3, 5), bool); m[0, :, :2] = True; m[0, :, 3:] = True  # a one-voxel gap
        >>> bool(close_mask(m, radius_mm=1.0, spacing_mm=(1.0, 1.0, 1.0)).all())
        True
    """
    return _morph(mask, radius_mm, spacing_mm, closing=True)


def fill_holes_mask(mask: np.ndarray, *, mode: str = "3d") -> np.ndarray:
    """A binary mask with its holes filled: the background regions it encloses (face-connected background).

    Args:
        mask: Binary mask, e.g. ``(Z, Y, X)``.
        mode: ``3d``: holes enclosed in the volume; ``2d``: holes enclosed within a slice along the first axis.
            An axis of one voxel is flat in both modes (a 2D image stored as ``(1, Y, X)`` is filled in-plane).

    Returns:
        A new boolean mask.

    Raises:
        ValueError: An unknown ``mode``.

    Example:
        >>> tube = np.zeros((3, 5, 5), bool); tube[:, 1:4, 1:4] = True; tube[:, 2, 2] = False  # open at both ends
        >>> int(fill_holes_mask(tube, mode="3d").sum()), int(fill_holes_mask(tube, mode="2d").sum())
        (24, 27)
    """
    if mode not in HOLE_MODES:
        raise ValueError(f"mode must be one of {list(HOLE_MODES)}, got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    flat = [i for i, n in enumerate(mask.shape) if n == 1] + ([0] if mode == "2d" and mask.ndim > 2 else [])
    for axis in flat:  # no connection across this axis: keep the middle plane only
        keep = [slice(None)] * mask.ndim
        keep[axis] = 1
        plane = structure[tuple(keep)]
        structure = np.zeros_like(structure)
        structure[tuple(keep)] = plane
    (box,) = ndimage.find_objects(mask.astype(np.uint8))  # holes lie inside the bounding box
    out = mask.copy()
    out[box] = ndimage.binary_fill_holes(mask[box], structure=structure)
    return out


def _check_classes(values: Mapping[int, object], name: str) -> dict[int, object]:
    out = {int(k): v for k, v in values.items()}
    if any(k <= 0 for k in out):
        raise ValueError(f"{name}: keys must be foreground classes (> 0), got {sorted(out)}")
    return out


def _settle(seg: np.ndarray, grown: Mapping[int, np.ndarray]) -> np.ndarray:
    """``seg`` with each class's grown mask added where ``seg`` is background and no other class grows too."""
    out = seg.copy()
    owner = np.zeros(seg.shape, np.int64)
    background = seg == 0
    for label, mask in grown.items():
        new = mask & background
        owner[new & (owner != 0) & (owner != label)] = -1
        owner[new & (owner == 0)] = label
    taken = owner > 0
    out[taken] = owner[taken].astype(seg.dtype)
    return out


def open_classes(seg: np.ndarray, *, radii_mm: Mapping[int, float], spacing_mm: Sequence[float]) -> np.ndarray:
    """Open each listed class with its radius (:func:`open_mask`); removed voxels become background.

    Args:
        seg: Integer label map, e.g. ``(Z, Y, X)``.
        radii_mm: Class -> radius of the ball in mm.
        spacing_mm: Voxel spacing in mm, one per axis of ``seg``.

    Returns:
        A new array of the same shape and dtype.

    Example:
        >>> seg = np.zeros((1, 5, 6), np.uint8); seg[0, 1:4, 1:4] = 2; seg[0, 2, 4] = 2
        >>> int((open_classes(seg, radii_mm={2: 1.5}, spacing_mm=(1.0, 1.0, 1.0)) == 2).sum())
        9
    """
    seg = np.asarray(seg)
    out = seg.copy()
    for label, radius in _check_classes(radii_mm, "radii_mm").items():
        mask = seg == label
        out[mask & ~open_mask(mask, radius_mm=float(radius), spacing_mm=spacing_mm)] = 0  # type: ignore[arg-type]
    return out


def close_classes(seg: np.ndarray, *, radii_mm: Mapping[int, float], spacing_mm: Sequence[float]) -> np.ndarray:
    """Close each listed class with its radius (:func:`close_mask`), taking background voxels only.

    Args:
        seg: Integer label map, e.g. ``(Z, Y, X)``.
        radii_mm: Class -> radius of the ball in mm.
        spacing_mm: Voxel spacing in mm, one per axis of ``seg``.

    Returns:
        A new array of the same shape and dtype.

    Example:
        >>> seg = np.zeros((1, 3, 5), np.uint8); seg[0, :, :2] = 1; seg[0, :, 3:] = 1
        >>> close_classes(seg, radii_mm={1: 1.0}, spacing_mm=(1.0, 1.0, 1.0))[0, :, 2].tolist()
        [1, 1, 1]
    """
    seg = np.asarray(seg)
    grown = {label: close_mask(seg == label, radius_mm=float(radius), spacing_mm=spacing_mm)  # type: ignore
             for label, radius in _check_classes(radii_mm, "radii_mm").items()}
    return _settle(seg, grown)


def fill_holes(seg: np.ndarray, *, modes: Mapping[int, str]) -> np.ndarray:
    """Fill the holes of each listed class (:func:`fill_holes_mask`), taking background voxels only.

    Args:
        seg: Integer label map, e.g. ``(Z, Y, X)``.
        modes: Class -> ``3d`` or ``2d`` (per slice along z).

    Returns:
        A new array of the same shape and dtype.

    Example:
        >>> seg = np.zeros((1, 5, 5), np.uint8); seg[0, 1:4, 1:4] = 1; seg[0, 2, 2] = 2  # class 2 inside 1
        >>> int(fill_holes(seg, modes={1: "3d"})[0, 2, 2])
        2
    """
    seg = np.asarray(seg)
    grown = {label: fill_holes_mask(seg == label, mode=str(mode))
             for label, mode in _check_classes(modes, "modes").items()}
    return _settle(seg, grown)
