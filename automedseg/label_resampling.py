"""Label maps resampled at arbitrary coordinates: linear per-label indicators and their argmax, at one pass's cost.

The spatial augmentation (:class:`automedseg.augmentation_transforms.RotateScaleCropTransform`) resamples the
labels as nnU-Net does: each label's indicator is interpolated linearly and every voxel takes the label that scores
highest (ties go to the nearest neighbour's label when it is one of the tied, else to the smallest; outside the
input, every label scores 0 and the voxel gets ``cval``). batchgenerators' ``interpolate_img(..., is_seg=True)``
does it with one ``scipy.ndimage.map_coordinates`` per label present plus one nearest-neighbour pass, so its cost
grows with the labels in the window: on a head-and-neck CT case (8 labels in a 56x56x56 window, a 2-core Xeon,
2026-12-01) 197 ms per rotated sample against 87 ms for the image's cubic interpolation, the largest part of the
data worker's time, which shares the CPU with training.

:func:`resample_labels_linear` computes the same result from the 2^D corners of each sampling point directly: the
corners' labels are gathered once and each label's score is the sum of the weights of the corners that carry it
(the same products, summed in the same order as scipy's linear interpolation of the indicator, so exact ties are
exact here too). The per-label work is a comparison and an add per corner, not another interpolation: 21 ms on
that CT window (one label's ``map_coordinates`` alone: 18-20 ms; ``benchmarks/worker_speed.py`` times the worker).

Example:
    >>> import numpy as np
    >>> labels = np.array([[0, 0, 2], [1, 1, 2]], dtype=np.int8)
    >>> coords = np.array([[0.4, 0.6, 0.5], [0.0, 1.0, 1.5]])  # (y, x) of three points
    >>> resample_labels_linear(labels, coords)
    array([0, 1, 2], dtype=int8)
"""

from __future__ import annotations

import numpy as np

CHUNK_POINTS = 16384  # points resampled at a time: their corners' labels and weights stay in a core's L2 cache


