"""What the cross-validation folders of a configuration hold, and the cases a candidate can be scored on.

After cross-validation every fold folder ``<work>/C/fold_K/validation/`` holds, for each held-out case,
``<case>.npz`` (``probabilities``: float16 ``(K, Z, Y, X)`` on the original image grid, channel ``k`` for
training index ``k``, the ``k``-th smallest declared label value), ``<case>.nii.gz`` (the argmax
segmentation in declared label values) and ``summary.json``. :func:`collect_validation` lists them (and what is
missing); :class:`ValidationCases` loads a candidate's (configuration or ensemble ``A+B``) prediction and the
reference of each case on demand. An ensemble predicts the argmax of the mean of its members' probabilities
(:func:`average_probabilities`).

The reference label of a case is the raw file named by ``label_file`` in
``<work>/preprocessed/<data_identifier>/<case>.json`` (:func:`automedseg.preprocessing.read_case_meta`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.errors import InputError
from automedseg.io import read_label
from automedseg.plans import PlanError, Plans, indices_to_values
from automedseg.preprocessing import case_meta_path, read_case_meta
from automedseg.splits import Splits, read_splits
from automedseg.validation_summary import SUMMARY_FILE, read_validation_summary
from automedseg.workspace import Workspace

_MAX_NAMES = 10  # case names listed in a message before "..."


def _names(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_NAMES else "")


# ----------------------------------------------------------------------------------------------------
# Probabilities
# ----------------------------------------------------------------------------------------------------


def average_probabilities(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of several softmax probability maps of equal shape, as float32.

    Args:
        probabilities: Arrays ``(K, Z, Y, X)`` (any equal shapes), e.g. float16 from validation ``.npz``.

    Raises:
        ValueError: Empty list or differing shapes.
    """
    if len(probabilities) == 0:
        raise ValueError("average_probabilities needs at least one array")
    shape = np.shape(probabilities[0])
    for i, p in enumerate(probabilities[1:], start=1):
        if np.shape(p) != shape:
            raise ValueError(f"probabilities {i} have shape {np.shape(p)}, the first ones {shape}")
    total = np.array(probabilities[0], dtype=np.float32, copy=True)
    for p in probabilities[1:]:
        total += np.asarray(p, dtype=np.float32)
    total /= len(probabilities)
    return total


