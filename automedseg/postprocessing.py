"""Connected-component post-processing, chosen on cross-validation (nnU-Net's rule).

Two operations on integer label maps:

* :func:`keep_largest_component`: keep only the largest connected component, either of the whole
  foreground (``labels=None``: the components of ``seg > 0``; a component may mix classes) or of each
  listed class separately. Removed voxels become background (0).
* :func:`remove_small_components`: remove components smaller than ``min_voxels``.

Connectivity is *full* (26-neighbourhood in 3D, 8 in 2D): voxels touching at a corner belong to the same
component, so thin diagonal structures are not cut into pieces.

:func:`choose_postprocessing` decides on the cross-validation predictions which operations to apply:

1. Largest component of the whole foreground: adopted only when it raises the mean foreground Dice and
   no class's mean Dice drops (by more than ``tolerance``).
2. Then, on top of that, largest component of each class separately: adopted for a class when it raises
   that class's mean Dice. (Removing voxels of class ``c`` only changes class ``c``'s mask, so the classes
   are decided independently.)
3. Optionally, for each class not already reduced to its largest component, the ``min_voxels`` threshold
   that removes small components best, among candidate sizes taken from the reference: the quantiles
   :data:`SMALL_COMPONENT_QUANTILES` of the sizes of that class's connected components in the reference
   labels, and half the smallest reference component. Adopted when it raises that class's mean Dice.

The choice is a small JSON object (see :func:`save_postprocessing`), never a pickle::

    {"format": "automedseg-postprocessing", "version": 1, "connectivity": "full",
     "labels": [1, 2], "keep_largest_foreground": false, "keep_largest_labels": [1],
     "min_voxels": {"2": 12}, "n_cases": 40,
     "dice_before": {"1": 0.91, "2": 0.80, "mean": 0.855}, "dice_after": {...}, "steps": [...]}

``steps`` records every test with the per-class Dice before and after, whether it was adopted and why.

Example:
    >>> seg = np.zeros((1, 6, 6), np.uint8); seg[0, :2, :2] = 1; seg[0, 5, 5] = 1
    >>> int(keep_largest_component(seg, labels=None).sum())
    4
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from automedseg.errors import InputError
from automedseg.io import atomic_write_json
from automedseg.mask_metrics import dice_per_label

if TYPE_CHECKING:
    from automedseg.workspace import Workspace

FORMAT_NAME = "automedseg-postprocessing"
FORMAT_VERSION = 1
SMALL_COMPONENT_QUANTILES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25)
"""Quantiles of the reference component sizes tried as ``min_voxels`` thresholds."""
DEFAULT_TOLERANCE = 1e-6
"""Dice differences smaller than this count as equal (neither a gain nor a loss)."""


Case = tuple[np.ndarray, np.ndarray, Sequence[float]]
"""One cross-validation case: (reference label map, predicted label map, spacing (z, y, x) in mm)."""


class PostprocessingError(InputError):
    """A post-processing file or choice is malformed; the message names the file and the field (a ValueError)."""


# ----------------------------------------------------------------------------------------------------
# Operations on label maps
# ----------------------------------------------------------------------------------------------------


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (full connectivity) and their sizes; ``sizes[0]`` is the background."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labeled, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labeled.ravel(), minlength=n + 1)
    return labeled, sizes


def _largest_only(mask: np.ndarray) -> np.ndarray:
    """The largest component of a binary mask (the first one on ties); an empty mask stays empty."""
    if not mask.any():
        return mask
    labeled, sizes = _label_components(mask)
    sizes[0] = 0
    return labeled == int(np.argmax(sizes))


def _without_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """The mask without components of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    labeled, sizes = _label_components(mask)
    keep = sizes >= min_voxels
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
    """
    seg = np.asarray(seg)
    labels = _check_labels(labels)
    out = seg.copy()
    if labels is None:
        mask = seg > 0
        out[mask & ~_largest_only(mask)] = 0
        return out
    for label in labels:
        mask = seg == label
        out[mask & ~_largest_only(mask)] = 0
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
    """
    if int(min_voxels) != min_voxels or min_voxels < 0:
        raise ValueError(f"min_voxels must be a non-negative integer, got {min_voxels!r}")
    seg = np.asarray(seg)
    labels = _check_labels(labels)
    out = seg.copy()
    masks = [seg > 0] if labels is None else [seg == label for label in labels]
    for mask in masks:
        out[mask & ~_without_small(mask, int(min_voxels))] = 0
    return out


