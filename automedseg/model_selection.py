"""Model selection: cross-validation scores of configurations and their ensembles, the choice of the best one
and of its post-processing (:func:`determine_postprocessing`).

After cross-validation every fold folder ``<work>/C/fold_K/validation/`` holds, for each held-out case,
``<case>.npz`` (``probabilities``: float16 ``(K, Z, Y, X)`` on the original image grid, channel ``k`` for
training index ``k``, the ``k``-th smallest declared label value), ``<case>.nii.gz`` (the argmax
segmentation in declared label values) and ``summary.json``. Over the folds of a 5-fold split every
training case is validated exactly once, so a configuration's cross-validation score covers all cases.

* A configuration is scored on its segmentations; an ensemble ``A+B`` on the argmax of the mean of its
  members' probabilities (:func:`average_probabilities`), on the cases every member validated.
* The score is the Dice per foreground class averaged over cases, and the mean over classes (the
  figure ``automedseg train`` logs as "mean Dice"). A class absent from both reference and prediction
  scores 1 (see :mod:`automedseg.metrics`).
* :func:`find_best` scores every configuration with validation outputs and every pairwise ensemble,
  picks the highest mean Dice (a single configuration wins ties: it predicts faster), chooses its
  post-processing (:mod:`automedseg.postprocessing`) and writes ``<work>/find_best.json`` with all
  figures and the ``automedseg predict`` command to use.

Partial states (some folds not trained yet, a validation interrupted) are evaluated as they are: the
figures cover the cases that exist, and every result says what is missing. When the candidates were
scored on different cases, they are ranked on the cases they share.

The reference label of a case is the raw file named by ``label_file`` in
``<work>/preprocessed/<data_identifier>/<case>.json``.
"""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.atomic import jsonable
from automedseg.errors import InputError
from automedseg.io import read_label
from automedseg.mask_metrics import dice_per_label
from automedseg.plans import PlanError, Plans, from_jsonable, indices_to_values
from automedseg.postprocessing import (
    DEFAULT_TOLERANCE,
    choose_postprocessing,
    postprocessing_path,
    save_postprocessing,
)
from automedseg.preprocessing import case_meta_path, read_case_meta
from automedseg.splits import read_splits
from automedseg.validation_summary import SUMMARY_FILE, read_validation_summary
from automedseg.workspace import Workspace

Log = Callable[[str], None]
FIND_BEST_FILE = "find_best.json"
_MAX_NAMES = 10  # case names listed in a message before "..."


def _names(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_NAMES else "")


# ----------------------------------------------------------------------------------------------------
# find_best.json
# ----------------------------------------------------------------------------------------------------


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
class BestChoice:
    """``find_best.json``'s ``best``: the chosen candidate, its figures, post-processing and predict command."""

    configuration: str
    members: tuple[str, ...] = ()
    mean_dice: float | None = None
    dice_per_class: dict[str, float | None] = field(default_factory=dict)
    n_cases: int = 0
    complete: bool | None = None
    postprocessing: dict[str, Any] | None = None
    predict_command: str | None = None
    mean_dice_postprocessed: float | None = field(default=None, metadata={"omit_if_none": True})

    @property
    def candidate(self) -> Candidate:
        return Candidate.parse(self.configuration)


@dataclass(frozen=True)
class FindBest:
    """The content of ``<work>/find_best.json`` (see :func:`find_best`); the JSON stays readable by hand."""

    best: BestChoice
    ranking_basis: str | None = None
    candidates: tuple[dict[str, Any], ...] = ()
    not_evaluated: dict[str, str] = field(default_factory=dict)
    configurations: dict[str, Any] = field(default_factory=dict)
    folds: Any = "all"
    missing: tuple[str, ...] = ()
    complete: bool | None = None


def find_best_path(ws: Workspace) -> Path:
    return ws.root / FIND_BEST_FILE


def write_find_best(path: Path, result: FindBest | dict[str, Any]) -> FindBest:
    """Write ``find_best.json`` atomically (a mapping is checked first); returns it typed."""
    if not isinstance(result, FindBest):
        result = from_jsonable(FindBest, jsonable(result), str(path))
    write_artifact(path, result)
    return result


def read_find_best(path: Path) -> FindBest:
    """Read ``find_best.json``.

    Raises:
        FileNotFoundError: There is none (``automedseg find-best`` has not run).
        InputError: It is not JSON or a field is wrong (the message names the file and the field).
    """
    return read_artifact(FindBest, path)


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


