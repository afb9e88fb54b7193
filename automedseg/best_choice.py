"""``<work>/find_best.json``: what ``automedseg find-best`` compared and chose, its one owner.

Written by :func:`automedseg.model_selection.find_best` through :func:`write_find_best`; read by ``automedseg
predict`` (which configuration), the report and the benchmarks through :func:`read_find_best`. Every part is a
frozen dataclass: :class:`FindBest` holds the :class:`BestChoice` (with the :class:`ChosenPostprocessing`
summary of its post-processing, the whole choice being in ``postprocessing.json``, see
:mod:`automedseg.postprocessing`) and one :class:`CandidateScore` per candidate, best first.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / FIND_BEST_FILE
    >>> _ = write_find_best(path, FindBest(BestChoice("2d+3d_fullres", mean_dice=0.8)))
    >>> read_find_best(path).best.candidate.members
    ('2d', '3d_fullres')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.atomic import jsonable
from automedseg.postprocessing_format import VERSION_2_KEYS, Postprocessing
from automedseg.serialize import from_jsonable, to_jsonable

if TYPE_CHECKING:
    from automedseg.workspace import Workspace

FIND_BEST_FILE = "find_best.json"
_OMIT = {"omit_if_none": True}


@dataclass(frozen=True)
class Candidate:
    """A configuration (one member) or an ensemble of configurations (written ``A+B``).

    Example:
        >>> Candidate.parse("2d+3d_fullres").members, Candidate(("2d",)).name
        (('2d', '3d_fullres'), '2d')
    """

    members: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.members)

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @classmethod
    def parse(cls, name: str) -> Candidate:
        return cls(tuple(name.split("+")))


@dataclass(frozen=True)
class CandidateScore:
    """One scored candidate of ``find_best.json``'s ``candidates``.

    Attributes:
        name: The configuration or ``+``-joined ensemble.
        members: Its configurations.
        n_cases: Cross-validation cases scored.
        mean_dice: Mean over the foreground classes of ``dice_per_class`` (``None``: nothing scored).
        dice_per_class: Declared label value -> mean Dice over the cases.
        complete: Every expected case was scored.
        missing: What was missing, one line each.
        rank: 1 for the best.
        dice_per_class_common_cases: ``dice_per_class`` on the cases every candidate was scored on (only when
            the candidates cover different cases).
        mean_dice_common_cases: Their mean (what the ranking used then).
    """

    name: str
    members: tuple[str, ...] = ()
    n_cases: int = 0
    mean_dice: float | None = None
    dice_per_class: dict[str, float | None] = field(default_factory=dict)
    complete: bool = False
    missing: tuple[str, ...] = ()
    rank: int | None = field(default=None, metadata=_OMIT)
    dice_per_class_common_cases: dict[str, float | None] | None = field(default=None, metadata=_OMIT)
    mean_dice_common_cases: float | None = field(default=None, metadata=_OMIT)


@dataclass(frozen=True)
class ChosenPostprocessing:
    """``find_best.json``'s summary of the best candidate's post-processing (the whole choice is in ``file``).

    Either the choice (``file``, the operations and the mean Dice before and after) or, when none could be
    chosen, only ``error``. The operations of version 2 of ``postprocessing.json`` (``min_size_mm3``,
    ``opening_radius_mm``, ``closing_radius_mm``, ``fill_holes``) are written only when adopted.

    Example:
        >>> ChosenPostprocessing(error="no validation outputs").chosen
        False
    """

    file: str | None = field(default=None, metadata=_OMIT)
    keep_largest_foreground: bool = False
    keep_largest_labels: tuple[int, ...] = ()
    min_voxels: dict[str, int] = field(default_factory=dict)
    min_size_mm3: dict[str, float] | None = field(default=None, metadata=_OMIT)
    opening_radius_mm: dict[str, float] | None = field(default=None, metadata=_OMIT)
    closing_radius_mm: dict[str, float] | None = field(default=None, metadata=_OMIT)
    fill_holes: dict[str, str] | None = field(default=None, metadata=_OMIT)
    dice_before: dict[str, float | None] = field(default_factory=dict)
    dice_after: dict[str, float | None] = field(default_factory=dict)
    error: str | None = field(default=None, metadata=_OMIT)

    @property
    def chosen(self) -> bool:
        """True when a choice was made (no ``error``)."""
        return not self.error

    def as_postprocessing(self) -> Postprocessing:
        """The operations and figures as a :class:`~automedseg.postprocessing.Postprocessing` (to apply or
        describe; the steps and provenance are only in ``file``)."""
        return Postprocessing(keep_largest_foreground=self.keep_largest_foreground,
                              keep_largest_labels=self.keep_largest_labels, min_voxels=dict(self.min_voxels),
                              **{k: dict(getattr(self, k) or {}) for k in VERSION_2_KEYS},
                              dice_before=dict(self.dice_before), dice_after=dict(self.dice_after))

    def describe(self) -> str:
        """What was adopted, in words, with the cross-validation mean Dice before -> after (or why nothing was).

        Example:
            >>> ChosenPostprocessing(keep_largest_labels=(1,), dice_before={"mean": 0.9755},
            ...                      dice_after={"mean": 0.983}).describe()
            'keep the largest component of class(es) 1: mean Dice 0.9755 -> 0.9830'
            >>> ChosenPostprocessing(dice_before={"mean": 0.9}, dice_after={"mean": 0.9}).describe()
            'none adopted: no operation raised the mean Dice (0.9000)'
        """
        if self.error:
            return f"none chosen: {self.error}"
        before, after = self.dice_before.get("mean"), self.dice_after.get("mean")
        operations = self.as_postprocessing().operations()
        if not operations:
            return "none adopted: no operation raised the mean Dice" + (f" ({before:.4f})" if before is not None
                                                                         else "")
        figures = f": mean Dice {before:.4f} -> {after:.4f}" if before is not None and after is not None else ""
        return "; ".join(operations) + figures

    @classmethod
    def of(cls, choice: Postprocessing, file: Path) -> ChosenPostprocessing:
        """The summary of ``choice``, saved as ``file``."""
        return cls(file=str(file), keep_largest_foreground=choice.keep_largest_foreground,
                   keep_largest_labels=choice.keep_largest_labels, min_voxels=dict(choice.min_voxels),
                   **{k: dict(getattr(choice, k)) or None for k in VERSION_2_KEYS},
                   dice_before=dict(choice.dice_before), dice_after=dict(choice.dice_after))


@dataclass(frozen=True)
class BestChoice:
    """``find_best.json``'s ``best``: the chosen candidate, its figures, post-processing and predict command."""

    configuration: str
    members: tuple[str, ...] = ()
    mean_dice: float | None = None
    dice_per_class: dict[str, float | None] = field(default_factory=dict)
    n_cases: int = 0
    complete: bool | None = None
    postprocessing: ChosenPostprocessing | None = None
    predict_command: str | None = None
    mean_dice_postprocessed: float | None = field(default=None, metadata=_OMIT)

    @property
    def candidate(self) -> Candidate:
        return Candidate.parse(self.configuration)