# ----------------------------------------------------------------------------------------------------
# Dice bookkeeping
# ----------------------------------------------------------------------------------------------------


def _binary_dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty (the convention of :mod:`automedseg.metrics`)."""
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    if n_ref + n_pred == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(ref & pred)) / (n_ref + n_pred)


def _means(per_case: Sequence[Mapping[int, float]], labels: Sequence[int]) -> dict[int, float]:
    return {label: float(np.mean([case[label] for case in per_case])) for label in labels}


def _figures(means: Mapping[int, float]) -> dict[str, float]:
    """Per-class means as JSON (string keys) plus their mean under ``"mean"``."""
    out = {str(k): float(v) for k, v in means.items()}
    out["mean"] = float(np.mean(list(means.values()))) if means else math.nan
    return out


def _squeeze(seg: np.ndarray) -> np.ndarray:
    seg = np.asarray(seg)
    return seg[0] if seg.ndim == 4 and seg.shape[0] == 1 else seg


# ----------------------------------------------------------------------------------------------------
# Choosing
# ----------------------------------------------------------------------------------------------------


def _small_component_candidates(sizes: Sequence[int]) -> list[int]:
    if not sizes:
        return []
    arr = np.asarray(sizes, dtype=np.float64)
    values = {int(round(float(np.quantile(arr, q)))) for q in SMALL_COMPONENT_QUANTILES}
    values.add(int(arr.min() // 2))
    return sorted(v for v in values if v >= 2)


def choose_postprocessing(cases: Sequence[Case], *, labels: Sequence[int], remove_small: bool = True,
                          tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Decide the post-processing on cross-validation predictions (see the module docstring).

    The cases are read three times in order (one pass per step), so ``cases`` may be a lazy sequence
    that loads each case from disk on indexing.

    Args:
        cases: ``(reference, prediction, spacing_zyx_mm)`` per case; label maps of equal shape.
        labels: Foreground classes to evaluate (e.g. ``[1, 2]``).
        remove_small: Also try removing small components (step 3).
        tolerance: Dice differences up to this count as no change.

    Returns:
        The JSON-able choice (see :func:`save_postprocessing`).

    Raises:
        ValueError: No cases, no labels, or a reference and prediction of different shapes.
    """
    labels = sorted({int(v) for v in labels})
    if not labels or labels[0] <= 0:
        raise ValueError(f"labels must be a non-empty list of foreground classes, got {labels}")
    n = len(cases)
    if n == 0:
        raise ValueError("choose_postprocessing needs at least one case")

    # Pass 1: baseline, largest foreground component, reference component sizes.
    base: list[dict[int, float]] = []
    fg_largest: list[dict[int, float]] = []
    ref_sizes: dict[int, list[int]] = {label: [] for label in labels}
    for i in range(n):
        ref, pred, _ = cases[i]
        ref, pred = _squeeze(ref), _squeeze(pred)
        if ref.shape != pred.shape:
            raise ValueError(f"case {i}: reference shape {ref.shape} != prediction shape {pred.shape}")
        base.append(dice_per_label(ref, pred, labels=labels))
        fg_largest.append(dice_per_label(ref, keep_largest_component(pred, labels=None), labels=labels))
        if remove_small:
            for label in labels:
                mask = ref == label
                if mask.any():
                    ref_sizes[label].extend(int(s) for s in _label_components(mask)[1][1:])
    base_mean = _means(base, labels)
    fg_mean = _means(fg_largest, labels)
    gain = float(np.mean(list(fg_mean.values())) - np.mean(list(base_mean.values())))
    hurt = [label for label in labels if fg_mean[label] < base_mean[label] - tolerance]
    use_fg = gain > tolerance and not hurt
    if use_fg:
        reason = f"mean Dice +{gain:.6f}, no class worse"
    elif hurt:
        reason = f"class(es) {hurt} would get worse"
    else:
        reason = f"mean Dice change {gain:+.6f} is not a gain"
    steps: list[dict[str, Any]] = [{
        "step": "keep_largest_foreground", "adopted": use_fg, "reason": reason,
        "dice_before": _figures(base_mean), "dice_after": _figures(fg_mean),
    }]
    current = dict(fg_mean if use_fg else base_mean)

    # Pass 2: largest component per class, on top of step 1.
    per_class_largest: list[dict[int, float]] = []
    for i in range(n):
        ref, pred, _ = cases[i]
        ref, pred = _squeeze(ref), _squeeze(pred)
        if use_fg:
            pred = keep_largest_component(pred, labels=None)
        per_class_largest.append({label: _binary_dice(ref == label, _largest_only(pred == label))
                                  for label in labels})
    largest_mean = _means(per_class_largest, labels)
    keep_largest_labels = []
    for label in labels:
        adopted = largest_mean[label] > current[label] + tolerance
        steps.append({
            "step": "keep_largest", "label": label, "adopted": adopted,
            "dice_before": current[label], "dice_after": largest_mean[label],
        })
        if adopted:
            keep_largest_labels.append(label)
            current[label] = largest_mean[label]

    # Pass 3: remove small components per class (classes not reduced to their largest component).
    min_voxels: dict[str, int] = {}
    todo = [label for label in labels if label not in keep_largest_labels] if remove_small else []
    candidates = {label: _small_component_candidates(ref_sizes[label]) for label in todo}
    todo = [label for label in todo if candidates[label]]
    if todo:
        scores: dict[int, dict[int, list[float]]] = {
            label: {t: [] for t in candidates[label]} for label in todo}
        for i in range(n):
            ref, pred, _ = cases[i]
            ref, pred = _squeeze(ref), _squeeze(pred)
            if use_fg:
                pred = keep_largest_component(pred, labels=None)
            if keep_largest_labels:
                pred = keep_largest_component(pred, labels=keep_largest_labels)
            for label in todo:
                ref_mask, mask = ref == label, pred == label
                labeled, sizes = _label_components(mask)
                for t in candidates[label]:
                    keep = sizes >= t
                    keep[0] = False
                    scores[label][t].append(_binary_dice(ref_mask, keep[labeled]))
        for label in todo:
            means = {t: float(np.mean(v)) for t, v in scores[label].items()}
            best = max(means, key=lambda t: (means[t], -t))  # the smallest threshold among equals
            adopted = means[best] > current[label] + tolerance
            steps.append({
                "step": "remove_small", "label": label, "adopted": adopted,
                "min_voxels": best if adopted else None, "dice_before": current[label],
                "dice_after": means[best], "candidates": {str(t): d for t, d in means.items()},
            })
            if adopted:
                min_voxels[str(label)] = int(best)
                current[label] = means[best]

    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "connectivity": "full",
        "labels": labels,
        "keep_largest_foreground": use_fg,
        "keep_largest_labels": keep_largest_labels,
        "min_voxels": min_voxels,
        "n_cases": n,
        "tolerance": tolerance,
        "dice_before": _figures(base_mean),
        "dice_after": _figures(current),
        "steps": steps,
    }


