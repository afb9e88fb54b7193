"""The typed ``fingerprint.json``: what :func:`automedseg.fingerprint.compute_fingerprint` measures.

:mod:`automedseg.fingerprint` owns the file (``compute_fingerprint``, ``save_fingerprint``, ``load_fingerprint``);
this module holds its frozen dataclasses, so that the planner and :mod:`automedseg.lateral` read attributes
without importing the image readers. They are written and read with
:func:`~automedseg.serialize.to_jsonable` / :func:`~automedseg.serialize.from_jsonable`: the JSON keys are the
field names in field order, so save -> load -> save gives identical text, and a wrong field raises
:class:`~automedseg.serialize.PlanError` naming it.

All spatial tuples are in array order (z, y, x) of the raw images; a 2D dataset has z = 1 and a z spacing
of 999 (like nnU-Net).

Example:
    >>> stats = IntensityStats.of(np.array([1.0, 2.0, 3.0]))
    >>> stats.mean, stats.max
    (2.0, 3.0)
    >>> IntensityStats.of(np.array([])).mean is None  # no foreground voxel: written as null
    True
    >>> from_jsonable(ClassStats, {"voxels": 4, "components": "one"}, "classes.1")
    Traceback (most recent call last):
    ...
    automedseg.serialize.PlanError: classes.1.components: expected an integer, got 'one'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from automedseg.geometry import Geometry
from automedseg.serialize import PlanError, from_jsonable, to_jsonable

FINGERPRINT_VERSION = 3  # 2: per-class centroids; 3: per-class in-plane structure size

Triple = tuple[float, float, float]


@dataclass(frozen=True, kw_only=True)
class IntensityStats:
    """Intensity statistics of one channel's foreground voxels (``None`` throughout when there were none).

    Attributes:
        mean: Mean.
        std: Standard deviation.
        median: Median.
        min: Smallest value.
        max: Largest value.
        p00_5: 0.5th percentile (the lower CT clip).
        p99_5: 99.5th percentile (the upper CT clip).
    """

    mean: float | None
    std: float | None
    median: float | None
    min: float | None
    max: float | None
    p00_5: float | None
    p99_5: float | None

    @classmethod
    def of(cls, values: np.ndarray) -> IntensityStats:
        """The statistics of a sample of intensities; all ``None`` for an empty sample."""
        if values.size == 0:
            return cls(mean=None, std=None, median=None, min=None, max=None, p00_5=None, p99_5=None)
        p = np.percentile(values, [50.0, 0.5, 99.5])
        return cls(mean=float(values.mean()), std=float(values.std()), median=float(p[0]), min=float(values.min()),
                   max=float(values.max()), p00_5=float(p[1]), p99_5=float(p[2]))

    @property
    def known(self) -> bool:
        """Whether every statistic is a number (there was a foreground sample)."""
        return None not in (self.mean, self.std, self.median, self.min, self.max, self.p00_5, self.p99_5)


@dataclass(frozen=True, kw_only=True)
class ClassStats:
    """One class in one case.

    Attributes:
        voxels: Voxels of the class.
        components: Connected components (0 when absent).
        centroid_rel: Centre as a fraction (0..1) of the image along each axis
            (:func:`automedseg.lateral.centroid_rel`); ``None`` when the class is absent.
        size_px: In-plane structure size in pixels (:func:`automedseg.fingerprint.structure_size_px`); ``None``
            when the class is absent.
    """

    voxels: int
    components: int
    centroid_rel: tuple[float, ...] | None = None
    size_px: float | None = None


@dataclass(frozen=True, kw_only=True)
class CaseFingerprint:
    """One training case.

    Attributes:
        case_id: The case.
        spacing_mm: Voxel spacing (z, y, x).
        shape: Array shape (z, y, x).
        shape_after_crop: Shape of the bounding box of the voxels nonzero in any channel.
        crop_bbox: That box, ``(start, end)`` per axis (end exclusive).
        geometry: The image's geometry (SimpleITK order).
        foreground_voxels: Voxels of any class.
        intensity: Per channel, the statistics of a deterministic sample of foreground voxels.
        classes: Class value (a string) -> its statistics, for every declared class but background.
    """

    case_id: str
    spacing_mm: Triple
    shape: tuple[int, int, int]
    shape_after_crop: tuple[int, int, int]
    crop_bbox: tuple[tuple[int, int], ...]
    geometry: Geometry
    foreground_voxels: int
    intensity: tuple[IntensityStats, ...]
    classes: dict[str, ClassStats]


@dataclass(frozen=True, kw_only=True)
class ClassSummary:
    """One class over the dataset.

    Attributes:
        present_in_cases: Cases that contain it.
        median_voxels: Median voxels per case (absent: 0).
        min_voxels: Fewest voxels in a case.
        median_components: Median connected components per case.
        max_components: Most connected components in a case.
    """

    present_in_cases: int
    median_voxels: float
    min_voxels: float
    median_components: float
    max_components: float


@dataclass(frozen=True, kw_only=True)
class DatasetSummary:
    """The dataset level: spacing and shape statistics over the cases, pooled intensities, classes.

    Attributes:
        median_spacing_mm: Median spacing (z, y, x).
        spacing_p10_mm: 10th-percentile spacing.
        spacing_p90_mm: 90th-percentile spacing.
        median_shape: Median shape.
        median_shape_after_crop: Median shape after cropping to the nonzero region.
        min_shape_after_crop: Smallest cropped shape per axis.
        max_shape_after_crop: Largest cropped shape per axis.
        intensity: Per channel, statistics of the foreground samples of all cases pooled (CT normalisation);
            always numbers (a dataset without foreground is not fingerprinted).
        classes: Class value (a string) -> its summary.
    """

    median_spacing_mm: Triple
    spacing_p10_mm: Triple
    spacing_p90_mm: Triple
    median_shape: Triple
    median_shape_after_crop: Triple
    min_shape_after_crop: Triple
    max_shape_after_crop: Triple
    intensity: tuple[IntensityStats, ...]
    classes: dict[str, ClassSummary]

    def __post_init__(self) -> None:
        for c, stats in enumerate(self.intensity):
            if not stats.known:
                raise PlanError(f"intensity[{c}]: the pooled foreground statistics must be numbers, got null")

    @classmethod
    def of_cases(cls, cases: Sequence[CaseFingerprint], *, intensity: Sequence[IntensityStats],
                 labels: Iterable[int]) -> DatasetSummary:
        """Summarise the cases; ``intensity`` is the pooled statistics, ``labels`` the declared label values.

        Example:
            >>> g = Geometry(size=(3, 4, 2), spacing=(1.0, 1.0, 2.0), origin=(0.0,) * 3, direction=(1.0,) * 9)
            >>> one = IntensityStats.of(np.array([5.0]))
            >>> case = CaseFingerprint(
            ...     case_id="a", spacing_mm=(2.0, 1.0, 1.0), shape=(2, 4, 3), shape_after_crop=(2, 2, 3),
            ...     crop_bbox=((0, 2), (1, 3), (0, 3)), geometry=g, foreground_voxels=1, intensity=(one,),
            ...     classes={"1": ClassStats(voxels=1, components=1, centroid_rel=(0.5, 0.5, 0.5), size_px=2.0)})
            >>> summary = DatasetSummary.of_cases([case], intensity=[one], labels=[0, 1])
            >>> summary.median_shape_after_crop, summary.classes["1"].present_in_cases
            ((2.0, 2.0, 3.0), 1)
        """
        spacings = np.array([c.spacing_mm for c in cases], dtype=float)
        shapes = np.array([c.shape for c in cases], dtype=float)
        cropped = np.array([c.shape_after_crop for c in cases], dtype=float)
        classes = {}
        for k in sorted(labels):
            if k == 0:
                continue
            vox = np.array([c.classes[str(k)].voxels for c in cases], dtype=float)
            comps = np.array([c.classes[str(k)].components for c in cases], dtype=float)
            classes[str(k)] = ClassSummary(
                present_in_cases=int((vox > 0).sum()),
                median_voxels=float(np.median(vox)),
                min_voxels=float(vox.min()),
                median_components=float(np.median(comps)),
                max_components=float(comps.max()),
            )
        return cls(
            median_spacing_mm=_triple(np.median(spacings, axis=0)),
            spacing_p10_mm=_triple(np.percentile(spacings, 10, axis=0)),
            spacing_p90_mm=_triple(np.percentile(spacings, 90, axis=0)),
            median_shape=_triple(np.median(shapes, axis=0)),
            median_shape_after_crop=_triple(np.median(cropped, axis=0)),
            min_shape_after_crop=_triple(cropped.min(axis=0)),
            max_shape_after_crop=_triple(cropped.max(axis=0)),
            intensity=tuple(intensity),
            classes=classes,
        )


def _triple(values: np.ndarray) -> Triple:
    return tuple(float(v) for v in values.tolist())  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class Fingerprint:
    """The dataset fingerprint (``fingerprint.json``).

    Attributes:
        fingerprint_version: :data:`FINGERPRINT_VERSION`.
        dataset_name: The dataset's name.
        layout: ``nnunet`` or ``msd``.
        channel_names: One name per input channel.
        modalities: Normalisation family per channel (:func:`automedseg.fingerprint.modality_of`).
        labels: Label name -> value, background included.
        is_2d: Every case is one slice (z = 1).
        num_cases: Training cases.
        dataset: The dataset-level summary.
        cases: Per training case, in the dataset's order.
        files_signature: Signature of the files it was computed from (:func:`automedseg.pipeline.files_signature`);
            left out of the file while ``None``.
    """

    fingerprint_version: int = FINGERPRINT_VERSION
    dataset_name: str
    layout: str
    channel_names: tuple[str, ...]
    modalities: tuple[str, ...]
    labels: dict[str, int]
    is_2d: bool
    num_cases: int
    dataset: DatasetSummary
    cases: tuple[CaseFingerprint, ...]
    files_signature: str | None = field(default=None, metadata={"omit_if_none": True})

    def __post_init__(self) -> None:
        if self.fingerprint_version != FINGERPRINT_VERSION:
            raise PlanError(f"fingerprint_version {self.fingerprint_version} is not {FINGERPRINT_VERSION}")
        if len(self.modalities) != len(self.channel_names):
            raise PlanError(f"modalities: {len(self.modalities)} for {len(self.channel_names)} channel(s)")
        if len(self.dataset.intensity) != len(self.channel_names):
            raise PlanError(f"dataset.intensity: {len(self.dataset.intensity)} entries for "
                            f"{len(self.channel_names)} channel(s)")
        if self.num_cases != len(self.cases):
            raise PlanError(f"num_cases: {self.num_cases}, but {len(self.cases)} case(s)")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the ``fingerprint.json`` format)."""
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "fingerprint") -> Fingerprint:
        """Build and check a fingerprint from its JSON form; ``where`` (the file) starts every error message.

        The version is checked first: a file of another version fails on it, not on a field that version renamed.

        Raises:
            PlanError: Not an object, another version, or a field missing, unknown or wrong (named).
        """
        if isinstance(data, dict) and data.get("fingerprint_version", FINGERPRINT_VERSION) != FINGERPRINT_VERSION:
            raise PlanError(f"{where}: fingerprint_version {data['fingerprint_version']!r} is not supported (this "
                            f"automedseg reads {FINGERPRINT_VERSION}); run automedseg plan again")
        return from_jsonable(cls, data, where)
