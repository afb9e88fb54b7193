"""Post-processing chosen on cross-validation (nnU-Net's rule, extended to morphology); owner of
``postprocessing.json``.

The operations are those of :mod:`automedseg.components` (re-exported here): :func:`keep_largest_component`
(of the whole foreground or of each listed class) and :func:`remove_small_components` (in voxels, version 1) or
:func:`remove_small_components_mm3`; and those of :mod:`automedseg.morphology`: opening and closing with a ball
of a radius in mm, and hole filling. The file itself (the typed :class:`Postprocessing`, its versions, reading and
writing) is :mod:`automedseg.postprocessing_format`, re-exported here.

:func:`choose_postprocessing` decides on the cross-validation predictions which operations to apply, each step on
top of those adopted before it, in the order they are applied:

1. Largest component of the whole foreground: adopted only when it raises the mean foreground Dice and
   no class's mean Dice drops (by more than ``tolerance``).
2. Largest component of each class separately: adopted for a class when it raises that class's mean Dice.
   (Removing voxels of class ``c`` only changes class ``c``'s mask, so the classes are decided independently.)
3. For each class not reduced to its largest component, the ``min_size_mm3`` threshold that removes small
   components best, among sizes taken from the reference: the quantiles :data:`SMALL_COMPONENT_QUANTILES` of the
   volumes (mm^3) of that class's connected components in the reference labels, and half the smallest.
4. Opening, then 5. closing, of each class with a ball of each radius of :data:`MORPHOLOGY_RADII_VOXELS` times
   the finest spacing of the cases (their median, in mm), and 6. hole filling of each class, in 3D and per slice
   along z (only per slice for single-slice images): for each class the best candidate, adopted when it raises
   that class's mean Dice. These operations change only the class's own voxels and background, so no other
   class's mask changes; closing and hole filling of two classes may want the same background voxel, which then
   stays background (:mod:`automedseg.morphology`). When two or more classes adopted closing or hole filling, the
   whole choice is applied once more to measure the Dice exactly, and a class that would end worse than after
   step 3 gives up its morphological operations (a ``withdrawn`` step), until none does.

Every test is recorded in ``steps`` with the Dice before and after; ``dice_after`` is the Dice of the choice.

Example:
    >>> seg = np.zeros((1, 6, 6), np.uint8); seg[0, :2, :2] = 1; seg[0, 5, 5] = 1
    >>> choice = Postprocessing(keep_largest_foreground=True, keep_largest_labels=(), min_voxels={})
    >>> int(apply_postprocessing(seg, choice).sum())
    4
    >>> ring = np.zeros((1, 5, 5), np.uint8); ring[0, 1:4, 1:4] = 1; ring[0, 2, 2] = 0
    >>> closed = Postprocessing(keep_largest_foreground=False, keep_largest_labels=(), min_voxels={},
    ...                         closing_radius_mm={"1": 1.0})
    >>> int(apply_postprocessing(ring, closed, spacing_mm=(999.0, 0.8, 0.8))[0, 2, 2])
    1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from automedseg.components import (  # noqa: F401  (re-exported)
    keep_largest_component,
    label_components,
    largest_only,
    remove_small_components,
    remove_small_components_mm3,
    voxel_volume_mm3,
)
from automedseg.mask_metrics import dice_per_label
from automedseg.morphology import close_classes, close_mask, fill_holes, fill_holes_mask, open_classes, open_mask
from automedseg.postprocessing_format import (  # noqa: F401  (re-exported)
    FORMAT_NAME,
    FORMAT_VERSION,
    READ_VERSIONS,
    VERSION_2_KEYS,
    Postprocessing,
    PostprocessingError,
    PostprocessingStep,
    load_postprocessing,
    save_postprocessing,
)

if TYPE_CHECKING:
    from automedseg.workspace import Workspace

SMALL_COMPONENT_QUANTILES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25)
"""Quantiles of the reference component volumes tried as ``min_size_mm3`` thresholds."""
MORPHOLOGY_RADII_VOXELS: tuple[float, ...] = (1.0, 2.0)
"""Opening and closing radii tried, in units of the finest voxel spacing of the cases."""
DEFAULT_TOLERANCE = 1e-6
"""Dice differences smaller than this count as equal (neither a gain nor a loss)."""

Case = tuple[np.ndarray, np.ndarray, Sequence[float]]
"""One cross-validation case: (reference label map, predicted label map, spacing (z, y, x) in mm)."""
_FIELDS = {"opening": "opening_radius_mm", "closing": "closing_radius_mm", "fill_holes": "fill_holes"}


# ----------------------------------------------------------------------------------------------------
# Applying
# ----------------------------------------------------------------------------------------------------


def apply_postprocessing(seg: np.ndarray, choice: Postprocessing, *,
                         spacing_mm: Sequence[float] | None = None) -> np.ndarray:
    """Apply a choice to a label map (a new array of the same shape and dtype is returned).

    Order: largest foreground component, largest component per class, small components per class (voxels, then
    mm^3), opening, closing, hole filling, exactly as the choice was evaluated.

    Args:
        seg: Integer label map ``(Z, Y, X)`` (a leading axis of one, ``(1, Z, Y, X)``, is accepted).
        choice: The post-processing.
        spacing_mm: The voxel spacing in mm in array order, one per spatial axis; needed when the choice has an
            operation in millimetres (:attr:`Postprocessing.needs_spacing`).

    Raises:
        ValueError: The choice needs the spacing and none (or one that does not fit ``seg``) was given.
    """
    seg = np.asarray(seg)
    if choice.needs_spacing and spacing_mm is None:
        raise ValueError(f"post-processing ({'; '.join(choice.operations())}) works in mm: pass spacing_mm")
    spacing = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)
    out = seg[0] if spacing is not None and seg.ndim == len(spacing) + 1 and seg.shape[0] == 1 else seg
    if choice.keep_largest_foreground:
        out = keep_largest_component(out, labels=None)
    if choice.keep_largest_labels:
        out = keep_largest_component(out, labels=choice.keep_largest_labels)
    for label, size in choice.min_voxels_by_label.items():
        out = remove_small_components(out, min_voxels=size, labels=[label])
    if spacing is not None:
        for label, mm3 in choice.min_size_mm3_by_label.items():
            out = remove_small_components_mm3(out, min_size_mm3=mm3, spacing_mm=spacing, labels=[label])
        if choice.opening_radius_mm:
            out = open_classes(out, radii_mm=choice.opening_radius_mm_by_label, spacing_mm=spacing)
        if choice.closing_radius_mm:
            out = close_classes(out, radii_mm=choice.closing_radius_mm_by_label, spacing_mm=spacing)
    if choice.fill_holes:
        out = fill_holes(out, modes=choice.fill_holes_by_label)
    out = out.reshape(seg.shape)
    return np.array(out, copy=True) if np.shares_memory(out, seg) else out


def no_postprocessing(labels: Sequence[int]) -> Postprocessing:
    """A choice that changes nothing (for tests and for writing a neutral file by hand)."""
    return Postprocessing(labels=tuple(sorted(int(v) for v in labels)), keep_largest_foreground=False,
                          keep_largest_labels=(), min_voxels={})


# ----------------------------------------------------------------------------------------------------
# Dice bookkeeping
# ----------------------------------------------------------------------------------------------------


def _binary_dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty (the convention of :mod:`automedseg.metrics`)."""
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    if n_ref + n_pred == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(ref & pred)) / (n_ref + n_pred)