@dataclass(frozen=True)
class FindBest:
    """The content of ``<work>/find_best.json`` (see :func:`automedseg.model_selection.find_best`).

    Attributes:
        best: The choice.
        ranking_basis: On which cases the candidates were ranked, in words.
        candidates: Every scored candidate, best first.
        not_evaluated: Candidate -> why it could not be scored.
        configurations: What each configuration's folds hold
            (:meth:`automedseg.validation_outputs.ValidationOutputs.to_dict`).
        folds: The folds used (``"all"`` or a list of fold names).
        missing: One line per gap.
        complete: Every fold of every candidate was validated and every case scored.
    """

    best: BestChoice
    ranking_basis: str | None = None
    candidates: tuple[CandidateScore, ...] = ()
    not_evaluated: dict[str, str] = field(default_factory=dict)
    configurations: dict[str, Any] = field(default_factory=dict)
    folds: Any = "all"
    missing: tuple[str, ...] = ()
    complete: bool | None = None

    def summary(self) -> list[str]:
        """The winner and its post-processing, one line each, as ``automedseg find-best`` prints them.

        Example:
            >>> for line in FindBest(BestChoice("2d", mean_dice=0.8, n_cases=10), "mean Dice over 10 cases").summary():
            ...     print(line)
            best: 2d (CV mean Dice 0.8000 on 10 cases; ranked by mean Dice over 10 cases)
            post-processing: not chosen
        """
        b = self.best
        dice = f"CV mean Dice {b.mean_dice:.4f}" if b.mean_dice is not None else "no CV Dice"
        basis = f"; ranked by {self.ranking_basis}" if self.ranking_basis else ""
        pp = b.postprocessing
        if pp is None:
            post = "not chosen"
        else:
            post = pp.describe() + (f" ({pp.file})" if pp.chosen and pp.file else "")
        return [f"best: {b.configuration} ({dice} on {b.n_cases} cases{basis})", f"post-processing: {post}"]


def find_best_path(ws: Workspace) -> Path:
    """``<work>/find_best.json``."""
    return ws.root / FIND_BEST_FILE


def write_find_best(path: Path, result: FindBest | dict[str, Any]) -> FindBest:
    """Write ``find_best.json`` atomically (a mapping is checked first).

    Returns:
        What :func:`read_find_best` will read back (tuples, NumPy numbers and non-finite numbers normalised).
    """
    data = to_jsonable(result) if isinstance(result, FindBest) else result
    typed = from_jsonable(FindBest, jsonable(data), str(path))
    write_artifact(path, typed)
    return typed


def read_find_best(path: Path) -> FindBest:
    """Read ``find_best.json``.

    Raises:
        FileNotFoundError: There is none (``automedseg find-best`` has not run).
        InputError: It is not JSON or a field is wrong (the message names the file and the field).
    """
    return read_artifact(FindBest, path)