def _present_labels(labels: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer array (a count over its range where that range is small)."""
    low, high = int(labels.min()), int(labels.max())
    if high - low < 1 << 16 and labels.dtype != np.uint64:  # (bincount takes no uint64)
        counts = np.bincount((labels.reshape(-1) - np.int64(low)) if low else labels.reshape(-1), minlength=1)
        return (np.flatnonzero(counts) + low).astype(labels.dtype)
    return np.unique(labels)


def _corner_labels_and_weights(flat: np.ndarray, shape: tuple[int, ...], coords: np.ndarray,
                               ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per corner of each point (last axis fastest): its label and weight; and the nearest neighbour's label.

    Points outside ``[0, n - 1]`` on any axis (scipy's ``mode="constant"``: no interpolation beyond the edges) get
    weight 0 at every corner. The weights are scipy's: per axis ``1 - t`` and ``1 - (1 - t)`` (not ``t``, which can
    differ from it in the last bit and so turn an exact tie into a near one), and a corner's weight is the product
    of its axes' weights, first axis first (as scipy multiplies them).

    Args:
        flat: The label map, C order, flattened.
        shape: Its shape.
        coords: ``(D, n)`` points.
    """
    dims = len(shape)
    index_dtype = np.int32 if flat.size < 2**31 else np.intp
    strides = [index_dtype(v) for v in np.cumprod((1, *shape[::-1]))[:-1][::-1]]
    inside = np.ones(coords.shape[1], dtype=bool)
    for d in range(dims):
        inside &= (coords[d] >= 0) & (coords[d] <= shape[d] - 1)
    base = np.zeros(coords.shape[1], dtype=index_dtype)
    nearest = np.zeros_like(base)
    step, axis_weights = [], []
    for d in range(dims):
        x = np.where(inside, coords[d], 0.0)  # (points outside keep valid indices; their weights are 0)
        x0 = np.floor(x)
        i0 = x0.astype(index_dtype)
        base += i0 * strides[d]
        step.append((i0 < shape[d] - 1).astype(index_dtype) * strides[d])
        nearest += np.floor(x + 0.5).astype(index_dtype) * strides[d]  # (x <= n - 1: rounds to n - 1 at most)
        low = 1.0 - (x - x0)
        high = 1.0 - low
        if d == 0:
            low[~inside] = 0.0
            high[~inside] = 0.0
        axis_weights.append((low, high))
    indices, weights = [base, base + step[0]], list(axis_weights[0])
    for d in range(1, dims):  # the corners of axes 0..d, the last axis fastest
        indices = [j for i in indices for j in (i, i + step[d])]
        weights = [w * a for w in weights for a in axis_weights[d]]
    return [flat[i] for i in indices], weights, flat[nearest]


def _resample_points(flat: np.ndarray, shape: tuple[int, ...], coords: np.ndarray, present: np.ndarray,
                     fill: np.ndarray) -> np.ndarray:
    """:func:`resample_labels_linear` of ``(D, n)`` points (``fill``: ``cval`` in the labels' dtype)."""
    corner_labels, corner_weights, nearest_labels = _corner_labels_and_weights(flat, shape, coords)
    n = nearest_labels.size
    best = np.zeros(n)
    win = np.full(n, present[0], dtype=flat.dtype)
    nn_top = np.zeros(n, dtype=bool)  # the nearest neighbour's label has the top score so far
    score, carries, is_nn, better = np.empty(n), np.empty(n, dtype=bool), np.empty(n, dtype=bool), \
        np.empty(n, dtype=bool)
    for value in present:  # ascending: a strict '>' keeps exact ties with the smallest label
        score.fill(0.0)
        for c_labels, c_weights in zip(corner_labels, corner_weights, strict=True):
            np.equal(c_labels, value, out=carries)
            np.add(score, c_weights, out=score, where=carries)
        np.equal(nearest_labels, value, out=is_nn)
        np.equal(score, best, out=carries)  # a tie for the top, among labels that score at all
        carries &= score > 0
        carries &= is_nn
        nn_top |= carries
        np.greater(score, best, out=better)
        np.copyto(nn_top, is_nn, where=better)
        np.copyto(win, value, where=better)
        np.maximum(best, score, out=best)
    np.copyto(win, nearest_labels, where=nn_top)
    win[best <= 0] = fill
    return win


def resample_labels_linear(labels: np.ndarray, coords: np.ndarray, *, cval: int = 0) -> np.ndarray:
    """Resample a label map at ``coords``: argmax of the linearly interpolated indicators of its labels.

    The result equals batchgenerators' ``interpolate_img(labels, coords, 1, "constant", cval, is_seg=True)``
    (ties to the nearest neighbour's label where it is tied for the top, else to the smallest tied label; ``cval``
    outside the input), at about the cost of one linear interpolation whatever the number of labels.

    Args:
        labels: Integer label map, ``D`` axes.
        coords: ``(D, *out_shape)`` sampling coordinates in voxels of ``labels``.
        cval: Label of the points outside the input (cast to the labels' dtype through a float, as
            batchgenerators casts it).

    Returns:
        The labels at ``coords``, shape ``out_shape``, dtype of ``labels``.

    Raises:
        ValueError: ``coords`` does not have one row per axis of ``labels``, or the labels are not integers.

    Example:
        >>> import numpy as np
        >>> labels = np.array([[3, 3], [5, 5]], dtype=np.int16)
        >>> resample_labels_linear(labels, np.array([[0.25, 0.5, -0.5], [0.0, 0.0, 0.0]]), cval=-1)
        array([ 3,  5, -1], dtype=int16)

        (``0.5`` is a tie, settled by the nearest neighbour, rounding half up; ``-0.5`` is outside.)
    """
    if coords.shape[0] != labels.ndim:
        raise ValueError(f"coords has {coords.shape[0]} rows for a label map of {labels.ndim} axes")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    out_shape = coords.shape[1:]
    fill = np.array(cval, dtype=float).astype(labels.dtype)
    if labels.size == 0:
        return np.full(out_shape, fill, dtype=labels.dtype)
    flat = np.ascontiguousarray(labels).reshape(-1)
    points = coords.reshape(labels.ndim, -1)
    present = _present_labels(flat)
    out = np.empty(points.shape[1], dtype=labels.dtype)
    for start in range(0, points.shape[1], CHUNK_POINTS):
        chunk = np.ascontiguousarray(points[:, start:start + CHUNK_POINTS], dtype=np.float64)
        out[start:start + chunk.shape[1]] = _resample_points(flat, labels.shape, chunk, present, fill)
    return out.reshape(out_shape)