def _means(per_case: Sequence[Mapping[Any, float]], keys: Sequence[Any]) -> dict[Any, float]:
    return {key: float(np.mean([case[key] for case in per_case])) for key in keys}


def _figures(means: Mapping[int, float]) -> dict[str, float]:
    """Per-class means as JSON (string keys) plus their mean under ``"mean"``."""
    out = {str(k): float(v) for k, v in means.items()}
    out["mean"] = float(np.mean(list(means.values()))) if means else math.nan
    return out


def _squeeze(seg: np.ndarray) -> np.ndarray:
    seg = np.asarray(seg)
    return seg[0] if seg.ndim == 4 and seg.shape[0] == 1 else seg


def _prepared(cases: Sequence[Case],
              choice: Postprocessing) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Each case as (reference, prediction with ``choice`` applied, spacing), read in order."""
    for i in range(len(cases)):
        ref, pred, spacing = cases[i]
        ref, pred, spacing = _squeeze(ref), _squeeze(pred), tuple(float(s) for s in spacing)
        if ref.shape != pred.shape:
            raise ValueError(f"case {i}: reference shape {ref.shape} != prediction shape {pred.shape}")
        yield ref, apply_postprocessing(pred, choice, spacing_mm=spacing), spacing


# ----------------------------------------------------------------------------------------------------
# Choosing
# ----------------------------------------------------------------------------------------------------


def _small_component_candidates(volumes_mm3: Sequence[float], smallest_voxel_mm3: float) -> list[float]:
    if not volumes_mm3:
        return []
    arr = np.asarray(volumes_mm3, dtype=np.float64)
    values = {float(f"{float(np.quantile(arr, q)):.6g}") for q in SMALL_COMPONENT_QUANTILES}
    values.add(float(f"{float(arr.min()) / 2:.6g}"))
    return sorted(v for v in values if v > smallest_voxel_mm3 * (1 + 1e-9))  # smaller ones remove nothing


def _candidate_mask(stage: str, mask: np.ndarray, pred: np.ndarray, candidate: Any,
                    spacing: Sequence[float]) -> np.ndarray:
    """A class's mask after one morphological candidate, as :func:`apply_postprocessing` makes it."""
    if stage == "opening":
        return open_mask(mask, radius_mm=candidate, spacing_mm=spacing)
    grown = (close_mask(mask, radius_mm=candidate, spacing_mm=spacing) if stage == "closing"
             else fill_holes_mask(mask, mode=candidate))
    return mask | (grown & (pred == 0))