def no_postprocessing(labels: Sequence[int]) -> dict[str, Any]:
    """A choice that changes nothing (for tests and for writing a neutral file by hand)."""
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "connectivity": "full",
        "labels": sorted(int(v) for v in labels), "keep_largest_foreground": False,
        "keep_largest_labels": [], "min_voxels": {},
    }


# ----------------------------------------------------------------------------------------------------
# Applying, saving, loading
# ----------------------------------------------------------------------------------------------------


def validate_postprocessing(choice: Any, *, where: str = "post-processing") -> dict[str, Any]:
    """Check the fields :func:`apply_postprocessing` uses; raise :class:`PostprocessingError` naming them.

    Returns:
        ``choice`` itself (unchanged) when valid.
    """
    if not isinstance(choice, dict):
        raise PostprocessingError(f"{where}: expected a JSON object, got {type(choice).__name__}")
    if choice.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise PostprocessingError(f"{where}: 'format' is {choice.get('format')!r}, expected {FORMAT_NAME!r}")
    if choice.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise PostprocessingError(
            f"{where}: version {choice.get('version')!r} is not supported "
            f"(this automedseg reads {FORMAT_VERSION})")
    problems = []
    for key in ("keep_largest_foreground", "keep_largest_labels", "min_voxels"):
        if key not in choice:
            problems.append(f"required key '{key}' is missing")
    if "keep_largest_foreground" in choice and not isinstance(choice["keep_largest_foreground"], bool):
        problems.append("'keep_largest_foreground' must be true or false")
    kl = choice.get("keep_largest_labels", [])
    if not (isinstance(kl, list)
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in kl)):
        problems.append(f"'keep_largest_labels' must be a list of positive integers, got {kl!r}")
    mv = choice.get("min_voxels", {})
    if not isinstance(mv, dict):
        problems.append(f"'min_voxels' must be an object of label -> size, got {mv!r}")
    else:
        for k, v in mv.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) > 0):
                problems.append(f"'min_voxels' key {k!r} is not a positive class number")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"'min_voxels' value for {k!r} must be a non-negative integer, got {v!r}")
    if problems:
        raise PostprocessingError(f"{where}: " + "; ".join(problems))
    return choice


