"""Lateralised labels: classes that mirroring along an axis would swap (left/right pairs).

Mirroring is a free augmentation for symmetric anatomy, but it teaches the network the wrong thing when the
labels say which side a structure is on: flipping a chest X-ray left-right turns the left lung into a right
lung that is still labelled "left". From the training labels' centroids (relative positions 0..1 along each
array axis, one per case and class) :func:`mirror_confusions` finds the axes along which mirroring maps a
class onto where another class lies; the planner leaves those axes out of training and test-time mirroring
and writes the reason into the plan's notes. nnU-Net leaves this to a hand-chosen trainer subclass.

Example:
    >>> import numpy as np
    >>> left = np.array([[0.5, 0.5, 0.25], [0.5, 0.52, 0.28]])   # (cases, z/y/x)
    >>> right = np.array([[0.5, 0.5, 0.75], [0.49, 0.5, 0.73]])
    >>> mirror_confusions({"left lung": left, "right lung": right})
    {2: 'mirroring along axis 2 maps left lung (centre at 0.27 of the image) onto right lung (0.74)'}
    >>> mirror_confusions({"heart": np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.52]])})
    {}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from automedseg.fingerprint_types import CaseFingerprint

#: A class counts as lateral along an axis when its centre lies at least this far from the middle (fraction of
#: the image) in nearly every case.
MIN_OFFSET = 0.08
#: Mirrored centre of one class and centre of the other (every axis) closer than this: mirroring confuses them.
MATCH_TOLERANCE = 0.12
#: Fraction of the cases in which a class must lie on its side (a few flipped scans do not hide a pair).
SIDE_AGREEMENT = 0.9


def centroid_rel(mask: np.ndarray) -> list[float] | None:
    """Centre of a mask as a fraction (0..1) of the image along each axis, ``None`` when empty.

    Example:
        >>> m = np.zeros((1, 4, 10), bool); m[0, 1:3, 0:2] = True
        >>> centroid_rel(m)
        [0.5, 0.5, 0.1]
    """
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return None
    return [float((c + 0.5) / n) for c, n in zip(idx.mean(axis=0), mask.shape)]


def mirror_confusions(centroids: Mapping[str, np.ndarray], *, min_offset: float = MIN_OFFSET,
                      tolerance: float = MATCH_TOLERANCE, agreement: float = SIDE_AGREEMENT) -> dict[int, str]:
    """Axes along which mirroring maps one class onto another, with the reason for each.

    Args:
        centroids: Class name -> relative centres ``(n_cases, n_axes)`` of the cases that contain it.
        min_offset: How far from the middle a class must lie to be lateral.
        tolerance: How close the mirrored centre of one class and the centre of the other must be.
        agreement: Fraction of cases in which the class must lie on its side.

    Returns:
        Axis -> reason, for each axis to leave out of mirroring.
    """
    means: dict[str, np.ndarray] = {}
    sides: dict[str, np.ndarray] = {}
    for name, c in centroids.items():
        c = np.atleast_2d(np.asarray(c, dtype=float))
        if c.size == 0:
            continue
        means[name] = c.mean(axis=0)
        offset = c - 0.5
        side = np.sign(np.median(offset, axis=0))
        sides[name] = (np.mean(np.sign(offset) == side, axis=0) >= agreement) & (np.abs(means[name] - 0.5)
                                                                                 >= min_offset)
    out: dict[int, str] = {}
    names = sorted(means)
    for a in range(len(next(iter(means.values()))) if means else 0):
        for i in names:
            if a in out or not sides[i][a]:
                continue
            mirrored = means[i].copy()
            mirrored[a] = 1.0 - mirrored[a]
            gaps = {j: float(np.abs(mirrored - means[j]).max()) for j in names if j != i}
            j = min(gaps, key=gaps.__getitem__) if gaps else None
            if j is not None and gaps[j] <= tolerance:
                out[a] = (f"mirroring along axis {a} maps {i} (centre at {means[i][a]:.2f} of the image) "
                          f"onto {j} ({means[j][a]:.2f})")
    return out


def class_centroids(cases: Sequence[CaseFingerprint], labels: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Class name -> relative centres ``(n_cases, 3)`` of the cases that contain it, from the fingerprint."""
    out = {}
    for name, value in labels.items():
        if value == 0:
            continue
        stats = [c.classes[str(value)] for c in cases if str(value) in c.classes]
        rows = [s.centroid_rel for s in stats if s.centroid_rel is not None]
        if rows:
            out[name] = np.asarray(rows, dtype=float)
    return out


def mirror_axes_to_keep(cases: Sequence[CaseFingerprint], labels: Mapping[str, int],
                        transpose: Sequence[int]) -> dict[int, str]:
    """Axes (after ``transpose``) that mirroring must leave alone, with why: it would swap lateralised classes."""
    raw = mirror_confusions(class_centroids(cases, labels))
    return {t: raw[a].replace(f"axis {a}", f"axis {t}") for t, a in enumerate(transpose) if a in raw}
