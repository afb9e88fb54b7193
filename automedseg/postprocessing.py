"""Connected-component post-processing, chosen on cross-validation (nnU-Net's rule); owner of
``postprocessing.json``.

The operations are those of :mod:`automedseg.components` (re-exported here): :func:`keep_largest_component`
(of the whole foreground or of each listed class) and :func:`remove_small_components`.

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

The choice is a :class:`Postprocessing` (frozen), written as a small JSON object by :meth:`Postprocessing.save`
and read back, checked field by field, by :meth:`Postprocessing.load` (never a pickle)::

    {"format": "automedseg-postprocessing", "version": 1, "connectivity": "full",
     "labels": [1, 2], "keep_largest_foreground": false, "keep_largest_labels": [1],
     "min_voxels": {"2": 12}, "n_cases": 40,
     "dice_before": {"1": 0.91, "2": 0.80, "mean": 0.855}, "dice_after": {...}, "steps": [...]}

``steps`` records every test with the per-class Dice before and after, whether it was adopted and why
(:class:`PostprocessingStep`). Version 1 rules: ``format`` and ``version`` may be absent (they default to
these values); only ``keep_largest_foreground``, ``keep_largest_labels`` and ``min_voxels`` are required; keys
this version does not know are ignored (a file edited by hand may hold notes).

Example:
    >>> seg = np.zeros((1, 6, 6), np.uint8); seg[0, :2, :2] = 1; seg[0, 5, 5] = 1
    >>> choice = Postprocessing(keep_largest_foreground=True, keep_largest_labels=(), min_voxels={})
    >>> int(apply_postprocessing(seg, choice).sum())
    4
    >>> Postprocessing.from_dict(choice.to_dict()) == choice
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automedseg.atomic import atomic_write_json
from automedseg.components import (  # noqa: F401  (re-exported)
    keep_largest_component,
    label_components,
    largest_only,
    remove_small_components,
)
from automedseg.errors import InputError
from automedseg.mask_metrics import dice_per_label
from automedseg.serialize import PlanError, from_jsonable, to_jsonable

if TYPE_CHECKING:
    from automedseg.workspace import Workspace

FORMAT_NAME = "automedseg-postprocessing"
FORMAT_VERSION = 1
SMALL_COMPONENT_QUANTILES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25)
"""Quantiles of the reference component sizes tried as ``min_voxels`` thresholds."""
DEFAULT_TOLERANCE = 1e-6
"""Dice differences smaller than this count as equal (neither a gain nor a loss)."""
_OMIT = {"omit_if_none": True}


Case = tuple[np.ndarray, np.ndarray, Sequence[float]]
"""One cross-validation case: (reference label map, predicted label map, spacing (z, y, x) in mm)."""


class PostprocessingError(InputError):
    """A post-processing file or choice is malformed; the message names the file and the field (a ValueError)."""


# ----------------------------------------------------------------------------------------------------
# postprocessing.json
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostprocessingStep:
    """One test of :func:`choose_postprocessing` (informative: :func:`apply_postprocessing` does not read it).

    Attributes:
        step: ``keep_largest_foreground``, ``keep_largest`` (one class) or ``remove_small`` (one class).
        adopted: Whether the operation is part of the choice.
        label: The class tested (the per-class steps).
        reason: Why the foreground step was adopted or not.
        min_voxels: The threshold adopted (``remove_small``; ``None``: not adopted).
        dice_before: Mean Dice before the step: per class plus ``"mean"`` (foreground step), or of the class.
        dice_after: The same with the operation applied.
        candidates: ``remove_small``: mean Dice of the class per threshold tried.
    """

    step: str
    adopted: bool
    label: int | None = field(default=None, metadata=_OMIT)
    reason: str | None = field(default=None, metadata=_OMIT)
    min_voxels: int | None = field(default=None, metadata=_OMIT)
    dice_before: dict[str, float | None] | float | None = None
    dice_after: dict[str, float | None] | float | None = None
    candidates: dict[str, float | None] | None = field(default=None, metadata=_OMIT)


@dataclass(frozen=True, kw_only=True)
class Postprocessing:
    """The post-processing chosen on cross-validation: the content of ``postprocessing.json``.

    Attributes:
        keep_largest_foreground: Keep the largest component of the whole foreground (applied first).
        keep_largest_labels: Then keep the largest component of each of these classes.
        min_voxels: Then, per class (a string key, as in the JSON), remove components smaller than this.
        format: Always :data:`FORMAT_NAME`.
        version: Always :data:`FORMAT_VERSION`.
        connectivity: Always ``"full"`` (see :mod:`automedseg.components`).
        labels: The foreground classes the choice was evaluated on.
        n_cases: Cross-validation cases it was chosen on.
        tolerance: Dice differences up to this counted as no change.
        dice_before: Mean Dice per class (string keys) and their ``"mean"``, without post-processing.
        dice_after: The same with the choice applied.
        steps: Every test made, in order.
        configuration: The configuration or ``+``-joined ensemble it was chosen for.
        members: Its configurations.
        cases: The cases it was chosen on.
        missing: What was missing from the cross-validation outputs (one line each).
    """

    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    connectivity: str = "full"
    labels: tuple[int, ...] = ()
    keep_largest_foreground: bool
    keep_largest_labels: tuple[int, ...]
    min_voxels: dict[str, int]
    n_cases: int | None = field(default=None, metadata=_OMIT)
    tolerance: float | None = field(default=None, metadata=_OMIT)
    dice_before: dict[str, float | None] = field(default_factory=dict)
    dice_after: dict[str, float | None] = field(default_factory=dict)
    steps: tuple[PostprocessingStep, ...] = ()
    configuration: str | None = field(default=None, metadata=_OMIT)
    members: tuple[str, ...] = ()
    cases: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.format != FORMAT_NAME:
            raise PlanError(f"format: {self.format!r}, expected {FORMAT_NAME!r}")
        if self.version != FORMAT_VERSION:
            raise PlanError(f"version: {self.version!r} is not supported (this automedseg reads {FORMAT_VERSION})")
        if self.connectivity != "full":
            raise PlanError(f"connectivity: {self.connectivity!r}, expected 'full'")
        for name in ("labels", "keep_largest_labels"):
            values = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise PlanError(f"{name}: must be positive class numbers, got {list(values)}")
        for key, size in self.min_voxels.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) > 0):
                raise PlanError(f"min_voxels: key {key!r} is not a positive class number")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise PlanError(f"min_voxels.{key}: must be a non-negative integer, got {size!r}")

    @property
    def min_voxels_by_label(self) -> dict[int, int]:
        """``min_voxels`` with integer class keys, in class order."""
        return {int(k): int(v) for k, v in sorted(self.min_voxels.items(), key=lambda kv: int(kv[0]))}

    def operations(self) -> list[str]:
        """The operations, in the order they are applied, in words (empty: none)."""
        ops = []
        if self.keep_largest_foreground:
            ops.append("keep the largest foreground component")
        if self.keep_largest_labels:
            ops.append("keep the largest component of class(es) " + ", ".join(map(str, self.keep_largest_labels)))
        for label, size in self.min_voxels_by_label.items():
            ops.append(f"remove components of class {label} smaller than {size} voxels")
        return ops

    def with_provenance(self, *, configuration: str, members: Sequence[str], cases: Sequence[str],
                        missing: Sequence[str]) -> Postprocessing:
        """A copy that records what it was chosen for and on."""
        return dataclasses.replace(self, configuration=configuration, members=tuple(members), cases=tuple(cases),
                                   missing=tuple(missing))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (fields left at ``None`` that are marked optional are left out)."""
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "post-processing") -> Postprocessing:
        """Build and check a choice from its JSON form; ``where`` (the file) starts every error message.

        ``format`` and ``version`` are checked first (a file of another version fails on them, not on a field that
        version renamed); unknown keys are ignored (version 1 always allowed them).

        Raises:
            PostprocessingError: Not an object, another format or version, or a field missing or wrong (named).
        """
        if not isinstance(data, dict):
            raise PostprocessingError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for key, expected in (("format", FORMAT_NAME), ("version", FORMAT_VERSION)):
            if data.get(key, expected) != expected:
                raise PostprocessingError(f"{where}: {key} {data[key]!r} is not supported (this automedseg reads "
                                          f"{expected!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return from_jsonable(cls, {k: v for k, v in data.items() if k in known}, where)
        except PlanError as e:
            raise PostprocessingError(str(e)) from None

    def save(self, path: Path) -> None:
        """Write ``path`` as indented JSON, atomically (non-finite numbers as ``null``)."""
        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Postprocessing:
        """Read and check a ``postprocessing.json``.

        Raises:
            PostprocessingError: The file is missing, unreadable, not JSON, or a field is missing or wrong (the
                message names the file and the field).
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
        return cls.from_dict(data, str(path))


def save_postprocessing(choice: Postprocessing, path: Path) -> None:
    """Write a choice to ``path`` (:meth:`Postprocessing.save`)."""
    choice.save(path)


def load_postprocessing(path: Path) -> Postprocessing:
    """Read a ``postprocessing.json`` (:meth:`Postprocessing.load`; raises :class:`PostprocessingError`)."""
    return Postprocessing.load(path)


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
                          tolerance: float = DEFAULT_TOLERANCE) -> Postprocessing:
    """Decide the post-processing on cross-validation predictions (see the module docstring).

    The cases are read three times in order (one pass per step), so ``cases`` may be a lazy sequence
    that loads each case from disk on indexing.

    Args:
        cases: ``(reference, prediction, spacing_zyx_mm)`` per case; label maps of equal shape.
        labels: Foreground classes to evaluate (e.g. ``[1, 2]``).
        remove_small: Also try removing small components (step 3).
        tolerance: Dice differences up to this count as no change.

    Returns:
        The choice, with the figures and every step it tested.

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
                    ref_sizes[label].extend(int(s) for s in label_components(mask)[1][1:])
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
    steps = [PostprocessingStep("keep_largest_foreground", use_fg, reason=reason, dice_before=_figures(base_mean),
                                dice_after=_figures(fg_mean))]
    current = dict(fg_mean if use_fg else base_mean)

    # Pass 2: largest component per class, on top of step 1.
    per_class_largest: list[dict[int, float]] = []
    for i in range(n):
        ref, pred, _ = cases[i]
        ref, pred = _squeeze(ref), _squeeze(pred)
        if use_fg:
            pred = keep_largest_component(pred, labels=None)
        per_class_largest.append({label: _binary_dice(ref == label, largest_only(pred == label))
                                  for label in labels})
    largest_mean = _means(per_class_largest, labels)
    keep_largest_labels = []
    for label in labels:
        adopted = largest_mean[label] > current[label] + tolerance
        steps.append(PostprocessingStep("keep_largest", adopted, label=label, dice_before=current[label],
                                        dice_after=largest_mean[label]))
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
                labeled, sizes = label_components(mask)
                for t in candidates[label]:
                    keep = sizes >= t
                    keep[0] = False
                    scores[label][t].append(_binary_dice(ref_mask, keep[labeled]))
        for label in todo:
            means = {t: float(np.mean(v)) for t, v in scores[label].items()}
            best = max(means, key=lambda t: (means[t], -t))  # the smallest threshold among equals
            adopted = means[best] > current[label] + tolerance
            steps.append(PostprocessingStep(
                "remove_small", adopted, label=label, min_voxels=best if adopted else None,
                dice_before=current[label], dice_after=means[best], candidates={str(t): d for t, d in means.items()}))
            if adopted:
                min_voxels[str(label)] = int(best)
                current[label] = means[best]

    return Postprocessing(
        labels=tuple(labels), keep_largest_foreground=use_fg, keep_largest_labels=tuple(keep_largest_labels),
        min_voxels=min_voxels, n_cases=n, tolerance=float(tolerance), dice_before=_figures(base_mean),
        dice_after=_figures(current), steps=tuple(steps))


def no_postprocessing(labels: Sequence[int]) -> Postprocessing:
    """A choice that changes nothing (for tests and for writing a neutral file by hand)."""
    return Postprocessing(labels=tuple(sorted(int(v) for v in labels)), keep_largest_foreground=False,
                          keep_largest_labels=(), min_voxels={})


# ----------------------------------------------------------------------------------------------------
# Applying
# ----------------------------------------------------------------------------------------------------


def apply_postprocessing(seg: np.ndarray, choice: Postprocessing) -> np.ndarray:
    """Apply a choice to a label map (a new array of the same shape and dtype is returned).

    Order: largest foreground component, then largest component per class, then small components per
    class, exactly as the choice was evaluated.
    """
    out = np.asarray(seg)
    if choice.keep_largest_foreground:
        out = keep_largest_component(out, labels=None)
    if choice.keep_largest_labels:
        out = keep_largest_component(out, labels=choice.keep_largest_labels)
    for label, size in choice.min_voxels_by_label.items():
        out = remove_small_components(out, min_voxels=size, labels=[label])
    if out is seg:
        out = np.array(seg, copy=True)
    return out

# ----------------------------------------------------------------------------------------------------
# Work folder
# ----------------------------------------------------------------------------------------------------


def postprocessing_path(ws: Workspace, configuration: str) -> Path:
    """Where the choice of a configuration (``<work>/C/postprocessing.json``) or an ensemble
    ``A+B`` (``<work>/postprocessing_A+B.json``, as ``automedseg predict`` looks for it) is stored."""
    if "+" in configuration:
        return ws.root / f"postprocessing_{configuration}.json"
    return ws.postprocessing_path(configuration)