def _read_splits(ws: Workspace) -> list[dict[str, list[str]]] | None:
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
                splits: list[dict[str, Any]] | None) -> list[str]:
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
            expected = [str(c) for c in splits[int(fold)]["val"]]
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


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------


def _summarise(per_case: Sequence[dict[str, Any]], labels: Sequence[int],
               cases: set[str] | None = None) -> tuple[dict[str, float], float | None]:
    rows = [c["dice"] for c in per_case if cases is None or c["case"] in cases]
    if not rows:
        return {}, None
    per_class = {str(k): float(np.mean([r[str(k)] for r in rows])) for k in labels}
    return per_class, float(np.mean(list(per_class.values())))


def _evaluate(ws: Workspace, candidates: Sequence[Sequence[str]], *, folds: Sequence[int | str] | None,
              outputs: dict[str, ValidationOutputs] | None = None,
              log: Log | None = None) -> list[dict[str, Any]]:
    """Score several candidates in one pass over the cases (each member's files read once per case)."""
    names = list(dict.fromkeys(m for c in candidates for m in c))
    outputs = _collect_members(ws, names, folds, outputs)
    labels = outputs[names[0]].labels
    plans = []
    for members in candidates:
        mo = [outputs[m] for m in members]
        cases, notes = _candidate_cases(mo)
        missing = [line for m in mo for line in m.problems()] + notes
        plans.append({"members": list(members), "cases": set(cases), "missing": missing,
                      "complete": all(m.complete for m in mo) and not notes})
    per_case: list[list[dict[str, Any]]] = [[] for _ in candidates]
    skipped: list[dict[str, str]] = [{} for _ in candidates]
    all_cases = sorted(set().union(*(p["cases"] for p in plans)))
    for n_done, case in enumerate(all_cases):
        wanting = [i for i, p in enumerate(plans) if case in p["cases"]]
        first = outputs[candidates[wanting[0]][0]]
        try:
            ref, _ = load_reference(ws, first.data_identifier, case)
        except (FileNotFoundError, OSError, ValueError) as e:
            for i in wanting:
                skipped[i][case] = f"no reference label: {e}"
            continue
        seg_cache: dict[str, np.ndarray] = {}
        prob_cache: dict[str, np.ndarray] = {}
        for i in wanting:
            mo = [outputs[m] for m in candidates[i]]
            try:
                pred = _predict(mo, case, seg_cache, prob_cache)
            except (OSError, ValueError) as e:
                skipped[i][case] = f"cannot read the prediction: {e}"
                continue
            if pred.shape != ref.shape:
                skipped[i][case] = f"prediction shape {pred.shape} != reference shape {ref.shape}"
                continue
            d = dice_per_label(ref, pred, labels=labels)
            per_case[i].append({"case": case, "dice": {str(k): v for k, v in d.items()}})
        if log is not None and (n_done + 1) % 20 == 0:
            log(f"find-best: {n_done + 1}/{len(all_cases)} cases scored")
    results = []
    for i, p in enumerate(plans):
        dice_per_class, mean = _summarise(per_case[i], labels)
        missing = list(p["missing"])
        if skipped[i]:
            missing.append(f"{len(skipped[i])} case(s) skipped: " + _names(
                [f"{c} ({r})" for c, r in skipped[i].items()]))
        results.append({
            "name": "+".join(p["members"]),
            "members": p["members"],
            "n_cases": len(per_case[i]),
            "mean_dice": mean,
            "dice_per_class": dice_per_class,
            "complete": bool(p["complete"] and not skipped[i]),
            "missing": missing,
            "cases_skipped": skipped[i],
            "per_case": per_case[i],
        })
    return results


def cross_validation_dice(ws: Workspace, members: Sequence[str] | str, *,
                          folds: Sequence[int | str] | None = None) -> dict[str, Any]:
    """Cross-validation Dice of a configuration or an ensemble of configurations.

    Args:
        ws: The work folder.
        members: One configuration, several (their validation probabilities are averaged per case), or
            a string ``"A+B"``.
        folds: Restrict to these folds (default: all, i.e. the union over the folds of the split).

    Returns:
        ``{"name", "members", "n_cases", "mean_dice", "dice_per_class": {"1": ...}, "complete",
        "missing": [lines], "cases_skipped": {case: reason}, "per_case": [{"case", "dice"}]}``;
        ``mean_dice`` is ``None`` when no case could be scored.
    """
    members = members.split("+") if isinstance(members, str) else list(members)
    if not members:
        raise ValueError("cross_validation_dice needs at least one configuration")
    return _evaluate(ws, [members], folds=folds)[0]


