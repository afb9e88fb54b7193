"""Metrics of one reference/prediction pair in physical units (mm): binary masks, and Dice per label of label maps.

Case-level metrics, summaries and folder evaluation: :mod:`automedseg.metrics`.

Overlap metrics (Dice, IoU, precision, recall) count voxels. Distance metrics are computed between the
*surfaces* of the two masks and are given in millimetres:

* **Surface**: the border voxels of a mask, i.e. the mask minus its binary erosion with the
  *face-connectivity* structuring element (6-neighbourhood in 3D, 4-neighbourhood in 2D). A voxel is a
  surface voxel when at least one of its face neighbours is background. This is the same set that
  SimpleITK's ``sitk.LabelContour`` returns with its default ``fullyConnected=False``, except at the image
  edge: here everything outside the image counts as background (as in MONAI, medpy and DeepMind's
  surface-distance), so a mask that touches the image edge has a surface there, whereas ITK does not
  mark image-edge voxels. Zero-padding the images by one voxel makes the two agree exactly.
* Axes of length 1 are dropped before surfaces are computed, so a 2D slice stored as ``(1, Y, X)`` gives
  the same distances as the ``(Y, X)`` array (its surface is the in-plane contour, not the whole slice).
* **Distances** from each surface voxel of one mask to the nearest surface voxel of the other come from
  :func:`scipy.ndimage.distance_transform_edt` with ``sampling=spacing_mm``. The transforms are computed
  on the bounding box of both masks, zero-padded by one voxel, which gives exactly the distances of a
  whole-image transform because every surface voxel lies inside that box.
* **hd95**: the 95th percentile (``numpy.percentile``, linear interpolation) of the *pooled* symmetric
  surface distances, i.e. the distances reference->prediction and prediction->reference put into one set
  (the medpy convention; MONAI/DeepMind take the maximum of the two directed percentiles instead, which
  is usually equal or larger). **hd** is the maximum of the pooled distances (the Hausdorff distance
  between the two surfaces).
* **assd**: the mean of the pooled distances, i.e. ``(sum d(A->B) + sum d(B->A)) / (|dA| + |dB|)``.
* **nsd**: normalised surface Dice (Nikolov et al., 2021) at ``tolerance_mm``, with every surface voxel
  weighted equally: ``(#{a: d(a, dB) <= tol} + #{b: d(b, dA) <= tol}) / (|dA| + |dB|)``. A slack of
  1e-6 mm absorbs floating-point round-off at the tolerance.
* **Volumes** are voxel counts times the voxel volume (``prod(spacing_mm)``); for 2D images they are areas
  in mm^2 although the keys say ``mm3``. ``volume_diff_mm3 = V_pred - V_ref`` and
  ``volume_diff_rel = (V_pred - V_ref) / V_ref``.

Empty-mask conventions (``A`` = reference, ``B`` = prediction):

=========================  ====  ===  =========  ======  ===  ===  ====  ====  ===============
case                       dice  iou  precision  recall  nsd  hd   hd95  assd  volume_diff_rel
=========================  ====  ===  =========  ======  ===  ===  ====  ====  ===============
both empty                 1     1    1          1       1    0    0     0     0
reference empty, pred not  0     0    0          0       0    NaN  NaN   NaN   NaN
prediction empty, ref not  0     0    0          0       0    NaN  NaN   NaN   -1
=========================  ====  ===  =========  ======  ===  ===  ====  ====  ===============

So with exactly one mask empty every overlap metric is 0 (precision with an empty prediction and recall
with an empty reference are undefined and are *set* to 0, which penalises a missed or hallucinated
structure), while the distance metrics are NaN because there is no surface to measure to.
:func:`automedseg.metrics.summarize` ignores NaN values when averaging, and reports how many values each mean
is based on.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((8, 8), bool); ref[2:6, 2:6] = True
    >>> m = compute_binary_metrics(ref, ref, spacing_mm=(1.0, 1.0))
    >>> m["dice"], m["hd95"]
    (1.0, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES: tuple[str, ...] = (
    "dice",
    "iou",
    "precision",
    "recall",
    "hd95",
    "hd",
    "assd",
    "nsd",
    "volume_ref_mm3",
    "volume_pred_mm3",
    "volume_diff_mm3",
    "volume_diff_rel",
)
"""Keys of the dictionary returned by :func:`compute_binary_metrics`, in order."""

_NSD_SLACK_MM = 1e-6
_CHUNK_VOXELS = 1 << 22
_MAX_DENSE_LABEL = 1024  # above: dice_per_label counts over the label values present


# ----------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------


def _as_bool_pair(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference).astype(bool, copy=False)
    pred = np.asarray(prediction).astype(bool, copy=False)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    if ref.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {ref.ndim}D with shape {ref.shape}")
    return ref, pred


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) == 3 and ndim == 2:
        spacing = spacing[1:]  # (z, y, x) given for a (y, x) image
    if len(spacing) != ndim:
        raise ValueError(f"spacing_mm {tuple(spacing_mm)} has {len(spacing)} entries for a {ndim}D mask")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be positive and finite, got {tuple(spacing_mm)}")
    return spacing


# ----------------------------------------------------------------------------------------------------
# Overlap metrics
# ----------------------------------------------------------------------------------------------------


def _counts(ref: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """Return (true positives, reference voxels, prediction voxels)."""
    tp = int(np.count_nonzero(ref & pred))
    return tp, int(np.count_nonzero(ref)), int(np.count_nonzero(pred))


def _ratio(numerator: int, denominator: int, *, both_empty: bool) -> float:
    if both_empty:
        return 1.0
    if denominator == 0:
        return 0.0
    return numerator / denominator


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice coefficient ``2|A&B| / (|A|+|B|)``; 1 when both masks are empty."""
    ref, pred = _as_bool_pair(reference, prediction)
    tp, n_ref, n_pred = _counts(ref, pred)
    return _ratio(2 * tp, n_ref + n_pred, both_empty=n_ref + n_pred == 0)


