"""A fold's ``validation/summary.json``: what the validation of the held-out cases scored.

Written by :func:`automedseg.training.validate_fold` (through :func:`write_validation_summary`), read by model
selection (which cases a fold validated) and the report (per-case metrics) through
:func:`read_validation_summary`.

Example:
    >>> s = ValidationSummary.from_mapping({"configuration": "2d", "fold": "fold_0", "cases": ["a"],
    ...     "mean_dice": 0.9, "dice_per_class": {"1": 0.9}, "summary": {}, "per_case": [], "seconds": 1.5})
    >>> s.cases, s.mean_dice
    (('a',), 0.9)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.atomic import jsonable
from automedseg.plans import from_jsonable

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class ValidationSummary:
    """The content of ``validation/summary.json``.

    Attributes:
        configuration: Configuration name.
        fold: The fold folder's name (``fold_0`` ...).
        cases: The held-out cases of the fold.
        mean_dice: Mean over the foreground classes of the per-class mean Dice (``None``: nothing scored).
        dice_per_class: Declared label value -> mean Dice over the cases.
        summary: :func:`automedseg.metrics.summarize` of the per-case metrics.
        per_case: ``{"case", "metrics": {label: {metric: value}}}`` per scored case.
        seconds: Wall time of the validation.
        mirror_axes: The axes whose mirrored predictions were averaged (test-time mirroring; empty: none).

    Every field has a default: a summary written by hand or by an older version may hold only some of them.
    """

    configuration: str = ""
    fold: str = ""
    cases: tuple[str, ...] = ()
    mean_dice: float | None = None
    dice_per_class: dict[str, float | None] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    per_case: tuple[Any, ...] = ()
    seconds: float | None = None
    mirror_axes: tuple[int, ...] = ()

    def dice_by_case(self) -> dict[str, dict[str, float | None]]:
        """Per scored case, each foreground label's Dice (``None``: undefined for that case).

        Example:
            >>> ValidationSummary(per_case=({"case": "a", "metrics": {"0": {"dice": 1.0}, "1": {"dice": 0.5},
            ...     "2": {"dice": None, "hd95": 3.0}}},)).dice_by_case()
            {'a': {'1': 0.5, '2': None}}
        """
        out: dict[str, dict[str, float | None]] = {}
        for row in self.per_case:
            if isinstance(row, Mapping) and isinstance(row.get("metrics"), Mapping):
                out[str(row.get("case"))] = {
                    str(label): None if m.get("dice") is None else float(m["dice"])
                    for label, m in row["metrics"].items() if str(label) != "0" and isinstance(m, Mapping)}
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = SUMMARY_FILE) -> ValidationSummary:
        """Build (and check) a summary from its JSON form (``where`` names it in errors)."""
        return from_jsonable(cls, jsonable(dict(data)), where)


def summary_path(fold_dir: Path) -> Path:
    """``<fold>/validation/summary.json``."""
    return Path(fold_dir) / "validation" / SUMMARY_FILE


def write_validation_summary(path: Path, summary: ValidationSummary | Mapping[str, Any]) -> ValidationSummary:
    """Write a fold's summary atomically (a mapping is checked first); returns it typed."""
    if not isinstance(summary, ValidationSummary):
        summary = ValidationSummary.from_mapping(summary, str(path))
    write_artifact(path, summary)
    return summary


def read_validation_summary(path: Path) -> ValidationSummary:
    """Read a fold's ``validation/summary.json``.

    Raises:
        FileNotFoundError: The fold has no summary (not validated, or validation interrupted).
        InputError: The file is not JSON or a field is wrong (the message names the file and the field).
    """
    return read_artifact(ValidationSummary, path)