def _with(choice: Postprocessing, **changes: Any) -> Postprocessing:
    """``choice`` changed, with the lowest version that holds it."""
    return dataclasses.replace(choice, version=0, **changes)


def _best(means: Mapping[Any, float]) -> Any:
    """The candidate of the highest mean Dice, the first (the mildest) among equals."""
    return max(means, key=lambda c: means[c])


def choose_postprocessing(cases: Sequence[Case], *, labels: Sequence[int], remove_small: bool = True,
                          morphology: bool = True, tolerance: float = DEFAULT_TOLERANCE) -> Postprocessing:
    """Decide the post-processing on cross-validation predictions (see the module docstring).

    The cases are read in order once per step (up to seven times, more when operations are withdrawn), so
    ``cases`` may be a lazy sequence that loads each case from disk on indexing.

    Args:
        cases: ``(reference, prediction, spacing_zyx_mm)`` per case; label maps of equal shape, the spacing in mm
            in the same axis order.
        labels: Foreground classes to evaluate (e.g. ``[1, 2]``).
        remove_small: Also try removing small components (step 3).
        morphology: Also try opening, closing and hole filling (steps 4 to 6).
        tolerance: Dice differences up to this count as no change.

    Returns:
        The choice, with the figures and every step it tested.

    Raises:
        ValueError: No cases, no labels, a reference and prediction of different shapes, a spacing that does not
            fit them.
    """
    labels = sorted({int(v) for v in labels})
    if not labels or labels[0] <= 0:
        raise ValueError(f"labels must be a non-empty list of foreground classes, got {labels}")
    n = len(cases)
    if n == 0:
        raise ValueError("choose_postprocessing needs at least one case")
    choice = Postprocessing(labels=tuple(labels), keep_largest_foreground=False, keep_largest_labels=(),
                            min_voxels={})

    # Pass 1: baseline, largest foreground component, reference component volumes, spacings.
    base: list[dict[int, float]] = []
    fg_largest: list[dict[int, float]] = []
    ref_mm3: dict[int, list[float]] = {label: [] for label in labels}
    voxel_mm3: list[float] = []
    finest_mm: list[float] = []
    volumes = False
    for ref, pred, spacing in _prepared(cases, choice):
        base.append(dice_per_label(ref, pred, labels=labels))
        fg_largest.append(dice_per_label(ref, keep_largest_component(pred, labels=None), labels=labels))
        if remove_small or morphology:
            voxel_mm3.append(voxel_volume_mm3(spacing, ref.shape))
            finest_mm.append(min((s for s, k in zip(spacing, ref.shape) if k > 1), default=min(spacing)))
            volumes = volumes or ref.shape[0] > 1
        if remove_small:
            for label in labels:
                mask = ref == label
                if mask.any():
                    ref_mm3[label].extend(float(s) * voxel_mm3[-1] for s in label_components(mask)[1][1:])
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
    choice = _with(choice, keep_largest_foreground=use_fg)

    # Pass 2: largest component per class, on top of step 1.
    per_class_largest = [{label: _binary_dice(ref == label, largest_only(pred == label)) for label in labels}
                         for ref, pred, _ in _prepared(cases, choice)]
    largest_mean = _means(per_class_largest, labels)
    keep_largest_labels = []
    for label in labels:
        adopted = largest_mean[label] > current[label] + tolerance
        steps.append(PostprocessingStep("keep_largest", adopted, label=label, dice_before=current[label],
                                        dice_after=largest_mean[label]))
        if adopted:
            keep_largest_labels.append(label)
            current[label] = largest_mean[label]
    choice = _with(choice, keep_largest_labels=tuple(keep_largest_labels))

    # Pass 3: remove small components (mm^3) per class (classes not reduced to their largest component).
    todo = [label for label in labels if label not in keep_largest_labels] if remove_small else []
    candidates = {label: _small_component_candidates(ref_mm3[label], min(voxel_mm3)) for label in todo}
    todo = [label for label in todo if candidates[label]]
    if todo:
        scores: dict[int, dict[float, list[float]]] = {label: {t: [] for t in candidates[label]} for label in todo}
        for ref, pred, spacing in _prepared(cases, choice):
            vv = voxel_volume_mm3(spacing, pred.shape)
            for label in todo:
                ref_mask = ref == label
                labeled, sizes = label_components(pred == label)
                for t in candidates[label]:
                    keep = sizes * vv >= t  # as components.without_small_mm3
                    keep[0] = False
                    scores[label][t].append(_binary_dice(ref_mask, keep[labeled]))
        min_size: dict[str, float] = {}
        for label in todo:
            means = {t: float(np.mean(v)) for t, v in scores[label].items()}
            best = _best(means)
            adopted = means[best] > current[label] + tolerance
            steps.append(PostprocessingStep(
                "remove_small", adopted, label=label, min_size_mm3=best if adopted else None,
                dice_before=current[label], dice_after=means[best], candidates={f"{t:g}": d for t, d in means.items()}))
            if adopted:
                min_size[str(label)] = best
                current[label] = means[best]
        choice = _with(choice, min_size_mm3=min_size)

    # Passes 4 to 6: opening, closing, hole filling per class, each on top of the steps before.
    if morphology:
        choice = _choose_morphology(cases, choice, steps, current, finest_mm=finest_mm, volumes=volumes,
                                    tolerance=tolerance)
    return _with(choice, n_cases=n, tolerance=float(tolerance),
                               dice_before=_figures(base_mean), dice_after=_figures(current), steps=tuple(steps))