def iou(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|A&B| / |A|B|``; 1 when both masks are empty."""
    ref, pred = _as_bool_pair(reference, prediction)
    tp, n_ref, n_pred = _counts(ref, pred)
    return _ratio(tp, n_ref + n_pred - tp, both_empty=n_ref + n_pred == 0)


def precision(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Precision ``|A&B| / |B|``; 1 when both are empty, 0 when only the prediction is empty."""
    ref, pred = _as_bool_pair(reference, prediction)
    tp, n_ref, n_pred = _counts(ref, pred)
    return _ratio(tp, n_pred, both_empty=n_ref + n_pred == 0)


def recall(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Recall (sensitivity) ``|A&B| / |A|``; 1 when both are empty, 0 when only the reference is empty."""
    ref, pred = _as_bool_pair(reference, prediction)
    tp, n_ref, n_pred = _counts(ref, pred)
    return _ratio(tp, n_ref, both_empty=n_ref + n_pred == 0)


# ----------------------------------------------------------------------------------------------------
# Surface distances
# ----------------------------------------------------------------------------------------------------


def _drop_singleton_axes(
    ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    keep = [axis for axis, size in enumerate(ref.shape) if size > 1]
    if len(keep) == ref.ndim:
        return ref, pred, spacing
    if not keep:  # a single voxel: keep one axis so the arrays stay at least 1D
        keep = [ref.ndim - 1]
    shape = tuple(ref.shape[a] for a in keep)
    return ref.reshape(shape), pred.reshape(shape), tuple(spacing[a] for a in keep)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Border voxels of a zero-padded mask (face connectivity)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    reference: np.ndarray, prediction: np.ndarray, *, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) between the surfaces of two binary masks.

    Args:
        reference: Binary 2D or 3D mask (anything non-zero is foreground).
        prediction: Binary mask of the same shape.
        spacing_mm: Voxel spacing in array order, (z, y, x) or (y, x).

    Returns:
        ``(ref_to_pred, pred_to_ref)``: float64 arrays with, for every surface voxel of the reference
        (prediction), the distance to the nearest surface voxel of the prediction (reference). Both are
        empty when either mask is empty.
    """
    ref, pred = _as_bool_pair(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    if not ref.any() or not pred.any():
        return np.zeros(0), np.zeros(0)
    ref, pred, spacing = _drop_singleton_axes(ref, pred, spacing)

    union = ref | pred
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(np.any(union, axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    ref_box = np.pad(ref[tuple(box)], 1, constant_values=False)
    pred_box = np.pad(pred[tuple(box)], 1, constant_values=False)

    ref_surface = _surface(ref_box)
    pred_surface = _surface(pred_box)
    dist_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return (
        np.asarray(dist_to_pred[ref_surface], dtype=np.float64),
        np.asarray(dist_to_ref[pred_surface], dtype=np.float64),
    )


def _distance_metrics(
    ref_to_pred: np.ndarray, pred_to_ref: np.ndarray, *, n_ref: int, n_pred: int, tolerance_mm: float
) -> dict[str, float]:
    if n_ref == 0 and n_pred == 0:
        return {"hd95": 0.0, "hd": 0.0, "assd": 0.0, "nsd": 1.0}
    if n_ref == 0 or n_pred == 0:
        return {"hd95": math.nan, "hd": math.nan, "assd": math.nan, "nsd": 0.0}
    pooled = np.concatenate([ref_to_pred, pred_to_ref])
    within = np.count_nonzero(pooled <= tolerance_mm + _NSD_SLACK_MM)
    return {
        "hd95": float(np.percentile(pooled, 95)),
        "hd": float(pooled.max()),
        "assd": float(pooled.mean()),
        "nsd": within / pooled.size,
    }


def _distance_metric(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
    name: str,
) -> float:
    ref, pred = _as_bool_pair(reference, prediction)
    a, b = surface_distances(ref, pred, spacing_mm=spacing_mm)
    metrics = _distance_metrics(a, b, n_ref=int(ref.any()), n_pred=int(pred.any()), tolerance_mm=tolerance_mm)
    return metrics[name]


def hd95(reference: np.ndarray, prediction: np.ndarray, *, spacing_mm: Sequence[float]) -> float:
    """95th percentile of the pooled symmetric surface distances in mm (see module docstring)."""
    return _distance_metric(reference, prediction, spacing_mm, 1.0, "hd95")


def hausdorff(reference: np.ndarray, prediction: np.ndarray, *, spacing_mm: Sequence[float]) -> float:
    """Maximum symmetric surface distance (Hausdorff distance between the surfaces) in mm."""
    return _distance_metric(reference, prediction, spacing_mm, 1.0, "hd")


def assd(reference: np.ndarray, prediction: np.ndarray, *, spacing_mm: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (see module docstring)."""
    return _distance_metric(reference, prediction, spacing_mm, 1.0, "assd")


def nsd(
    reference: np.ndarray, prediction: np.ndarray, *, spacing_mm: Sequence[float], tolerance_mm: float = 1.0
) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (fraction of surface voxels within tolerance)."""
    return _distance_metric(reference, prediction, spacing_mm, tolerance_mm, "nsd")


def volume_difference(
    reference: np.ndarray, prediction: np.ndarray, *, spacing_mm: Sequence[float]
) -> tuple[float, float]:
    """Volume difference ``V_pred - V_ref``.

    Returns:
        ``(difference_mm3, relative)``, where ``relative = difference / V_ref`` (0 when both masks are
        empty, NaN when only the reference is empty).
    """
    ref, pred = _as_bool_pair(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    voxel = float(np.prod(spacing))
    v_ref = np.count_nonzero(ref) * voxel
    v_pred = np.count_nonzero(pred) * voxel
    return _volume_terms(v_ref, v_pred)


def _volume_terms(v_ref: float, v_pred: float) -> tuple[float, float]:
    diff = v_pred - v_ref
    if v_ref > 0:
        return diff, diff / v_ref
    return diff, 0.0 if v_pred == 0 else math.nan


def compute_binary_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    tolerance_mm: float = 1.0,
) -> dict[str, float]:
    """All metrics of :data:`METRIC_NAMES` for one pair of binary masks, sharing one distance pass.

    Args:
        reference: Binary 2D or 3D mask (anything non-zero is foreground).
        prediction: Binary mask of the same shape.
        spacing_mm: Voxel spacing in array order, (z, y, x) or (y, x); a 3-tuple is accepted for 2D
            masks and its first entry ignored.
        tolerance_mm: Tolerance of the normalised surface Dice.

    Returns:
        Metric name -> float (NaN where undefined, see the module docstring).
    """
    ref, pred = _as_bool_pair(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a non-negative number, got {tolerance_mm}")
    tp, n_ref, n_pred = _counts(ref, pred)
    both_empty = n_ref + n_pred == 0
    ref_to_pred, pred_to_ref = surface_distances(ref, pred, spacing_mm=spacing)
    voxel = float(np.prod(spacing))
    v_ref, v_pred = n_ref * voxel, n_pred * voxel
    v_diff, v_rel = _volume_terms(v_ref, v_pred)
    result = {
        "dice": _ratio(2 * tp, n_ref + n_pred, both_empty=both_empty),
        "iou": _ratio(tp, n_ref + n_pred - tp, both_empty=both_empty),
        "precision": _ratio(tp, n_pred, both_empty=both_empty),
        "recall": _ratio(tp, n_ref, both_empty=both_empty),
        **_distance_metrics(ref_to_pred, pred_to_ref, n_ref=n_ref, n_pred=n_pred, tolerance_mm=tolerance_mm),
        "volume_ref_mm3": v_ref,
        "volume_pred_mm3": v_pred,
        "volume_diff_mm3": v_diff,
        "volume_diff_rel": v_rel,
    }
    return {name: float(result[name]) for name in METRIC_NAMES}


# ----------------------------------------------------------------------------------------------------
# Multi-label cases and summaries
# ----------------------------------------------------------------------------------------------------


def dice_per_label(reference: np.ndarray, prediction: np.ndarray, *,
                   labels: Sequence[int]) -> dict[int, float]:
    """Dice of every listed class (one-vs-rest) between two label maps of the same shape.

    Uses one confusion-matrix pass, so many classes cost no more than one. A class absent from both maps
    scores 1.
    """
    ref = np.asarray(reference)
    pred = np.asarray(prediction)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    labels = [int(v) for v in labels]
    if ref.size and (ref.min() < 0 or pred.min() < 0):
        raise ValueError("label maps must not hold negative values")
    k = int(max([0, *labels, int(ref.max(initial=0)), int(pred.max(initial=0))])) + 1
    flat_ref, flat_pred = ref.ravel(), pred.ravel()
    lut = None
    if k > _MAX_DENSE_LABEL:  # sparse large values (e.g. 40000): count over the values present only
        present = np.union1d(np.asarray(labels, dtype=np.int64),
                             np.union1d(np.flatnonzero(np.bincount(flat_ref, minlength=1)),
                                        np.flatnonzero(np.bincount(flat_pred, minlength=1))))
        lut = np.zeros(k, dtype=np.int64)
        lut[present] = np.arange(len(present))
        k = len(present)
    confusion = np.zeros(k * k, dtype=np.int64)
    for start in range(0, flat_ref.size, _CHUNK_VOXELS):  # chunks bound the int64 temporaries
        stop = start + _CHUNK_VOXELS
        r, p = flat_ref[start:stop].astype(np.int64), flat_pred[start:stop]
        if lut is not None:
            r, p = lut[r], lut[p]
        confusion += np.bincount(r * k + p, minlength=k * k)
    confusion = confusion.reshape(k, k)
    out = {}
    for label in labels:
        i = label if lut is None else int(lut[label])
        tp = int(confusion[i, i])
        n_ref, n_pred = int(confusion[i].sum()), int(confusion[:, i].sum())
        out[label] = 1.0 if n_ref + n_pred == 0 else 2.0 * tp / (n_ref + n_pred)
    return out
