"""Declared label values and the training indices the network learns: ``(0, 1, 200)`` <-> ``0, 1, 2``.

Example:
    >>> values = label_values({"background": 0, "organ": 1, "lesion": 200})
    >>> values
    (0, 1, 200)
    >>> import numpy as np
    >>> values_to_indices(np.array([0, 200, 1]), values).tolist()
    [0, 2, 1]
    >>> indices_to_values(np.array([2, 0]), values).tolist()
    [200, 0]
"""

from __future__ import annotations

import numpy as np

from automedseg.serialize import PlanError


def label_values(labels: dict[str, int]) -> tuple[int, ...]:
    """The distinct declared label values, sorted: training index ``k`` stands for the ``k``-th.

    Background (0) is always index 0, so sparse or large values (``{0, 1, 200}``) train as consecutive
    classes ``0..K-1`` and the network has ``K`` outputs.

    Raises:
        PlanError: No background 0 declared, or a negative value.

    Example:
        >>> label_values({"background": 0, "lesion": 200, "organ": 1})
        (0, 1, 200)
    """
    values = tuple(sorted({int(v) for v in labels.values()}))
    if not values or values[0] != 0:
        raise PlanError(f"labels {dict(labels)} must declare background as 0 and no negative value")
    return values


def index_dtype(num_classes: int) -> np.dtype:
    """Smallest signed integer dtype that holds training indices ``0..num_classes-1`` (int8 up to 128 classes)."""
    return np.dtype(np.int8 if num_classes <= 128 else np.int16 if num_classes <= 32768 else np.int32)


def value_dtype(values: tuple[int, ...]) -> np.dtype:
    """Unsigned dtype that holds every label value: uint8 below 256, uint16 below 65536, else int32."""
    top = max(values, default=0)
    return np.dtype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32)


def values_to_indices(seg: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """Map a label map of declared values to training indices (lookup table), in :func:`index_dtype`.

    Raises:
        ValueError: ``seg`` holds a value that is not in ``values`` (the message lists them).
    """
    seg = np.asarray(seg)
    dtype = index_dtype(len(values))
    if seg.size == 0:
        return seg.astype(dtype)
    lo, hi = int(seg.min()), int(seg.max())
    if values == tuple(range(len(values))) and lo >= 0 and hi < len(values):
        return seg.astype(dtype, copy=False)  # consecutive labels: indices are the values
    out = None
    if lo >= 0:
        lut = np.full(max(hi, values[-1]) + 1, -1, dtype=dtype)
        lut[list(values)] = np.arange(len(values))
        out = lut[seg]
    if out is None or (out < 0).any():
        undeclared = sorted(set(np.unique(seg).tolist()) - set(values))
        raise ValueError(f"label values {undeclared} are not declared (declared: {list(values)})")
    return out


def indices_to_values(index_map: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    """Map training indices (e.g. an argmax over class probabilities) back to the declared label values.

    The result has :func:`value_dtype`, so every value survives (200 stays 200, 40000 stays 40000).

    Raises:
        ValueError: An index outside ``0..len(values)-1``.
    """
    idx = np.asarray(index_map)
    lut = np.asarray(values, dtype=value_dtype(values))
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= len(values)):
        raise ValueError(f"training indices must lie in [0, {len(values) - 1}], got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return lut[idx.astype(np.intp, copy=False)]


