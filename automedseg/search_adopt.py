"""The end of a search (:mod:`automedseg.search`): confirm the best candidates against the rule plan
(:mod:`automedseg.search_confirm`), write ``<configuration>_searched`` into plans.json only if one wins (or,
with ``--confirm 0``, the best trial unconfirmed), and write the report.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automedseg.plans import ConfigurationPlan, Plans
from automedseg.search_confirm import DEFAULT_CONFIRM, confirm_candidates, publish_fold, rule_kept_note, with_note
from automedseg.search_report import fidelity_warning, write_search_report
from automedseg.search_space import SEARCHED_SUFFIX, summary_line
from automedseg.search_study import best_trial, plans_lock, redact_url, trial_counts
from automedseg.search_trial import full_fold_variant
from automedseg.workspace import Workspace

Log = Callable[[str], None]


@dataclass
class SearchResult:
    """What :func:`run_search` did.

    Attributes:
        study_name: Optuna study name.
        storage: Storage URL, password hidden.
        counts: Trials per state (``complete``, ``pruned``, ``fail``, ``running``, ``waiting``, ``finished``).
        best_trial: Number of the best trial (``None`` when none completed).
        best_value: Its fold-0 validation Dice.
        best_params: Its parameters.
        searched_configuration: Name of the configuration added to plans.json (``None``: nothing completed).
        report_path: The Markdown report.
        trial_budget_s: Wall time of one trial.
        fidelity: ``short`` (multi-fidelity trials, pruned) or ``full`` (full-budget trials, no pruning).
        confirmation: The confirmation's verdict in one line (``None``: not confirmed, see ``--confirm``).
        adopted: A searched candidate beat the rule plan in the confirmation (``None``: not confirmed).
    """

    study_name: str
    storage: str
    counts: dict[str, int]
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    searched_configuration: str | None
    report_path: Path
    trial_budget_s: float
    fidelity: str = "short"
    confirmation: str | None = None
    adopted: bool | None = None


def searched_configuration(plans: Plans, configuration: str, params: Mapping[str, Any], *, study_name: str,
                           trial_number: int, value: float, trial_budget_s: float, n_finished: int,
                           total_budget_s: float | None = None, confirmation: str | None = None
                           ) -> ConfigurationPlan:
    """The best parameters merged into ``<configuration>_searched``, scheduled for a full fold, with provenance.

    The full-fold schedule uses the rule plan's per-fold budget (``training.time_budget_s``); without one
    (GPU plans) the rule plan's epochs and iterations are kept. The planner's notes on mirror axes left out for
    lateralised labels are carried over; ``confirmation`` is the verdict of the confirmation (``None``: the
    configuration is adopted unconfirmed, and its notes say so).
    """
    base = plans.configuration(configuration)
    variant = full_fold_variant(plans, base, params, name=configuration + SEARCHED_SUFFIX)
    notes = (
        f"derived from the rule-based {configuration!r} by automedseg search",
        f"searched: study={study_name}, trial={trial_number}, value={value:.4f}, budget_s={trial_budget_s:.0f} "
        f"per trial, trials={n_finished}" + (f", total_budget_s={total_budget_s:.0f}" if total_budget_s else ""),
        "search params: " + json.dumps(dict(params), sort_keys=True, default=str),
        *(n for n in base.notes if n.endswith("left out of mirroring")),
        f"confirmed: {confirmation}" if confirmation else
        "unconfirmed: chosen on the search's trials only (--confirm 0), not compared with the rule plan at the full "
        "fold budget; it may train worse than the rule plan",
        summary_line(variant, plans.device.name),
    )
    return dataclasses.replace(variant, notes=notes)


def _trial(study: Any, number: int) -> Any:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def finalize_search(ws: Workspace, configuration: str, study: Any, *, storage_url: str = "", log: Log = print,
                    confirm: int = DEFAULT_CONFIRM, dataset: Path | None = None,
                    confirm_options: Mapping[str, Any] | None = None) -> SearchResult:
    """Confirm the best candidates, write ``<configuration>_searched`` only if one beats the rule plan, write the
    report; safe to repeat (a confirmation continues where it stopped).

    With ``confirm`` 0 (and short trials) the best trial is written unconfirmed, as its notes say. In a study of
    full-budget trials the comparison with the rule plan's trial costs nothing and is always made.
    """
    from automedseg.errors import LockedError
    from automedseg.trained import trained_folds

    attrs = study.user_attrs
    per_trial = float(attrs.get("trial_budget_s", 0.0))
    full = attrs.get("fidelity") == "full"
    counts = trial_counts(study)
    best = best_trial(study)
    written, verdict = None, None
    searched = configuration + SEARCHED_SUFFIX
    if best is None:
        log("search: no trial completed yet; plans.json unchanged")
    elif confirm > 0 or full:
        try:
            verdict = confirm_candidates(ws, configuration, study, n=max(1, confirm), dataset=dataset,
                                         full_budget=full, options=confirm_options, log=log)
        except LockedError as e:
            log(f"search: {e}; that worker confirms the candidates and writes the result")
    if verdict is not None and verdict.winner is not None:
        with plans_lock(ws):
            plans = Plans.load(ws.plans_path)
            if verdict.adopted:
                chosen = _trial(study, int(verdict.run(verdict.winner).trial))
                config = searched_configuration(plans, configuration, chosen.params, study_name=study.study_name,
                                                trial_number=chosen.number, value=float(chosen.value),
                                                trial_budget_s=per_trial, n_finished=counts["finished"],
                                                total_budget_s=attrs.get("total_budget_s"),
                                                confirmation=verdict.summary())
                plans = plans.with_configuration(config)
                written = config.name
            else:
                rule = with_note(plans.configuration(configuration), rule_kept_note(study.study_name, verdict),
                                 replace_prefix=f"search {study.study_name}: ")
                plans = plans.with_configuration(rule)
                stale = plans.configurations.get(searched)
                if stale is not None and any(n.startswith(f"searched: study={study.study_name},") for n in stale.notes):
                    if trained_folds(ws, searched):
                        log(f"search: warning: {searched} (from this study, trained) stays in plans.json although "
                            "the rule plan won the confirmation")
                    else:
                        plans = dataclasses.replace(plans, configurations={
                            k: v for k, v in plans.configurations.items() if k != searched})
                        log(f"search: {searched} (written by this study before) removed from plans.json")
            plans.save(ws.plans_path)
        if verdict.adopted:
            log(f"search: {verdict.summary()} -> {written} in {ws.plans_path}")
            publish_fold(ws, verdict.run(verdict.winner), searched, log=log)
        else:
            log(f"search: plans.json keeps the rule plan {configuration}; no {searched} written")
        if any(r.key == "rule" for r in verdict.runs):
            publish_fold(ws, verdict.run("rule"), configuration, log=log)
    elif best is not None and confirm == 0 and not full:
        with plans_lock(ws):
            plans = Plans.load(ws.plans_path)
            config = searched_configuration(plans, configuration, best.params, study_name=study.study_name,
                                            trial_number=best.number, value=float(best.value),
                                            trial_budget_s=per_trial, n_finished=counts["finished"],
                                            total_budget_s=attrs.get("total_budget_s"))
            plans.with_configuration(config).save(ws.plans_path)
        written = config.name
        log(f"search: best trial {best.number}, fold-0 Dice {best.value:.4f} -> {written} in {ws.plans_path} "
            "(UNCONFIRMED: --confirm 0; it was not compared with the rule plan at the full fold budget)")
    report = write_search_report(ws, configuration, study, storage_url=storage_url, confirmation=verdict)
    if (warning := fidelity_warning(study)) is not None:
        log(f"search: WARNING: {warning}")
    log(f"search: report {report}")
    return SearchResult(
        study_name=study.study_name, storage=redact_url(storage_url) if storage_url else "", counts=counts,
        best_trial=None if best is None else best.number, best_value=None if best is None else float(best.value),
        best_params={} if best is None else dict(best.params), searched_configuration=written,
        report_path=report, trial_budget_s=per_trial, fidelity=str(attrs.get("fidelity", "short")),
        confirmation=None if verdict is None or verdict.winner is None else verdict.summary(),
        adopted=None if verdict is None or verdict.winner is None else verdict.adopted,
    )
