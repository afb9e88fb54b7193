"""Model selection: cross-validation scores of configurations and their ensembles, the choice of the best one
and of its post-processing (:func:`determine_postprocessing`).

After cross-validation every fold folder ``<work>/C/fold_K/validation/`` holds, for each held-out case,
``<case>.npz`` (``probabilities``: float16 ``(K, Z, Y, X)`` on the original image grid, channel ``k`` for
training index ``k``, the ``k``-th smallest declared label value), ``<case>.nii.gz`` (the argmax
segmentation in declared label values) and ``summary.json`` (listed by :mod:`automedseg.validation_outputs`).
Over the folds of a 5-fold split every
training case is validated exactly once, so a configuration's cross-validation score covers all cases.

* A configuration is scored on its segmentations; an ensemble ``A+B`` on the argmax of the mean of its
  members' probabilities (:func:`automedseg.validation_outputs.average_probabilities`), on the cases every
  member validated.
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

``find_best.json`` is typed in :mod:`automedseg.best_choice` (:class:`FindBest`, :func:`read_find_best`,
:func:`write_find_best`; re-exported here).
"""

from __future__ import annotations

import itertools
import shlex
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from automedseg.best_choice import (  # noqa: F401  (re-exported)
    FIND_BEST_FILE,
    BestChoice,
    Candidate,
    CandidateScore,
    ChosenPostprocessing,
    FindBest,
    find_best_path,
    read_find_best,
    write_find_best,
)
from automedseg.mask_metrics import dice_per_label
from automedseg.plans import PlanError, Plans
from automedseg.postprocessing import (
    DEFAULT_TOLERANCE,
    Postprocessing,
    choose_postprocessing,
    postprocessing_path,
)
from automedseg.validation_outputs import (
    ValidationCases,
    ValidationOutputs,
    _candidate_cases,
    _collect_members,
    _names,
    _predict,
    collect_validation,
    load_reference,
)
from automedseg.workspace import Workspace

Log = Callable[[str], None]


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
              log: Log | None = None) -> FindBest:
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
        each one's folds hold), ``missing`` (one line per gap) and ``complete`` (see :class:`FindBest`).

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

    chosen_pp, mean_pp = None, None
    if postprocess:
        try:
            choice = determine_postprocessing(ws, best["name"], folds=folds)
            chosen_pp = ChosenPostprocessing.of(choice, postprocessing_path(ws, best["name"]))
            mean_pp = choice.dice_after.get("mean")
        except ValueError as e:
            chosen_pp = ChosenPostprocessing(error=str(e))
    best_entry = BestChoice(
        configuration=best["name"], members=tuple(best["members"]), mean_dice=best["mean_dice"],
        dice_per_class=best["dice_per_class"], n_cases=best["n_cases"], complete=best["complete"],
        postprocessing=chosen_pp, predict_command=predict_command(ws, best["name"], folds=folds),
        mean_dice_postprocessed=mean_pp)

    configs = {n: o.to_dict() for n, o in outputs.items()}
    missing = [line for o in outputs.values() for line in o.problems()]
    missing += [f"{n}: not evaluated: {r}" for n, r in not_evaluated.items() if n in names]
    candidate_scores = tuple(
        CandidateScore(name=r["name"], members=tuple(r["members"]), n_cases=r["n_cases"], mean_dice=r["mean_dice"],
                       dice_per_class=r["dice_per_class"], complete=r["complete"], missing=tuple(r["missing"]),
                       rank=i + 1, dice_per_class_common_cases=r.get("dice_per_class_common_cases"),
                       mean_dice_common_cases=r.get("mean_dice_common_cases"))
        for i, r in enumerate(ranked))
    result = FindBest(
        best=best_entry, ranking_basis=basis, candidates=candidate_scores, not_evaluated=not_evaluated,
        configurations=configs, folds=[str(f) for f in folds] if folds is not None else "all",
        missing=tuple(missing), complete=not missing and all(r["complete"] for r in scored))
    write_find_best(find_best_path(ws), result)
    if log is not None:  # the winner, its post-processing and the predict command: FindBest.summary() and the caller
        for line in missing:
            log(f"find-best: missing: {line}")
    return result


def determine_postprocessing(ws: Workspace, configuration: str, *, folds: Sequence[int | str] | None = None,
                             remove_small: bool = True, morphology: bool = True,
                             tolerance: float = DEFAULT_TOLERANCE) -> Postprocessing:
    """Choose the post-processing of a configuration (or an ensemble ``A+B``) on its validation outputs.

    Reads every fold's ``validation/<case>.nii.gz`` (ensembles: the averaged ``<case>.npz``
    probabilities) and the case's reference label (``label_file`` of the preprocessed case JSON), with the
    reference's voxel spacing in mm (what the operations in millimetres are measured with; ``automedseg
    predict`` passes each image's), runs :func:`choose_postprocessing` (``remove_small``, ``morphology``: its
    steps 3 and 4 to 6), writes the result to :func:`postprocessing_path` and returns it.
    Cases are loaded on demand, so large datasets need not fit in memory at once.

    Raises:
        ValueError: No validation case with a reference label was found (the message says what is missing).
    """
    members = configuration.split("+")
    cases = ValidationCases(ws, members, folds=folds)
    if len(cases) == 0:
        raise ValueError(f"{configuration}: no validation outputs with reference labels to choose the "
                         f"post-processing on; {'; '.join(cases.missing) or 'nothing was found'}")
    choice = choose_postprocessing(cases, labels=cases.labels, remove_small=remove_small, morphology=morphology,
                                   tolerance=tolerance)
    choice = choice.with_provenance(configuration=configuration, members=members, cases=cases.case_ids,
                                    missing=cases.missing)
    choice.save(postprocessing_path(ws, configuration))
    return choice
