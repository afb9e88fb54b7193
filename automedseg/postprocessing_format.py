"""``postprocessing.json``: the post-processing chosen on cross-validation, typed, checked, read and written.

:mod:`automedseg.postprocessing` chooses and applies it (and re-exports everything here). The choice is a
:class:`Postprocessing` (frozen), written as a small JSON object by :meth:`Postprocessing.save` and read back,
checked field by field, by :meth:`Postprocessing.load` (never a pickle)::

    {"format": "automedseg-postprocessing", "version": 2, "connectivity": "full",
     "labels": [1, 2], "keep_largest_foreground": false, "keep_largest_labels": [1],
     "min_voxels": {}, "min_size_mm3": {"2": 35.5}, "opening_radius_mm": {"2": 1.5},
     "closing_radius_mm": {}, "fill_holes": {"1": "3d"}, "n_cases": 40,
     "dice_before": {"1": 0.91, "2": 0.80, "mean": 0.855}, "dice_after": {...}, "steps": [...]}

The operations, applied in this order: keep the largest foreground component; keep the largest component of each
class of ``keep_largest_labels``; per class, remove the components under ``min_voxels`` voxels and those under
``min_size_mm3`` cubic millimetres; open with a ball of ``opening_radius_mm``; close with a ball of
``closing_radius_mm``; fill the holes (``"3d"``, or ``"2d"``: per slice along z). Per-class keys are class numbers
as strings. ``steps`` records every test with the Dice before and after, whether it was adopted and why
(:class:`PostprocessingStep`).

Versions: version 1 has the component operations only (``min_voxels``); version 2 adds ``min_size_mm3``,
``opening_radius_mm``, ``closing_radius_mm`` and ``fill_holes`` (:data:`VERSION_2_KEYS`). A choice is written with
the lowest version that holds it, so a choice of component operations stays readable by an automedseg that
knows version 1 only, and one that needs version 2 is refused there instead of being applied in part. Both
versions are read: ``format`` and ``version`` may be absent (``format`` defaults to its value, ``version`` to the
lowest that holds the file); only ``keep_largest_foreground``, ``keep_largest_labels`` and ``min_voxels`` are
required; keys the file's version does not know are ignored (version 1 always ignored them, so a version-1 file
means exactly what it meant then, even with a version-2 key in it).

Example:
    >>> choice = Postprocessing(keep_largest_foreground=True, keep_largest_labels=(), min_voxels={})
    >>> choice.version, Postprocessing.from_dict(choice.to_dict()) == choice
    (1, True)
    >>> Postprocessing(keep_largest_foreground=False, keep_largest_labels=(), min_voxels={},
    ...                fill_holes={"1": "2d"}).operations()
    ['fill the holes of class 1 (per slice along z)']
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automedseg.atomic import atomic_write_json
from automedseg.errors import InputError
from automedseg.morphology import HOLE_MODES
from automedseg.serialize import PlanError, from_jsonable, to_jsonable

FORMAT_NAME = "automedseg-postprocessing"
FORMAT_VERSION = 2
"""The newest version, written when a choice needs it."""
READ_VERSIONS: tuple[int, ...] = (1, 2)
VERSION_2_KEYS: tuple[str, ...] = ("min_size_mm3", "opening_radius_mm", "closing_radius_mm", "fill_holes")
"""The operations version 2 added (a version-1 file ignores them)."""
_OMIT = {"omit_if_none": True}
_HOLE_WORDS = {"3d": "in 3D", "2d": "per slice along z"}


class PostprocessingError(InputError):
    """A post-processing file or choice is malformed; the message names the file and the field (a ValueError)."""


@dataclass(frozen=True)
class PostprocessingStep:
    """One test of :func:`~automedseg.postprocessing.choose_postprocessing` (informative: applying ignores it).

    Attributes:
        step: ``keep_largest_foreground``, or per class ``keep_largest``, ``remove_small``, ``opening``,
            ``closing``, ``fill_holes``, or ``withdrawn`` (a class's morphological operations given up because,
            applied together with the other classes', they would have left it worse).
        adopted: Whether the operation is part of the choice.
        label: The class tested (the per-class steps).
        reason: Why the foreground step was adopted or not, why operations were withdrawn.
        min_voxels: The threshold adopted (``remove_small`` of version 1; ``None``: not adopted).
        min_size_mm3: The threshold adopted (``remove_small``; ``None``: not adopted).
        radius_mm: The radius adopted (``opening``, ``closing``; ``None``: not adopted).
        mode: The hole filling adopted (``fill_holes``: ``3d`` or ``2d``; ``None``: not adopted).
        dice_before: Mean Dice before the step: per class plus ``"mean"`` (foreground step), or of the class.
        dice_after: The same with the operation applied (the best candidate).
        candidates: Mean Dice of the class per candidate tried (threshold, radius or mode).
    """

    step: str
    adopted: bool
    label: int | None = field(default=None, metadata=_OMIT)
    reason: str | None = field(default=None, metadata=_OMIT)
    min_voxels: int | None = field(default=None, metadata=_OMIT)
    min_size_mm3: float | None = field(default=None, metadata=_OMIT)
    radius_mm: float | None = field(default=None, metadata=_OMIT)
    mode: str | None = field(default=None, metadata=_OMIT)
    dice_before: dict[str, float | None] | float | None = None
    dice_after: dict[str, float | None] | float | None = None
    candidates: dict[str, float | None] | None = field(default=None, metadata=_OMIT)


def _check_keys(name: str, values: dict[str, Any]) -> None:
    for key in values:
        if not (isinstance(key, str) and key.isdigit() and int(key) > 0):
            raise PlanError(f"{name}: key {key!r} is not a positive class number")


def _check_numbers(name: str, values: dict[str, float], *, zero: bool) -> None:
    _check_keys(name, values)
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < math.inf) or (v == 0 and not zero):
            raise PlanError(f"{name}.{key}: must be a {'non-negative' if zero else 'positive'} number, got {v!r}")


def _by_label(values: dict[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in sorted(values.items(), key=lambda kv: int(kv[0]))}


@dataclass(frozen=True, kw_only=True)
class Postprocessing:
    """The post-processing chosen on cross-validation: the content of ``postprocessing.json``.

    Attributes:
        keep_largest_foreground: Keep the largest component of the whole foreground (applied first).
        keep_largest_labels: Then keep the largest component of each of these classes.
        min_voxels: Then, per class (a string key, as in the JSON), remove components smaller than this.
        min_size_mm3: Then, per class, remove components smaller than this many mm^3 (version 2).
        opening_radius_mm: Then, per class, open with a ball of this radius in mm (version 2).
        closing_radius_mm: Then, per class, close with a ball of this radius in mm (version 2).
        fill_holes: Then, per class, fill holes: ``3d`` or ``2d`` (per slice along z) (version 2).
        format: Always :data:`FORMAT_NAME`.
        version: 1 or 2; 0 (the default) is replaced by the lowest version that holds the choice.
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
    version: int = 0
    connectivity: str = "full"
    labels: tuple[int, ...] = ()
    keep_largest_foreground: bool
    keep_largest_labels: tuple[int, ...]
    min_voxels: dict[str, int]
    min_size_mm3: dict[str, float] = field(default_factory=dict)
    opening_radius_mm: dict[str, float] = field(default_factory=dict)
    closing_radius_mm: dict[str, float] = field(default_factory=dict)
    fill_holes: dict[str, str] = field(default_factory=dict)
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
        if self.connectivity != "full":
            raise PlanError(f"connectivity: {self.connectivity!r}, expected 'full'")
        for name in ("labels", "keep_largest_labels"):
            values = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise PlanError(f"{name}: must be positive class numbers, got {list(values)}")
        _check_keys("min_voxels", self.min_voxels)
        for key, size in self.min_voxels.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise PlanError(f"min_voxels.{key}: must be a non-negative integer, got {size!r}")
        _check_numbers("min_size_mm3", self.min_size_mm3, zero=True)
        _check_numbers("opening_radius_mm", self.opening_radius_mm, zero=False)
        _check_numbers("closing_radius_mm", self.closing_radius_mm, zero=False)
        _check_keys("fill_holes", self.fill_holes)
        for key, mode in self.fill_holes.items():
            if mode not in HOLE_MODES:
                raise PlanError(f"fill_holes.{key}: must be one of {list(HOLE_MODES)}, got {mode!r}")
        needed = 2 if any(getattr(self, k) for k in VERSION_2_KEYS) else 1
        if self.version == 0:
            object.__setattr__(self, "version", needed)
        elif self.version not in READ_VERSIONS:
            raise PlanError(f"version: {self.version!r} is not supported (this automedseg reads "
                            f"{', '.join(map(str, READ_VERSIONS))})")
        elif self.version < needed:
            used = ", ".join(k for k in VERSION_2_KEYS if getattr(self, k))
            raise PlanError(f"version: {self.version} cannot hold {used} (version 2 operations)")

    @property
    def min_voxels_by_label(self) -> dict[int, int]:
        """``min_voxels`` with integer class keys, in class order."""
        return _by_label(self.min_voxels)

    @property
    def min_size_mm3_by_label(self) -> dict[int, float]:
        """``min_size_mm3`` with integer class keys, in class order."""
        return _by_label(self.min_size_mm3)

    @property
    def opening_radius_mm_by_label(self) -> dict[int, float]:
        """``opening_radius_mm`` with integer class keys, in class order."""
        return _by_label(self.opening_radius_mm)

    @property
    def closing_radius_mm_by_label(self) -> dict[int, float]:
        """``closing_radius_mm`` with integer class keys, in class order."""
        return _by_label(self.closing_radius_mm)

    @property
    def fill_holes_by_label(self) -> dict[int, str]:
        """``fill_holes`` with integer class keys, in class order."""
        return _by_label(self.fill_holes)

    @property
    def needs_spacing(self) -> bool:
        """Whether applying the choice needs the voxel spacing (an operation in millimetres)."""
        return bool(self.min_size_mm3 or self.opening_radius_mm or self.closing_radius_mm)

    def operations(self) -> list[str]:
        """The operations, in the order they are applied, in words (empty: none)."""
        ops = []
        if self.keep_largest_foreground:
            ops.append("keep the largest foreground component")
        if self.keep_largest_labels:
            ops.append("keep the largest component of class(es) " + ", ".join(map(str, self.keep_largest_labels)))
        for label, size in self.min_voxels_by_label.items():
            ops.append(f"remove components of class {label} smaller than {size} voxels")
        for label, mm3 in self.min_size_mm3_by_label.items():
            ops.append(f"remove components of class {label} smaller than {mm3:g} mm^3")
        for label, r in self.opening_radius_mm_by_label.items():
            ops.append(f"open class {label} with a ball of radius {r:g} mm")
        for label, r in self.closing_radius_mm_by_label.items():
            ops.append(f"close class {label} with a ball of radius {r:g} mm")
        for label, mode in self.fill_holes_by_label.items():
            ops.append(f"fill the holes of class {label} ({_HOLE_WORDS[mode]})")
        return ops

    def with_provenance(self, *, configuration: str, members: Sequence[str], cases: Sequence[str],
                        missing: Sequence[str]) -> Postprocessing:
        """A copy that records what it was chosen for and on."""
        return dataclasses.replace(self, configuration=configuration, members=tuple(members), cases=tuple(cases),
                                   missing=tuple(missing))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (fields left at ``None`` that are marked optional are left out; a version-1 choice
        without the version-2 keys, exactly as version 1 wrote it)."""
        data = to_jsonable(self)
        if self.version == 1:
            for key in VERSION_2_KEYS:
                data.pop(key, None)
        return data  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Any, where: str = "post-processing") -> Postprocessing:
        """Build and check a choice from its JSON form; ``where`` (the file) starts every error message.

        ``format`` and ``version`` are checked first (a file of another version fails on them, not on a field that
        version renamed); keys the file's version does not know are ignored.

        Raises:
            PostprocessingError: Not an object, another format or version, or a field missing or wrong (named).
        """
        if not isinstance(data, dict):
            raise PostprocessingError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise PostprocessingError(f"{where}: format {data['format']!r} is not supported (this automedseg reads "
                                      f"{FORMAT_NAME!r})")
        version = data.get("version")
        if version is not None and (isinstance(version, bool) or version not in READ_VERSIONS):
            raise PostprocessingError(f"{where}: version {version!r} is not supported (this automedseg reads "
                                      f"{', '.join(map(str, READ_VERSIONS))})")
        known = {f.name for f in dataclasses.fields(cls)} - (set(VERSION_2_KEYS) if version == 1 else set())
        try:
            return from_jsonable(cls, {k: v for k, v in data.items() if k in known}, where)  # type: ignore
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