def apply_postprocessing(seg: np.ndarray, choice: Mapping[str, Any]) -> np.ndarray:
    """Apply a choice of :func:`choose_postprocessing` to a label map (same shape and dtype returned).

    Order: largest foreground component, then largest component per class, then small components per
    class, exactly as the choice was evaluated.
    """
    validate_postprocessing(dict(choice))
    out = np.asarray(seg)
    if choice["keep_largest_foreground"]:
        out = keep_largest_component(out, labels=None)
    if choice["keep_largest_labels"]:
        out = keep_largest_component(out, labels=choice["keep_largest_labels"])
    for label, size in sorted(choice["min_voxels"].items(), key=lambda kv: int(kv[0])):
        out = remove_small_components(out, min_voxels=int(size), labels=[int(label)])
    if out is seg:
        out = np.array(seg, copy=True)
    return out


def save_postprocessing(choice: Mapping[str, Any], path: Path) -> None:
    """Write a choice as indented JSON, atomically (validated first)."""
    validate_postprocessing(dict(choice), where=str(path))
    atomic_write_json(Path(path), _jsonable(dict(choice)))


def load_postprocessing(path: Path) -> dict[str, Any]:
    """Read and validate a post-processing JSON file.

    Raises:
        PostprocessingError: The file is missing, not JSON or lacks a field (the message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PostprocessingError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PostprocessingError(f"{path}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PostprocessingError(f"{path}: not valid JSON ({e})") from None
    return validate_postprocessing(data, where=str(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------------------------------
# Work folder
# ----------------------------------------------------------------------------------------------------


def postprocessing_path(ws: Workspace, configuration: str) -> Path:
    """Where the choice of a configuration (``<work>/C/postprocessing.json``) or an ensemble
    ``A+B`` (``<work>/postprocessing_A+B.json``, as ``automedseg predict`` looks for it) is stored."""
    if "+" in configuration:
        return ws.root / f"postprocessing_{configuration}.json"
    return ws.postprocessing_path(configuration)