def predict_command(ws: Workspace, name: str, *, folds: Sequence[int | str] | None = None) -> str:
    """The ``automedseg predict`` command line for a configuration or ensemble of this work folder."""
    cmd = f"automedseg predict -i INPUT -o OUTPUT -d {shlex.quote(str(ws.root))} -c {shlex.quote(name)}"
    for f in folds or []:
        cmd += f" -f {shlex.quote(str(f))}"
    return cmd


def _trained_configurations(ws: Workspace) -> list[str]:
    if ws.plans_path.is_file():
        try:
            return list(Plans.load(ws.plans_path).configurations)
        except PlanError as e:
            raise ValueError(str(e)) from None
    if not ws.root.is_dir():
        raise ValueError(f"{ws.root}: work folder does not exist")
    return sorted(p.name for p in ws.root.iterdir() if p.is_dir() and any(p.glob("fold_*/validation")))


def find_best(ws: Workspace, *, configurations: Sequence[str] | None = None,
              folds: Sequence[int | str] | None = None, ensembles: bool = True, postprocess: bool = True,
              log: Log | None = None) -> dict[str, Any]:
    """Score every configuration with validation outputs and every pairwise ensemble; keep the best.

    Writes ``<work>/find_best.json`` (atomically) and, with ``postprocess``, the post-processing of the
    best candidate (``<work>/C/postprocessing.json`` or ``<work>/postprocessing_A+B.json``).

    Args:
        ws: The work folder.
        configurations: Candidates (default: every configuration of the plan that has validation outputs).
        folds: Restrict to these folds (default: all).
        ensembles: Also score the pairwise ensembles.
        postprocess: Choose the post-processing of the best candidate on its cross-validation outputs.
        log: Progress messages.

    Returns:
        The content of ``find_best.json``: ``best`` (``configuration``, ``members``, ``mean_dice``,
        ``dice_per_class``, ``postprocessing``, ``predict_command``), ``ranking_basis``, ``candidates``
        (best first, per-class figures), ``not_evaluated`` (name -> reason), ``configurations`` (what
        each one's folds hold), ``missing`` (one line per gap) and ``complete``.

    Raises:
        ValueError: Nothing can be evaluated (the message says what is missing).
    """
    names = list(configurations) if configurations is not None else _trained_configurations(ws)
    outputs: dict[str, ValidationOutputs] = {}
    not_evaluated: dict[str, str] = {}
    for n in names:
        try:
            out = collect_validation(ws, n, folds=folds)
        except ValueError as e:
            not_evaluated[n] = str(e)
            continue
        if not out.cases:
            gap = f" (fold(s) {', '.join(out.folds_missing)} not trained or not validated)"
            not_evaluated[n] = "no validation outputs" + (gap if out.folds_missing else "")
            continue
        outputs[n] = out
    if not outputs:
        detail = "; ".join(f"{n}: {r}" for n, r in not_evaluated.items()) or f"no configuration in {ws.root}"
        raise ValueError(f"find_best: nothing to evaluate ({detail}); train folds first (`automedseg train`)")
    evaluable = list(outputs)
    label_sets = {o.labels for o in outputs.values()}
    if len(label_sets) > 1:
        raise ValueError(f"find_best: configurations have different label sets: {sorted(label_sets)}")
    candidates: list[tuple[str, ...]] = [(n,) for n in evaluable]
    if ensembles:
        candidates += list(itertools.combinations(evaluable, 2))
    if log is not None:
        log(f"find-best: scoring {len(candidates)} candidate(s): "
            f"{', '.join('+'.join(c) for c in candidates)}")
    results = _evaluate(ws, candidates, folds=folds, outputs=outputs, log=log)

    scored = [r for r in results if r["n_cases"] > 0]
    for r in results:
        if r["n_cases"] == 0:
            why = "; ".join(r["missing"]) or "no shared cases"
            not_evaluated[r["name"]] = f"no case could be scored: {why}"
    if not scored:
        raise ValueError("find_best: no case could be scored; " + "; ".join(
            f"{k}: {v}" for k, v in not_evaluated.items()))
    labels = next(iter(label_sets))
    case_sets = [{c["case"] for c in r["per_case"]} for r in scored]
    common = set.intersection(*case_sets)
    if all(s == case_sets[0] for s in case_sets):
        basis = f"mean Dice over all {len(common)} cross-validation cases"
    elif common:
        basis = (f"mean Dice over the {len(common)} cases every candidate was scored on "
                 "(the candidates cover different cases)")
        for r in scored:
            per_class, mean = _summarise(r["per_case"], labels, common)
            r["dice_per_class_common_cases"], r["mean_dice_common_cases"] = per_class, mean
    else:
        basis = ("mean Dice over each candidate's own cases: no case is shared by all candidates, "
                 "so the figures are not directly comparable")
    key = "mean_dice_common_cases" if "mean_dice_common_cases" in scored[0] else "mean_dice"
    ranked = sorted(scored, key=lambda r: (-r[key], len(r["members"]), r["name"]))
    best = ranked[0]

    best_entry: dict[str, Any] = {
        "configuration": best["name"],
        "members": best["members"],
        "mean_dice": best["mean_dice"],
        "dice_per_class": best["dice_per_class"],
        "n_cases": best["n_cases"],
        "complete": best["complete"],
        "postprocessing": None,
        "predict_command": predict_command(ws, best["name"], folds=folds),
    }
    if postprocess:

        try:
            choice = determine_postprocessing(ws, best["name"], folds=folds)
            best_entry["postprocessing"] = {
                "file": str(postprocessing_path(ws, best["name"])),
                "keep_largest_foreground": choice["keep_largest_foreground"],
                "keep_largest_labels": choice["keep_largest_labels"],
                "min_voxels": choice["min_voxels"],
                "dice_before": choice["dice_before"],
                "dice_after": choice["dice_after"],
            }
            best_entry["mean_dice_postprocessed"] = choice["dice_after"]["mean"]
        except ValueError as e:
            best_entry["postprocessing"] = {"error": str(e)}

    configs = {n: o.to_dict() for n, o in outputs.items()}
    missing = [line for o in outputs.values() for line in o.problems()]
    missing += [f"{n}: not evaluated: {r}" for n, r in not_evaluated.items() if n in names]
    result = {
        "best": best_entry,
        "ranking_basis": basis,
        "candidates": [
            {k: v for k, v in r.items() if k not in ("per_case", "cases_skipped")} | {"rank": i + 1}
            for i, r in enumerate(ranked)
        ],
        "not_evaluated": not_evaluated,
        "configurations": configs,
        "folds": [str(f) for f in folds] if folds is not None else "all",
        "missing": missing,
        "complete": not missing and all(r["complete"] for r in scored),
    }
    write_find_best(find_best_path(ws), result)
    if log is not None:
        log(f"find-best: best {best['name']} (mean Dice {best['mean_dice']:.4f}); {basis}")
        for line in missing:
            log(f"find-best: missing: {line}")
        log(f"find-best: predict with: {best_entry['predict_command']}")
    return result


