"""Intensity standardisation: map an image's foreground intensities onto reference landmarks (histogram matching).

Another scanner or site often changes intensities by a smooth monotone non-linearity that the plan's per-image
z-score (an affine map) does not undo. Nyúl-Udupa standardisation does: the *landmarks* of an image are the
percentiles :data:`LANDMARK_PERCENTILES` of its foreground, and a monotone piecewise-linear map sends them onto
reference landmarks (the mean of the training images' landmarks); beyond the outer landmarks the end segments
continue with their slopes. The map is applied before the plan's normalisation.

Foreground is the voxels that are nonzero in the channel: the region preprocessing crops every image to
(:func:`automedseg.fingerprint.nonzero_bbox`). Zero (background) voxels are left as they are. The fingerprint's
pooled intensity statistics cannot serve as the reference: they describe the *labelled* voxels, which an
unlabelled image does not have; the reference is computed from the training images' nonzero voxels instead
(:mod:`automedseg.intensity_reference`).

Plain NumPy functions with keyword-only options; nothing here reads files.

Example:
    >>> rng = np.random.default_rng(0)
    >>> image = rng.gamma(4.0, 25.0, 1000)  # a site's intensities: 0 never occurs
    >>> shifted = 0.01 * image**1.6  # another site: a monotone non-linearity
    >>> matched = match_to_landmarks(shifted, reference=landmarks(image))
    >>> bool(np.allclose(landmarks(matched), landmarks(image), rtol=1e-3))  # up to interpolation between voxels
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

LANDMARK_PERCENTILES: tuple[float, ...] = (0.5, 5.0, 25.0, 50.0, 75.0, 95.0, 99.5)
"""The foreground percentiles that serve as landmarks (nnU-Net's CT clip percentiles at the ends)."""


def foreground_mask(values: np.ndarray) -> np.ndarray:
    """The foreground of one channel: its nonzero voxels (what preprocessing crops every image to).

    Example:
        >>> foreground_mask(np.array([0.0, 3.0, -2.0, 0.0])).tolist()
        [False, True, True, False]
    """
    return np.asarray(values) != 0


def landmarks(values: np.ndarray, *, percentiles: Sequence[float] = LANDMARK_PERCENTILES) -> np.ndarray:
    """The landmarks of one channel: the ``percentiles`` of its foreground (nonzero) intensities.

    Raises:
        ValueError: The channel has no nonzero voxel.

    Example:
        >>> landmarks(np.array([0.0, 0.0, 1.0, 2.0, 3.0]), percentiles=(0.0, 50.0, 100.0)).tolist()
        [1.0, 2.0, 3.0]
    """
    values = np.asarray(values)
    fg = values[foreground_mask(values)]
    if fg.size == 0:
        raise ValueError("no foreground (nonzero) voxels to take intensity landmarks from")
    return np.percentile(fg.astype(np.float64), list(percentiles))


def mean_landmarks(per_image: Iterable[np.ndarray]) -> np.ndarray:
    """The reference landmarks of a set of images: the mean of their landmarks (non-decreasing like each).

    Example:
        >>> mean_landmarks([np.array([0.0, 10.0]), np.array([2.0, 20.0])]).tolist()
        [1.0, 15.0]
    """
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in per_image])
    return stacked.mean(axis=0)


def piecewise_linear(values: np.ndarray, *, source: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """The monotone piecewise-linear map with ``source[i] -> target[i]``, extended by its end slopes.

    Both landmark lists are non-decreasing; repeated source landmarks (a histogram with a spike) keep their
    first target, and a single distinct landmark shifts every value by the same offset.

    Example:
        >>> piecewise_linear(np.array([0.0, 1.0, 2.0, 4.0, 6.0]), source=[1.0, 2.0, 4.0],
        ...                  target=[10.0, 30.0, 40.0]).tolist()
        [-10.0, 10.0, 30.0, 40.0, 50.0]
    """
    xs_all = np.asarray(source, dtype=np.float64)
    ys_all = np.asarray(target, dtype=np.float64)
    if xs_all.shape != ys_all.shape or xs_all.ndim != 1 or xs_all.size == 0:
        raise ValueError(f"source and target landmarks must be two lists of one length, got {xs_all.shape} and "
                         f"{ys_all.shape}")
    if np.any(np.diff(xs_all) < 0) or np.any(np.diff(ys_all) < 0):
        raise ValueError("landmarks must be non-decreasing")
    xs, first = np.unique(xs_all, return_index=True)
    ys = ys_all[first]
    x = np.asarray(values, dtype=np.float64)
    if xs.size == 1:
        return x + (ys[0] - xs[0])
    out = np.interp(x, xs, ys)
    low_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    high_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    below, above = x < xs[0], x > xs[-1]
    out[below] = ys[0] + (x[below] - xs[0]) * low_slope
    out[above] = ys[-1] + (x[above] - xs[-1]) * high_slope
    return out


def match_to_landmarks(values: np.ndarray, *, reference: Sequence[float],
                       percentiles: Sequence[float] = LANDMARK_PERCENTILES) -> np.ndarray:
    """One channel with its foreground landmarks mapped onto ``reference``; background (zero) voxels unchanged.

    A channel without foreground is returned as it is. The result has the input's dtype when it is floating,
    else float32.

    Args:
        values: One channel, any shape.
        reference: The reference landmarks (at ``percentiles``), non-decreasing.
        percentiles: The landmark percentiles of ``reference``.

    Example:
        >>> x = np.array([0.0, 1.0, 2.0, 3.0, 0.0])
        >>> match_to_landmarks(x, reference=[10.0, 30.0], percentiles=(0.0, 100.0)).tolist()
        [0.0, 10.0, 20.0, 30.0, 0.0]
    """
    values = np.asarray(values)
    if len(reference) != len(percentiles):
        raise ValueError(f"{len(reference)} reference landmarks for {len(percentiles)} percentiles")
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.dtype(np.float32)
    out = values.astype(dtype, copy=True)
    fg = foreground_mask(values)
    if not fg.any():
        return out
    own = np.percentile(values[fg].astype(np.float64), list(percentiles))
    out[fg] = piecewise_linear(values[fg], source=own, target=reference).astype(dtype)
    return out


def match_image(image: np.ndarray, *, reference: Sequence[Sequence[float] | None],
                percentiles: Sequence[float] = LANDMARK_PERCENTILES) -> np.ndarray:
    """A ``(C, ...)`` image with each channel matched to its reference landmarks (``None``: left as it is).

    Example:
        >>> image = np.array([[0.0, 1.0, 3.0], [5.0, 6.0, 7.0]])
        >>> match_image(image, reference=[[2.0, 6.0], None], percentiles=(0.0, 100.0)).tolist()
        [[0.0, 2.0, 6.0], [5.0, 6.0, 7.0]]
    """
    image = np.asarray(image)
    if len(reference) != image.shape[0]:
        raise ValueError(f"{len(reference)} reference channel(s) for an image of {image.shape[0]}")
    channels = [image[c].astype(np.float32) if ref is None else
                match_to_landmarks(image[c], reference=ref, percentiles=percentiles)
                for c, ref in enumerate(reference)]
    return np.stack(channels).astype(image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32)
