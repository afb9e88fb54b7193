"""Voxel-level precision-recall curves and average precision of class probabilities, each class against the rest.

Average precision (AP) is scikit-learn's ``average_precision_score``: with the distinct scores as thresholds in
descending order, ``AP = sum_n (R_n - R_(n-1)) * P_n`` where ``P_n`` and ``R_n`` are the precision and recall of
the voxels scoring at least the n-th threshold and ``R_0 = 0``; a step function, no interpolation. It is
undefined (``None`` / NaN) without a positive voxel (scikit-learn warns and returns 0 there).

Two ways to get there:

* :func:`precision_recall` / :func:`average_precision`: one array of any float dtype, exactly, by sorting.
* :func:`score_counts` / :func:`curve_from_counts`: over many cases without holding them, exactly for float16
  scores, which is what ``predict --save-probabilities`` and the cross-validation write (other dtypes are rounded
  to float16 first). The negatives and positives are counted per float16 value (the bit pattern of a
  non-negative float16 orders as its value; ``[0, 1]`` holds :data:`N_BINS` of them), the counts of the cases
  added, and the curve read off the summed counts: the same thresholds, counts and AP as sorting all voxels.

:func:`probability_counts` does that per label for one case and :func:`read_probabilities` reads a ``.npz``;
``automedseg evaluate --probabilities`` uses them (:func:`automedseg.metrics.evaluate_folders`) and stores the
curve of each label, thinned to at most :data:`MAX_CURVE_POINTS` points (:func:`thin_curve`), as a
:class:`PRCurve` in ``metrics_summary.json``.

Example:
    >>> scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3], np.float16)
    >>> truth = np.array([1, 0, 1, 0, 0], bool)
    >>> round(average_precision(scores, truth), 4)
    0.8333
    >>> curve = curve_from_counts(score_counts(scores, truth))
    >>> round(curve.average_precision, 4), curve.positives, curve.negatives, curve.recall
    (0.8333, 2, 3, (0.5, 0.5, 1.0, 1.0, 1.0))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from automedseg.errors import InputError

N_BINS = 0x3C00 + 1
"""Float16 values in ``[0, 1]``: bit patterns 0 (0.0) to 0x3C00 (1.0)."""

MAX_CURVE_POINTS = 200
"""At most this many points of a curve are stored (:func:`thin_curve`)."""


@dataclass(frozen=True, kw_only=True)
class PRCurve:
    """The precision-recall curve of one class against the rest, over every voxel of the evaluated cases.

    Attributes:
        average_precision: AP as scikit-learn defines it (module note); ``None`` without a positive voxel.
        positives: Voxels of the class in the references.
        negatives: The other voxels.
        threshold: Probability thresholds, descending; a voxel counts as predicted when its probability is at
            least the threshold. A thinned subset of the distinct probabilities (:func:`thin_curve`), always with
            the highest and the lowest.
        precision: Precision at each threshold.
        recall: Recall at each threshold (nondecreasing).

    Example:
        >>> PRCurve(average_precision=1.0, positives=1, negatives=0, threshold=(0.5,), precision=(1.0,),
        ...         recall=(1.0,)).points
        1
    """

    average_precision: float | None
    positives: int
    negatives: int
    threshold: tuple[float, ...] = ()
    precision: tuple[float, ...] = ()
    recall: tuple[float, ...] = ()

    @property
    def points(self) -> int:
        """How many points the stored curve has."""
        return len(self.threshold)


def precision_recall(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact precision and recall at every distinct score, by sorting (one array, any float dtype).

    Args:
        scores: Scores of any shape (e.g. one class's probabilities).
        targets: Whether each voxel belongs to the class (same shape; any dtype, nonzero is true).

    Returns:
        ``(precision, recall, thresholds)``, float64, thresholds descending (scikit-learn's
        ``precision_recall_curve`` reversed, without its final ``(1, 0)`` point). Recall is NaN without positives.

    Raises:
        ValueError: Shapes differ or a score is NaN.

    Example:
        >>> p, r, t = precision_recall(np.array([0.2, 0.8, 0.8, 0.5]), np.array([0, 1, 0, 1]))
        >>> p.tolist(), r.tolist(), t.tolist()
        ([0.5, 0.6666666666666666, 0.5], [0.5, 1.0, 1.0], [0.8, 0.5, 0.2])
    """
    s, t = _flat(scores, targets)
    if np.isnan(s).any():
        raise ValueError("precision_recall: NaN scores")
    order = np.argsort(s, kind="stable")[::-1]
    s, t = s[order], t[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1] if s.size else np.zeros(0, np.intp)
    tps = np.cumsum(t, dtype=np.int64)[last]
    fps = last + 1 - tps
    return _precision_recall(tps, fps) + (s[last].astype(np.float64),)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of ``scores`` for ``targets``, exactly as scikit-learn's ``average_precision_score``.

    NaN without a positive. See :func:`precision_recall` for the arguments.

    Example:
        >>> average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.8333333333333333
    """
    precision, recall, _ = precision_recall(scores, targets)
    return _ap(precision, recall)


def score_counts(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negatives and positives per float16 score value: counts of several cases add up.

    Args:
        scores: Probabilities in ``[0, 1]``, any shape; rounded to float16 unless they are float16.
        targets: Whether each voxel belongs to the class (same shape).

    Returns:
        int64 ``(2, N_BINS)``: row 0 the negatives, row 1 the positives, column ``i`` the float16 value of bit
        pattern ``i``.

    Raises:
        ValueError: Shapes differ, or a score is not finite or lies outside ``[0, 1]``.

    Example:
        >>> c = score_counts(np.array([0.0, 1.0, 1.0]), np.array([0, 1, 0]))
        >>> c.shape, c[:, 0].tolist(), c[:, -1].tolist()
        ((2, 15361), [1, 0], [1, 1])
    """
    s, t = _flat(np.asarray(scores, dtype=np.float16), targets)
    if s.size and not (np.isfinite(s).all() and float(s.min()) >= 0 and float(s.max()) <= 1):
        raise ValueError("scores must be finite probabilities in [0, 1]")
    keys = (s.view(np.uint16) & 0x7FFF).astype(np.intp)  # clearing the sign bit makes -0.0 0
    return np.bincount(keys * 2 + t, minlength=2 * N_BINS).reshape(N_BINS, 2).T.astype(np.int64)


