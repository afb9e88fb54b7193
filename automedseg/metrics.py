"""Segmentation metrics of whole cases, their summaries, and the evaluation of a folder of predictions.

Owner of the evaluation's ``metrics_summary.json`` (:class:`MetricsSummary`, read with
:func:`read_metrics_summary`), which :func:`evaluate_folders` writes; with the cases' class probabilities it
holds voxel-level precision-recall curves and average precision per label too (:mod:`automedseg.pr_curves`).

The metrics of one pair of masks (Dice, IoU, precision, recall, HD95, ASSD, NSD, volumes) and their conventions
(surfaces, empty masks, units) are in :mod:`automedseg.mask_metrics`; they are re-exported here, so
``automedseg.metrics.dice`` and the like keep working.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((8, 8), bool); ref[2:6, 2:6] = True
    >>> m = compute_binary_metrics(ref, ref, spacing_mm=(1.0, 1.0))
    >>> m["dice"], m["hd95"]
    (1.0, 0.0)
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.atomic import atomic_write_json, atomic_write_text, jsonable
from automedseg.errors import InputError
from automedseg.mask_metrics import (  # noqa: F401  (re-exported: the per-mask metrics callers know from here)
    METRIC_NAMES,
    assd,
    compute_binary_metrics,
    dice,
    dice_per_label,
    hausdorff,
    hd95,
    iou,
    nsd,
    precision,
    recall,
    surface_distances,
    volume_difference,
)
from automedseg.pr_curves import PRCurve, add_counts, curve_from_counts, probability_counts, read_probabilities
from automedseg.serialize import from_jsonable, to_jsonable

SUPPORTED_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff")
"""File endings that :func:`evaluate_folders` pairs and reads."""

METRICS_SUMMARY_FILE = "metrics_summary.json"
"""The summary :func:`evaluate_folders` writes into its output folder."""


def _squeeze_channel(seg: np.ndarray) -> np.ndarray:
    seg = np.asarray(seg)
    if seg.ndim == 4 and seg.shape[0] == 1:
        return seg[0]
    return seg


def compute_case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    *,
    labels: Sequence[int],
    spacing_mm: Sequence[float],
    tolerance_mm: float = 1.0,
) -> dict[int, dict[str, float]]:
    """Metrics of every label of a multi-label case, each label one-vs-rest.

    Args:
        reference: Integer label map, (Z, Y, X), (Y, X) or (1, Z, Y, X).
        prediction: Integer label map of the same shape.
        labels: Labels to evaluate (a label absent from both maps scores as "both empty").
        spacing_mm: Voxel spacing in array order, (z, y, x) or (y, x).
        tolerance_mm: Tolerance of the normalised surface Dice.

    Returns:
        Label -> metric name -> value.
    """
    ref = _squeeze_channel(reference)
    pred = _squeeze_channel(prediction)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    return {
        int(label): compute_binary_metrics(
            ref == label, pred == label, spacing_mm=spacing_mm, tolerance_mm=tolerance_mm
        )
        for label in labels
    }


def _nanmean(values: Sequence[float]) -> tuple[float, int]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return math.nan, 0
    return float(np.mean(finite)), len(finite)


def summarize(per_case: Sequence[Mapping[Any, Mapping[str, float]]]) -> dict[str, Any]:
    """Average per-case metrics per label and over the foreground labels.

    Args:
        per_case: One :func:`compute_case_metrics` result per case (label keys may be ``int`` or their
            string form, as after a JSON round trip; ``None`` counts as NaN).

    Returns:
        ``{"n_cases": int, "per_label": {label: {metric: mean}}, "n_valid": {label: {metric: count}},
        "foreground_mean": {metric: mean}}``. Means ignore NaN; ``n_valid`` says how many values each
        per-label mean is based on. ``foreground_mean`` is the mean over labels other than 0 of the
        per-label means (NaN means skipped). A mean without any value is NaN.
    """
    collected: dict[int, dict[str, list[float]]] = {}
    metric_order: list[str] = []
    for case in per_case:
        for label, metrics in case.items():
            bucket = collected.setdefault(int(label), {})
            for name, value in metrics.items():
                if name not in metric_order:
                    metric_order.append(name)
                bucket.setdefault(name, []).append(math.nan if value is None else float(value))

    per_label: dict[int, dict[str, float]] = {}
    n_valid: dict[int, dict[str, int]] = {}
    for label in sorted(collected):
        per_label[label], n_valid[label] = {}, {}
        for name in metric_order:
            mean, count = _nanmean(collected[label].get(name, []))
            per_label[label][name] = mean
            n_valid[label][name] = count

    foreground = [label for label in per_label if label != 0]
    foreground_mean = {
        name: _nanmean([per_label[label][name] for label in foreground])[0] for name in metric_order
    }
    return {
        "n_cases": len(per_case),
        "per_label": per_label,
        "n_valid": n_valid,
        "foreground_mean": foreground_mean,
    }


# ----------------------------------------------------------------------------------------------------
# Folder evaluation
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseMetrics:
    """The metrics of one evaluated case.

    Attributes:
        case: The case name (the file name without its ending).
        file: The file name, the same in both folders.
        metrics: Label -> metric name (``dice``, ``iou``, ``precision``, ``recall``, ``hd95``, ``assd``, ``nsd``,
            volumes) -> value; distances in mm, NaN where undefined (one mask empty).
    """

    case: str
    file: str
    metrics: dict[int, dict[str, float]]


@dataclass(frozen=True)
class EvaluationSummary:
    """What :func:`automedseg.evaluate` found (:func:`evaluate_folders`, typed): the figures of every label and case.

    Attributes:
        labels: The labels scored.
        tolerance_mm: Tolerance of the normalised surface Dice.
        n_cases: Cases scored (reference files with a prediction).
        per_label: Label -> metric -> mean over the cases (NaN values left out).
        n_valid: Label -> metric -> how many values each mean is based on.
        foreground_mean: Metric -> mean of the per-label means over the labels other than 0.
        per_case: Every case's metrics.
        missing_predictions: Reference files without a prediction (not scored).
        geometry_warnings: Predictions whose geometry differs from their reference (scored voxel by voxel).
        output_dir: Where ``metrics_summary.json``, ``metrics_per_case.json`` and ``metrics_per_case.csv`` went.
        pr_curves: Label -> its voxel-level precision-recall curve and average precision over every case (empty
            unless the probabilities were given).

    Example:
        >>> s = EvaluationSummary.from_dict({"labels": [1], "tolerance_mm": 1.0, "n_cases": 1,
        ...     "per_label": {1: {"dice": 0.9}}, "n_valid": {1: {"dice": 1}}, "foreground_mean": {"dice": 0.9},
        ...     "per_case": [{"case": "a", "file": "a.nii.gz", "metrics": {1: {"dice": 0.9}}}],
        ...     "missing_predictions": [], "geometry_warnings": []}, output_dir=Path("out"))
        >>> s.mean_dice, s.per_case[0].case, s.to_dict()["per_label"]
        (0.9, 'a', {1: {'dice': 0.9}})
    """

    labels: tuple[int, ...]
    tolerance_mm: float
    n_cases: int
    per_label: dict[int, dict[str, float]]
    n_valid: dict[int, dict[str, int]]
    foreground_mean: dict[str, float]
    per_case: tuple[CaseMetrics, ...]
    missing_predictions: tuple[str, ...]
    geometry_warnings: tuple[str, ...]
    output_dir: Path
    pr_curves: dict[int, PRCurve] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        """The mean Dice over the foreground labels (``foreground_mean["dice"]``)."""
        return float(self.foreground_mean.get("dice", math.nan))

    @property
    def mean_average_precision(self) -> float:
        """The mean average precision over the foreground labels that have one (NaN: none)."""
        return _nanmean([c.average_precision for k, c in self.pr_curves.items() if k != 0
                         and c.average_precision is not None])[0]

    @classmethod
    def from_dict(cls, summary: Mapping[str, Any], *, output_dir: Path) -> EvaluationSummary:
        """From what :func:`evaluate_folders` returns."""
        return cls(labels=tuple(int(v) for v in summary["labels"]), tolerance_mm=float(summary["tolerance_mm"]),
                   n_cases=int(summary["n_cases"]),
                   per_label={int(k): dict(v) for k, v in summary["per_label"].items()},
                   n_valid={int(k): dict(v) for k, v in summary["n_valid"].items()},
                   foreground_mean=dict(summary["foreground_mean"]),
                   per_case=tuple(CaseMetrics(r["case"], r["file"], {int(k): dict(v) for k, v in r["metrics"].items()})
                                  for r in summary["per_case"]),
                   missing_predictions=tuple(summary.get("missing_predictions", ())),
                   geometry_warnings=tuple(summary.get("geometry_warnings", ())), output_dir=Path(output_dir),
                   pr_curves={int(k): from_jsonable(PRCurve, jsonable(v), f"pr_curves.{k}")
                              for k, v in (summary.get("pr_curves") or {}).items()})

    def to_dict(self) -> dict[str, Any]:
        """The summary as :func:`evaluate_folders` returns it (plain dicts and lists)."""
        return {"labels": list(self.labels), "tolerance_mm": self.tolerance_mm,
                "missing_predictions": list(self.missing_predictions),
                "geometry_warnings": list(self.geometry_warnings), "n_cases": self.n_cases,
                "per_label": self.per_label, "n_valid": self.n_valid, "foreground_mean": self.foreground_mean,
                "per_case": [{"case": c.case, "file": c.file, "metrics": c.metrics} for c in self.per_case],
                **({"pr_curves": {k: to_jsonable(v) for k, v in self.pr_curves.items()}} if self.pr_curves else {})}


def _split_ending(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for ending in SUPPORTED_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)], ending
    return None


def _list_images(folder: Path) -> dict[str, str]:
    """File name -> case name for the supported images in ``folder`` (sorted by file name)."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        split = _split_ending(path.name)
        if split is not None:
            found[path.name] = split[0]
    return found