def _argmax(probs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Argmax of ``(K, ...)`` probabilities as declared label values; ``labels``: the foreground values."""
    return indices_to_values(probs.argmax(0), (0, *sorted(labels)))


def load_probabilities(path: Path) -> np.ndarray:
    """The ``probabilities`` array of a validation or prediction ``.npz`` (no pickle)."""
    with np.load(Path(path), allow_pickle=False) as z:
        if "probabilities" not in z.files:
            raise ValueError(f"{path}: has no 'probabilities' array (found {z.files})")
        return z["probabilities"]


# ----------------------------------------------------------------------------------------------------
# What a configuration's folds hold
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseOutputs:
    """Validation outputs of one case: the fold that validated it and its files (``None`` if absent)."""

    fold: str
    probabilities: Path | None
    segmentation: Path | None


@dataclass
class ValidationOutputs:
    """What the validation folders of one configuration hold, and what they lack.

    Attributes:
        configuration: Configuration name.
        data_identifier: Its preprocessed cache folder (where the case JSON with ``label_file`` lies).
        labels: Foreground classes of the plan.
        cases: Case -> outputs, over all folds with validation outputs.
        folds_found: Folds with at least one validation output.
        folds_missing: Expected folds (``splits.json`` or ``folds``) without any validation output.
        folds_incomplete: Folds whose validation has no ``summary.json`` (interrupted) or lacks cases.
        cases_missing: Cases the split (or a fold's summary) expects that have no output.
    """

    configuration: str
    data_identifier: str
    labels: tuple[int, ...]
    cases: dict[str, CaseOutputs] = field(default_factory=dict)
    folds_found: list[str] = field(default_factory=list)
    folds_missing: list[str] = field(default_factory=list)
    folds_incomplete: list[str] = field(default_factory=list)
    cases_missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.folds_missing or self.folds_incomplete or self.cases_missing)

    def problems(self) -> list[str]:
        """One human-readable line per gap."""
        c = self.configuration
        out = []
        if self.folds_missing:
            out.append(f"{c}: no validation outputs for fold(s) {', '.join(self.folds_missing)} "
                       "(not trained yet, or training did not finish)")
        if self.folds_incomplete:
            out.append(f"{c}: validation of fold(s) {', '.join(self.folds_incomplete)} is incomplete "
                       "(no summary.json or cases missing; rerun the fold's validation)")
        if self.cases_missing:
            out.append(f"{c}: {len(self.cases_missing)} case(s) without validation output: "
                       f"{_names(self.cases_missing)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "folds_found": self.folds_found,
            "folds_missing": self.folds_missing,
            "folds_incomplete": self.folds_incomplete,
            "n_cases": len(self.cases),
            "n_cases_with_probabilities": sum(o.probabilities is not None for o in self.cases.values()),
            "cases_missing": self.cases_missing,
            "complete": self.complete,
        }


def _read_splits(ws: Workspace) -> Splits | None:
    return read_splits(ws.splits_path) if ws.splits_path.is_file() else None


def _configuration_info(ws: Workspace, configuration: str) -> tuple[str, tuple[int, ...]]:
    """(data_identifier, foreground labels) from ``plans.json``, else from a fold's plan copy."""
    sources = [ws.plans_path] if ws.plans_path.is_file() else []
    sources += sorted(ws.configuration_dir(configuration).glob("fold_*/plans.json"))
    available: list[str] = []
    for path in sources:
        try:
            plans = Plans.load(path)
        except PlanError as e:
            if path == ws.plans_path:
                raise ValueError(str(e)) from None
            continue
        if configuration in plans.configurations:
            labels = tuple(sorted(v for v in plans.labels.values() if v > 0))
            return plans.configurations[configuration].data_identifier, labels
        available += [n for n in plans.configurations if n not in available]
    if not sources:
        raise ValueError(f"{ws.plans_path}: missing (run `automedseg plan` first)")
    raise ValueError(f"{configuration!r} is not a configuration of {ws.plans_path}; "
                     f"available: {sorted(available)}")


def _fold_names(ws: Workspace, configuration: str, folds: Sequence[int | str] | None,
                splits: Splits | None) -> list[str]:
    if folds is not None:
        return [str(f) for f in folds]
    found = {int(p.name[5:]) for p in ws.configuration_dir(configuration).glob("fold_*")
             if p.name[5:].isdigit()}
    if splits is not None:
        found |= set(range(len(splits)))
    return [str(f) for f in sorted(found)]


def collect_validation(ws: Workspace, configuration: str, *,
                       folds: Sequence[int | str] | None = None) -> ValidationOutputs:
    """List the validation outputs of a configuration's folds and what is missing.

    The expected folds are those of ``splits.json`` (or ``folds`` when given, or the fold folders found);
    the expected cases of a fold are its ``val`` list in ``splits.json`` (else its ``summary.json`` cases).

    Raises:
        ValueError: The configuration is not in the plan (or the plan cannot be read).
    """
    data_identifier, labels = _configuration_info(ws, configuration)
    splits = _read_splits(ws)
    out = ValidationOutputs(configuration, data_identifier, labels)
    for fold in _fold_names(ws, configuration, folds, splits):
        vdir = ws.fold_dir(configuration, fold) / "validation"
        probs: dict[str, Path] = {}
        segs: dict[str, Path] = {}
        if vdir.is_dir():
            for p in vdir.iterdir():
                if p.name.startswith(".") or not p.is_file():  # hidden: temporary files of atomic writes
                    continue
                if p.name.endswith(".npz"):
                    probs[p.name[:-4]] = p
                elif p.name.endswith(".nii.gz"):
                    segs[p.name[:-7]] = p
        found = sorted(set(probs) | set(segs))
        try:
            summary = read_validation_summary(vdir / SUMMARY_FILE)
        except (FileNotFoundError, InputError):
            summary = None
        expected: list[str] | None = None
        if splits is not None and fold.isdigit() and int(fold) < len(splits):
            expected = list(splits[int(fold)].val)
        elif summary is not None:
            expected = list(summary.cases)
        if not found:
            out.folds_missing.append(fold)
            out.cases_missing += [c for c in expected or [] if c not in out.cases]
            continue
        out.folds_found.append(fold)
        lacking = [c for c in expected or [] if c not in probs and c not in segs]
        if summary is None or lacking:
            out.folds_incomplete.append(fold)
        out.cases_missing += lacking
        for case in found:
            if case not in out.cases:  # a case validated by two folds (changed split): the first one counts
                out.cases[case] = CaseOutputs(fold, probs.get(case), segs.get(case))
    out.cases_missing = sorted(c for c in dict.fromkeys(out.cases_missing) if c not in out.cases)
    return out


# ----------------------------------------------------------------------------------------------------
# References and predictions
# ----------------------------------------------------------------------------------------------------


def reference_path(ws: Workspace, data_identifier: str, case: str) -> Path:
    """The raw label file of a case, from its preprocessed JSON.

    Raises:
        FileNotFoundError: No case JSON, no ``label_file`` in it, or the file is gone (message says which).
    """
    folder = ws.preprocessed_dir(data_identifier)
    meta_path = case_meta_path(folder, case)
    try:
        label_file = read_case_meta(folder, case).label_file
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path}: missing (preprocessed cache deleted?)") from None
    except (OSError, InputError) as e:
        raise FileNotFoundError(f"cannot read {e}") from None
    if not label_file:
        raise FileNotFoundError(f"{meta_path}: has no 'label_file'")
    path = Path(label_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference label of {case} is missing (named in {meta_path})")
    return path


def load_reference(ws: Workspace, data_identifier: str,
                   case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The reference label map ``(Z, Y, X)`` of a case and its spacing (z, y, x) in mm."""
    ref, geometry = read_label(reference_path(ws, data_identifier, case))
    return ref, geometry.spacing_zyx


def _predict(members: Sequence[ValidationOutputs], case: str,
             seg_cache: dict[str, np.ndarray] | None = None,
             prob_cache: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Segmentation of a case by one member (its .nii.gz) or an ensemble (argmax of mean probabilities)."""
    seg_cache = {} if seg_cache is None else seg_cache
    prob_cache = {} if prob_cache is None else prob_cache

    def probs(m: ValidationOutputs) -> np.ndarray:
        if m.configuration not in prob_cache:
            path = m.cases[case].probabilities
            if path is None:
                raise ValueError(f"{m.configuration}: no probabilities (.npz) for case {case}")
            prob_cache[m.configuration] = load_probabilities(path)
        return prob_cache[m.configuration]

    if len(members) == 1:
        m = members[0]
        if m.configuration not in seg_cache:
            outputs = m.cases[case]
            if outputs.segmentation is not None:
                seg_cache[m.configuration] = read_label(outputs.segmentation)[0]
            else:
                seg_cache[m.configuration] = _argmax(probs(m), m.labels)
        return seg_cache[m.configuration]
    return _argmax(average_probabilities([probs(m) for m in members]), members[0].labels)


def _collect_members(ws: Workspace, names: Sequence[str], folds: Sequence[int | str] | None,
                     known: dict[str, ValidationOutputs] | None = None) -> dict[str, ValidationOutputs]:
    known = dict(known or {})
    for n in names:
        if n not in known:
            known[n] = collect_validation(ws, n, folds=folds)
    label_sets = {known[n].labels for n in names}
    if len(label_sets) > 1:
        raise ValueError(f"configurations {list(names)} have different label sets: {sorted(label_sets)}")
    return known


def _candidate_cases(members: Sequence[ValidationOutputs]) -> tuple[list[str], list[str]]:
    """Cases a candidate can be scored on, and lines explaining the cases it cannot."""
    notes: list[str] = []
    sets = [set(m.cases) for m in members]
    common = set.intersection(*sets)
    union = set.union(*sets)
    if len(members) > 1:
        if union - common:
            for m, s in zip(members, sets):
                lacking = sorted(union - s)
                if lacking:
                    notes.append(f"{m.configuration}: lacks {len(lacking)} case(s) the other member(s) "
                                 f"validated: {_names(lacking)}")
        no_probs = sorted(c for c in common if any(m.cases[c].probabilities is None for m in members))
        if no_probs:
            notes.append(f"{len(no_probs)} case(s) without probabilities (.npz) in some member, "
                         f"not ensembled: {_names(no_probs)}")
        common -= set(no_probs)
    return sorted(common), notes


class ValidationCases(Sequence):
    """The cross-validation cases of a configuration or ensemble as ``(reference, prediction, spacing)``.

    A lazy sequence for :func:`automedseg.postprocessing.choose_postprocessing`: each case is read when
    indexed; cases are kept in memory only up to ``cache_bytes`` in all. Cases without a reference label
    are left out and reported in :attr:`missing`, with every other gap (folds not trained ...).

    Attributes:
        members: The configurations (one, or several for an ensemble).
        labels: Foreground classes.
        case_ids: The cases, sorted.
        missing: Human-readable lines, one per gap.
    """

    def __init__(self, ws: Workspace, members: Sequence[str], *, folds: Sequence[int | str] | None = None,
                 cache_bytes: int = 1 << 30) -> None:
        if not members:
            raise ValueError("ValidationCases needs at least one configuration")
        self.ws = ws
        self.members = list(members)
        outputs = _collect_members(ws, self.members, folds)
        self._outputs = [outputs[m] for m in self.members]
        self.labels: tuple[int, ...] = self._outputs[0].labels
        self.missing: list[str] = [line for m in self._outputs for line in m.problems()]
        cases, notes = _candidate_cases(self._outputs)
        self.missing += notes
        did = self._outputs[0].data_identifier
        self._refs: dict[str, Path] = {}
        no_ref = []
        for case in cases:
            try:
                self._refs[case] = reference_path(ws, did, case)
            except FileNotFoundError as e:
                no_ref.append(f"{case} ({e})")
        if no_ref:
            self.missing.append(f"{len(no_ref)} case(s) without a reference label, left out: "
                                f"{_names(no_ref)}")
        self.case_ids: list[str] = [c for c in cases if c in self._refs]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, tuple[float, float, float]]] = {}
        self._cache_left = int(cache_bytes)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(  # type: ignore[override]
        self, index: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError("ValidationCases supports integer indices only")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index in self._cache:
            return self._cache[index]
        case = self.case_ids[index]
        ref, geometry = read_label(self._refs[case])
        pred = _predict(self._outputs, case)
        if ref.shape != pred.shape:
            raise ValueError(f"case {case}: reference {self._refs[case]} has shape {ref.shape}, the "
                             f"validation prediction of {'+'.join(self.members)} {pred.shape}")
        item = (ref, pred, geometry.spacing_zyx)
        size = ref.nbytes + pred.nbytes
        if size <= self._cache_left:
            self._cache[index] = item
            self._cache_left -= size
        return item