def _choose_morphology(cases: Sequence[Case], choice: Postprocessing, steps: list[PostprocessingStep],
                       current: dict[int, float], *, finest_mm: Sequence[float], volumes: bool,
                       tolerance: float) -> Postprocessing:
    """Steps 4 to 6 (appends to ``steps``, updates ``current``); the choice with them."""
    labels = list(choice.labels)
    base_mm = float(np.median(finest_mm))
    radii = sorted({float(f"{f * base_mm:.4g}") for f in MORPHOLOGY_RADII_VOXELS})
    stages: list[tuple[str, list[Any]]] = [("opening", radii), ("closing", radii),
                                           ("fill_holes", ["3d", "2d"] if volumes else ["2d"])]
    before_morphology = dict(current)
    for stage, options in stages:
        scores: dict[int, dict[Any, list[float]]] = {label: {c: [] for c in options} for label in labels}
        for ref, pred, spacing in _prepared(cases, choice):
            for label in labels:
                mask, ref_mask = pred == label, ref == label
                for c in options:
                    scores[label][c].append(_binary_dice(ref_mask, _candidate_mask(stage, mask, pred, c, spacing)))
        adopted: dict[str, Any] = {}
        for label in labels:
            means = {c: float(np.mean(v)) for c, v in scores[label].items()}
            best = _best(means)
            ok = means[best] > current[label] + tolerance
            which = {"mode": best} if stage == "fill_holes" else {"radius_mm": best}
            steps.append(PostprocessingStep(stage, ok, label=label, **(which if ok else {}),  # type: ignore[arg-type]
                                            dice_before=current[label], dice_after=means[best],
                                            candidates={f"{c:g}" if isinstance(c, float) else c: d
                                                        for c, d in means.items()}))
            if ok:
                adopted[str(label)] = best
                current[label] = means[best]
        choice = _with(choice, **{_FIELDS[stage]: adopted})

    verify = len(set(choice.closing_radius_mm) | set(choice.fill_holes)) >= 2  # they may want the same voxels
    while verify:
        per_case = [{label: _binary_dice(ref == label, pred == label) for label in labels}
                    for ref, pred, _ in _prepared(cases, choice)]
        exact = _means(per_case, labels)
        current.update(exact)
        worse = [label for label in labels if exact[label] < before_morphology[label] - tolerance]
        if not worse:
            break
        for label in worse:
            steps.append(PostprocessingStep(
                "withdrawn", False, label=label, reason="with the other classes' closing or hole filling its "
                "morphological operations would leave it worse than without them",
                dice_before=before_morphology[label], dice_after=exact[label]))
        drop = {str(label) for label in worse}
        choice = _with(choice, **{f: {k: v for k, v in getattr(choice, f).items() if k not in drop}
                                  for f in _FIELDS.values()})
    return choice


# ----------------------------------------------------------------------------------------------------
# Work folder
# ----------------------------------------------------------------------------------------------------


def postprocessing_path(ws: Workspace, configuration: str) -> Path:
    """Where the choice of a configuration (``<work>/C/postprocessing.json``) or an ensemble
    ``A+B`` (``<work>/postprocessing_A+B.json``, as ``automedseg predict`` looks for it) is stored."""
    if "+" in configuration:
        return ws.root / f"postprocessing_{configuration}.json"
    return ws.postprocessing_path(configuration)