def _read_segmentation(path: Path) -> tuple[np.ndarray, Any]:
    """A label map ``(Z, Y, X)`` as int64 and its :class:`~automedseg.io.Geometry`.

    Raises:
        ValueError: The file is unreadable, truncated, multi-channel or has non-integer values (names it).
    """
    from automedseg.io import read_image_file

    array, geometry = read_image_file(path)
    if array.shape[0] != 1:
        raise ValueError(f"{path}: has {array.shape[0]} components per pixel; "
                         "segmentations must be single-channel label maps")
    array = array[0]
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(f"{path}: label map has non-integer values")
    return array.astype(np.int64), geometry


@dataclass(frozen=True, kw_only=True)
class MetricsSummary:
    """The content of ``metrics_summary.json``: the summary of :func:`evaluate_folders`, without ``per_case``.

    Attributes:
        labels: The evaluated labels.
        tolerance_mm: Tolerance of the normalised surface Dice.
        missing_predictions: Reference files without a prediction (not scored).
        geometry_warnings: Pairs whose geometry differs (scored voxel by voxel).
        n_cases: How many prediction / reference pairs were scored.
        per_label: Label value (as a string) -> metric name -> mean over the cases (``None``: no value).
        n_valid: Label -> metric name -> how many values the mean is based on.
        foreground_mean: Metric name -> mean over the labels other than 0 of the per-label means.
        pr_curves: Label (as a string) -> voxel-level precision-recall curve and average precision over every case
            (``evaluate --probabilities``); ``None`` (left out of the file) without probabilities.

    Fields are keyword-only and written in this order (that of :func:`evaluate_folders`' summary).

    Example:
        >>> s = MetricsSummary.from_mapping({"n_cases": 1, "per_label": {1: {"dice": float("nan")}}})
        >>> s.metric_per_label("dice")
        {'1': None}
    """

    labels: tuple[int, ...] = ()
    tolerance_mm: float | None = None
    missing_predictions: tuple[str, ...] = ()
    geometry_warnings: tuple[str, ...] = ()
    n_cases: int
    per_label: dict[str, dict[str, float | None]]
    n_valid: dict[str, dict[str, int]] = field(default_factory=dict)
    foreground_mean: dict[str, float | None] = field(default_factory=dict)
    pr_curves: dict[str, PRCurve] | None = field(default=None, metadata={"omit_if_none": True})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = METRICS_SUMMARY_FILE) -> MetricsSummary:
        """Build (and check) a summary from its JSON form or :func:`evaluate_folders`' dictionary.

        ``where`` names it in errors; ``per_case`` (in the dictionary, not in the file) is left out.
        """
        return from_jsonable(cls, jsonable({k: v for k, v in data.items() if k != "per_case"}), where)

    def metric_per_label(self, name: str) -> dict[str, float | None]:
        """Label (as a string) -> mean of metric ``name`` (``None`` where absent or without a value)."""
        return {label: metrics.get(name) for label, metrics in self.per_label.items()}

    def average_precision_per_label(self) -> dict[str, float | None]:
        """Label (as a string) -> average precision (``None``: undefined); empty without ``pr_curves``.

        Example:
            >>> curve = {"average_precision": 0.5, "positives": 2, "negatives": 2}
            >>> MetricsSummary.from_mapping({"n_cases": 1, "per_label": {}, "pr_curves": {1: curve}}
            ...                             ).average_precision_per_label()
            {'1': 0.5}
        """
        return {label: c.average_precision for label, c in (self.pr_curves or {}).items()}