def determine_postprocessing(ws: Workspace, configuration: str, *, folds: Sequence[int | str] | None = None,
                             remove_small: bool = True,
                             tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Choose the post-processing of a configuration (or an ensemble ``A+B``) on its validation outputs.

    Reads every fold's ``validation/<case>.nii.gz`` (ensembles: the averaged ``<case>.npz``
    probabilities) and the case's reference label (``label_file`` of the preprocessed case JSON), runs
    :func:`choose_postprocessing`, writes the result to :func:`postprocessing_path` and returns it.
    Cases are loaded on demand, so large datasets need not fit in memory at once.

    Raises:
        ValueError: No validation case with a reference label was found (the message says what is missing).
    """
    members = configuration.split("+")
    cases = ValidationCases(ws, members, folds=folds)
    if len(cases) == 0:
        raise ValueError(f"{configuration}: no validation outputs with reference labels to choose the "
                         f"post-processing on; {'; '.join(cases.missing) or 'nothing was found'}")
    choice = choose_postprocessing(cases, labels=cases.labels, remove_small=remove_small, tolerance=tolerance)
    choice["configuration"] = configuration
    choice["members"] = list(members)
    choice["cases"] = list(cases.case_ids)
    choice["missing"] = list(cases.missing)
    path = postprocessing_path(ws, configuration)
    save_postprocessing(choice, path)
    return choice
