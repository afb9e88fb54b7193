"""Class-first foreground sampling weighted by how well each class is learned (``class_sampling: difficulty``).

The forced-foreground samples of a batch pick a class first, then a case that has it, then a voxel of it
(:class:`~automedseg.augmentation_sampler.PatchSampler`). Uniform over the classes, a small organ that the
network has not started to predict after a few epochs may never be learned in a short budget: on
``openkbp_hn_ct`` fold 3 (20 min, 28 epochs, AMD EPYC, 2 threads) the esophagus' pseudo-Dice stayed 0.000 in
every epoch while the six other organs reached 0.69-0.85 (``benchmarks/results/openkbp_cv.md``); a class
whose softmax has saturated towards background gets little gradient from the few voxels a uniform draw puts
in front of it. With ``difficulty`` the trainer measures, from the loss it computes anyway, the soft Dice of
each class over the last epoch's training batches and draws class ``k`` with probability proportional to
:func:`difficulty_weights` (``1 - dice_k``, at least :data:`MIN_CLASS_WEIGHT`): a class at 0 is drawn up to
ten times as often as one at 0.9; classes learned equally well are drawn equally often (uniform, as before).

The weights live in shared memory (:class:`SharedClassWeights`) so the augmentation worker processes, which
hold their own copy of the sampler, see each update.

Example:
    >>> difficulty_weights(np.array([0.0, 0.75, 0.95, np.nan])).round(3).tolist()
    [1.0, 0.25, 0.1, 1.0]
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MIN_CLASS_WEIGHT = 0.1
"""Weight of a perfectly learned class: every class keeps at least a tenth of a class not yet learned."""


def difficulty_weights(dice: np.ndarray, *, min_weight: float = MIN_CLASS_WEIGHT) -> np.ndarray:
    """Sampling weight of each class from its Dice: ``max(min_weight, 1 - dice)``; unknown (NaN) counts as 0.

    Args:
        dice: Dice per class in [0, 1] (NaN where not measured).
        min_weight: Smallest weight, in (0, 1].

    Returns:
        Float64 weights, one per class.
    """
    d = np.nan_to_num(np.asarray(dice, dtype=np.float64), nan=0.0)
    return np.maximum(float(min_weight), 1.0 - np.clip(d, 0.0, 1.0))


class SharedClassWeights:
    """Sampling weights per training label index, in memory shared with the loader's worker processes.

    Created before the workers start (they inherit it); all weights 1 (uniform) until :meth:`set` is called.
    Index 0 (background) is never drawn by the sampler; its weight is ignored.

    Args:
        num_classes: Output classes, background included.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        self._array = multiprocessing.RawArray("d", [1.0] * int(num_classes))

    def __len__(self) -> int:
        return len(self._array)

    def set(self, weights: Sequence[float] | np.ndarray) -> None:
        """Replace the weights (one per class, background included; each finite and > 0)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self),) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"need {len(self)} positive finite weights, got {w.tolist()}")
        self._array[:] = w.tolist()

    def get(self) -> np.ndarray:
        """A copy of the current weights."""
        return np.frombuffer(self._array, dtype=np.float64).copy()

    def pick(self, classes: Sequence[int], u: float) -> int:
        """The class of ``classes`` at ``u`` in [0, 1) of their cumulative normalised weights."""
        w = self.get()
        p = np.array([w[k] if 0 <= k < len(w) else 1.0 for k in classes])
        cum = np.cumsum(p / p.sum())
        return int(classes[min(int(np.searchsorted(cum, u, side="right")), len(classes) - 1)])


def foreground_weights(class_dice: np.ndarray) -> np.ndarray:
    """Weights per class index, background included (1.0), from the foreground classes' Dice.

    Example:
        >>> foreground_weights(np.array([0.0, 0.8])).round(2).tolist()
        [1.0, 1.0, 0.2]
    """
    return np.concatenate([[1.0], difficulty_weights(class_dice)])


def class_weights_for(
    mode: str, num_classes: int, history: Sequence[Mapping[str, Any]] = ()
) -> SharedClassWeights | None:
    """The shared weights a training run with ``class_sampling`` ``mode`` draws with (``None`` for uniform).

    A resumed run starts from the weights its last logged epoch ended with (``history``: the log's records).
    """
    if mode != "difficulty":
        return None
    weights = SharedClassWeights(num_classes)
    last = list(history[-1].get("class_weights") or ()) if history else []
    if len(last) == num_classes and all(isinstance(w, (int, float)) and w > 0 for w in last):
        weights.set(last)
    return weights


def update_class_weights(
    weights: SharedClassWeights | None, class_dice: np.ndarray | None
) -> tuple[list[float | None], list[float]]:
    """After an epoch: set ``weights`` from the training soft Dice per foreground class.

    Returns:
        The Dice (``None`` where not measured) and the weights now in force (empty for uniform sampling), as
        JSON-ready lists for the epoch's log record.
    """
    dice = [] if class_dice is None else [None if not np.isfinite(d) else round(float(d), 4) for d in class_dice]
    if weights is None or class_dice is None:
        return dice, []
    weights.set(foreground_weights(class_dice))
    return dice, [round(float(w), 4) for w in weights.get()]