def read_metrics_summary(path: Path) -> MetricsSummary:
    """Read an evaluation's ``metrics_summary.json``.

    Raises:
        FileNotFoundError: There is no such file.
        InputError: The file is not JSON or a field is wrong (the message names the file and the field).
    """
    return read_artifact(MetricsSummary, path)


def evaluate_folders(
    reference_dir: Path,
    prediction_dir: Path,
    *,
    labels: Sequence[int] | None = None,
    tolerance_mm: float = 1.0,
    output_dir: Path | None = None,
    probabilities_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate every prediction against the reference file of the same name.

    Files are paired by their full file name (endings: :data:`SUPPORTED_ENDINGS`) and read with
    SimpleITK; spacing is taken from the reference image (a differing prediction spacing gives a
    warning). Reference files without a prediction are listed under ``missing_predictions`` and skipped;
    predictions without a reference are ignored.

    Writes, atomically, to ``output_dir`` (default ``prediction_dir``): ``metrics_per_case.csv`` (one
    row per case and label), ``metrics_per_case.json`` and ``metrics_summary.json`` (NaN written as
    ``null`` in JSON and ``nan`` in CSV).

    Args:
        reference_dir: Folder with the reference label maps.
        prediction_dir: Folder with the predicted label maps.
        labels: Labels to evaluate; ``None`` uses every non-zero value found in any reference file.
        tolerance_mm: Tolerance of the normalised surface Dice.
        output_dir: Where the result files go.
        probabilities_dir: Folder of ``<case>.npz`` class probabilities (``predict --save-probabilities``), one
            for every scored case: adds ``pr_curves``, label -> :class:`~automedseg.pr_curves.PRCurve` as a
            dictionary, over the voxels of every scored case (:func:`automedseg.pr_curves.read_probabilities`).

    Returns:
        The summary (``labels``, ``tolerance_mm``, ``missing_predictions``, the keys of :func:`summarize` and, with
        ``probabilities_dir``, ``pr_curves``) plus ``per_case``: a list of ``{"case", "file", "metrics"}`` records.

    Raises:
        FileNotFoundError: A folder does not exist.
        ValueError: No reference images, a pair with different shapes, or a non-integer label map.
        InputError: A scored case without its probabilities, or probabilities that do not fit (names the file).
    """
    reference_dir, prediction_dir = Path(reference_dir), Path(prediction_dir)
    for folder in (reference_dir, prediction_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"not a folder: {folder}")
    output_dir = prediction_dir if output_dir is None else Path(output_dir)

    references = _list_images(reference_dir)
    if not references:
        raise ValueError(f"no images ending in {', '.join(SUPPORTED_ENDINGS)} in {reference_dir}")
    predictions = _list_images(prediction_dir)
    paired = [name for name in references if name in predictions]
    missing = [name for name in references if name not in predictions]
    if not paired:
        raise InputError(f"{prediction_dir}: no prediction matches a reference file name of {reference_dir} "
                         f"({len(predictions)} image file(s) there)")

    if labels is None:
        found: set[int] = set()
        for name in references:
            array, _ = _read_segmentation(reference_dir / name)
            found.update(int(v) for v in np.unique(array))
        label_list = sorted(found - {0})
    else:
        label_list = [int(label) for label in labels]

    per_case: list[dict[str, Any]] = []
    notes: list[str] = []
    counts: dict[int, np.ndarray] = {}
    for name in paired:
        ref, ref_geom = _read_segmentation(reference_dir / name)
        pred, pred_geom = _read_segmentation(prediction_dir / name)
        spacing = tuple(reversed(ref_geom.spacing))  # array order; 2 entries for 2D images
        if ref.shape != pred.shape:
            raise ValueError(
                f"{prediction_dir / name}: prediction shape {pred.shape} differs from reference shape {ref.shape}"
            )
        if probabilities_dir is not None:
            npz = Path(probabilities_dir) / f"{references[name]}.npz"
            probs, values = read_probabilities(npz, shape=ref.shape)
            add_counts(counts, probability_counts(ref, probs, labels=label_list, label_values=values, source=str(npz)))
        if ref_geom.ndim == 2:
            ref, pred = ref[0], pred[0]
        diff = ref_geom.matches(pred_geom)
        if diff:
            message = (f"{prediction_dir / name}: geometry differs from the reference ({'; '.join(diff)}); "
                       "scored voxel by voxel with the reference spacing")
            notes.append(message)
            warnings.warn(message, stacklevel=2)
        metrics = compute_case_metrics(
            ref, pred, labels=label_list, spacing_mm=spacing, tolerance_mm=tolerance_mm
        )
        per_case.append({"case": references[name], "file": name, "metrics": metrics})

    summary: dict[str, Any] = {
        "labels": label_list,
        "tolerance_mm": float(tolerance_mm),
        "missing_predictions": missing,
        "geometry_warnings": notes,
        **summarize([record["metrics"] for record in per_case]),
    }
    if probabilities_dir is not None:
        summary["pr_curves"] = {label: to_jsonable(curve_from_counts(counts[label])) for label in label_list}

    output_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "file", "label", *METRIC_NAMES])
    for record in per_case:
        for label, metrics in record["metrics"].items():
            writer.writerow(
                [record["case"], record["file"], label, *(repr(metrics[m]) for m in METRIC_NAMES)]
            )
    atomic_write_text(output_dir / "metrics_per_case.csv", buffer.getvalue())
    atomic_write_json(output_dir / "metrics_per_case.json", per_case)
    path = output_dir / METRICS_SUMMARY_FILE
    write_artifact(path, MetricsSummary.from_mapping(summary, str(path)))
    return {**summary, "per_case": per_case}