def curve_from_counts(counts: np.ndarray, *, max_points: int | None = MAX_CURVE_POINTS) -> PRCurve:
    """The curve and AP of summed :func:`score_counts`, thinned to ``max_points`` (``None``: every point).

    Example:
        >>> c = curve_from_counts(score_counts(np.array([0.25, 0.75]), np.array([0, 1])))
        >>> c.average_precision, c.threshold, c.precision
        (1.0, (0.75, 0.25), (1.0, 0.5))
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (2, N_BINS):
        raise ValueError(f"counts of shape {counts.shape}, expected (2, {N_BINS})")
    present = np.flatnonzero(counts.sum(axis=0))[::-1]  # descending score
    tps, fps = np.cumsum(counts[1, present]), np.cumsum(counts[0, present])
    precision, recall = _precision_recall(tps, fps)
    thresholds = np.arange(N_BINS, dtype=np.uint16).view(np.float16)[present].astype(np.float64)
    positives, negatives = int(counts[1].sum()), int(counts[0].sum())
    ap = _ap(precision, recall)
    if positives == 0:  # no recall to speak of: no curve
        precision, recall, thresholds = precision[:0], recall[:0], thresholds[:0]
    keep = thin_curve(precision, recall, max_points=max_points)
    return PRCurve(average_precision=None if np.isnan(ap) else ap, positives=positives, negatives=negatives,
                   threshold=_floats(thresholds[keep]), precision=_floats(precision[keep]),
                   recall=_floats(recall[keep]))


def thin_curve(precision: np.ndarray, recall: np.ndarray, *, max_points: int | None = MAX_CURVE_POINTS) -> np.ndarray:
    """Indices of at most ``max_points`` points spread evenly along the curve's length, first and last included.

    Steep and flat stretches get points alike (the length is measured in the recall-precision plane).

    Example:
        >>> thin_curve(np.ones(1000), np.linspace(0, 1, 1000), max_points=5).tolist()
        [0, 250, 500, 750, 999]
    """
    n = len(recall)
    if max_points is None or n <= max_points:
        return np.arange(n)
    if max_points < 2:
        raise ValueError(f"max_points {max_points}: keep at least 2")
    step = np.hypot(np.diff(recall), np.diff(precision))
    length = np.r_[0.0, np.cumsum(step)]
    if length[-1] <= 0:
        return np.array([0, n - 1])
    marks = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
    return np.unique(np.r_[0, np.clip(marks, 0, n - 1), n - 1])


def read_probabilities(path: Path, *, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The class probabilities of a case's ``.npz`` and the label value of each channel.

    Args:
        path: ``<case>.npz`` with ``probabilities`` ``(K, Z, Y, X)`` and, when ``predict`` or the
            cross-validation of this version wrote it, ``label_values`` (channel ``k``'s label). Without
            ``label_values`` the channels are taken as labels ``0 .. K-1`` (consecutive labels, nnU-Net's rule).
        shape: The reference's shape ``(Z, Y, X)`` (``Z = 1`` for a 2D image).

    Raises:
        InputError: A missing, unreadable or malformed file, or one whose grid is not ``shape`` (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing (predict with --save-probabilities writes it)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "probabilities" not in z.files:
                raise InputError(f"{path}: has no 'probabilities' array (found {z.files})")
            probs = z["probabilities"]
            values = tuple(int(v) for v in z["label_values"]) if "label_values" in z.files else None
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: not a readable .npz ({e})") from None
    if probs.ndim != 4 or tuple(probs.shape[1:]) != tuple(shape) or probs.shape[0] < 2:
        raise InputError(f"{path}: probabilities of shape {probs.shape}; expected (K, {', '.join(map(str, shape))}) "
                         "with K >= 2 classes, on the reference's grid")
    values = values if values is not None else tuple(range(probs.shape[0]))
    if len(values) != probs.shape[0]:
        raise InputError(f"{path}: {len(values)} label_values for {probs.shape[0]} probability channels")
    return probs, values


def probability_counts(reference: np.ndarray, probabilities: np.ndarray, *, labels: Sequence[int],
                       label_values: Sequence[int], source: str = "probabilities") -> dict[int, np.ndarray]:
    """:func:`score_counts` of each label (its channel's probabilities against ``reference == label``).

    Args:
        reference: Label map ``(Z, Y, X)``.
        probabilities: ``(K, Z, Y, X)``.
        labels: Labels to count.
        label_values: Channel ``k``'s label value.
        source: Names the probabilities in errors.

    Raises:
        InputError: A label without a channel, or probabilities outside ``[0, 1]`` (names ``source``).

    Example:
        >>> ref = np.array([[[0, 1]]])
        >>> probs = np.array([[[[0.75, 0.25]]], [[[0.25, 0.75]]]], np.float16)
        >>> int(probability_counts(ref, probs, labels=[1], label_values=[0, 1])[1].sum())
        2
    """
    channel = {int(v): k for k, v in enumerate(label_values)}
    out = {}
    for label in labels:
        if int(label) not in channel:
            raise InputError(f"{source}: no probability channel for label {label} (channels are labels "
                             f"{list(label_values)})")
        try:
            out[int(label)] = score_counts(probabilities[channel[int(label)]], reference == label)
        except ValueError as e:
            raise InputError(f"{source}: {e}") from None
    return out


def add_counts(total: dict[int, np.ndarray], case: Mapping[int, np.ndarray]) -> None:
    """Add one case's :func:`probability_counts` to ``total`` (label -> counts), in place.

    Example:
        >>> total = {}
        >>> add_counts(total, {1: np.ones((2, N_BINS), np.int64)})
        >>> add_counts(total, {1: np.ones((2, N_BINS), np.int64)})
        >>> int(total[1][0, 0])
        2
    """
    for label, counts in case.items():
        if label in total:
            total[label] += counts
        else:
            total[label] = np.array(counts, dtype=np.int64, copy=True)


def _flat(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, t = np.asarray(scores), np.asarray(targets)
    if s.shape != t.shape:
        raise ValueError(f"scores of shape {s.shape}, targets of shape {t.shape}")
    return s.ravel(), t.ravel().astype(bool).view(np.uint8)


def _precision_recall(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tps, fps = tps.astype(np.float64), fps.astype(np.float64)
    total = tps[-1] if tps.size else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return tps / (tps + fps), tps / total if total > 0 else np.full_like(tps, np.nan)


def _ap(precision: np.ndarray, recall: np.ndarray) -> float:
    if not recall.size or np.isnan(recall[-1]):
        return float("nan")
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)
