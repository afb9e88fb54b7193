"""Confirmation before adoption: the search's best candidates against the rule plan at the full fold budget.

Short trials rank variants by what they reach in a fraction of a fold, which favours fast starters (on
Hippocampus the best 5-minute trial, trained for the full 20-minute fold, scored 0.8742 against the rule
plan's 0.8794). So the search ends by training its best ``n`` candidates (complete trials other than the rule
plan, best first) and the rule plan on fold 0 at the full fold budget, exactly as ``automedseg train`` would
train them, and compares their fold-0 validation mean Dice (``validation/summary.json``). The searched
configuration is adopted only when a candidate beats the rule plan: never worse by design.

"Beats" is judged on the held-out cases, not on the mean alone: a paired bootstrap over the fold's validation
cases (:func:`paired_bootstrap`, both runs scored on the same cases) gives the probability that the candidate's
mean Dice is the higher one, and a candidate with a higher mean is adopted only when that probability reaches
:data:`MIN_PROBABILITY` (a one-sided 90 % level: a +0.0035 win on 6 ISBI images, or one lucky case of five, is
not a win). Runs without per-case figures (older confirmation files) are compared on the mean alone.

What is re-used instead of trained:

* the rule plan's own fold 0 (``<work>/<configuration>/fold_0``) when it is trained and validated with the same
  model and the same budget (or, without a budget, the same schedule);
* in a study of full-budget trials (``fidelity`` ``full``), the trials themselves: each already is a fold-0
  training of its variant at the full fold budget, so the comparison costs nothing.

State: ``<work>/search/<study>/confirmation.json`` (:class:`Confirmation`, written atomically after every run),
the runs in ``<work>/search/<study>/confirm/<key>/``. A confirmation killed part-way continues where it stopped
when the search command runs again: finished runs are kept (while their plan is the same), the interrupted one
resumes from its last checkpoint. One worker confirms at a time (a lock on the ``confirm`` folder); another
worker that finds it held leaves the result to that one.

The winning run's fold is then copied to the work folder's fold 0 of its configuration
(``<configuration>_searched/fold_0`` or ``<configuration>/fold_0``) when that fold does not exist yet, so
``automedseg train`` does not train it again.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automedseg.artifacts import read_artifact, write_artifact
from automedseg.atomic import fsync_path
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.search_space import SEARCHED_SUFFIX
from automedseg.search_study import plan_sha1
from automedseg.search_trial import ensure_cache, full_fold_variant
from automedseg.workspace import Workspace

Log = Callable[[str], None]

CONFIRM_FILE = "confirmation.json"
DEFAULT_CONFIRM = 2
RULE = "rule"
#: Bootstrap probability a candidate must reach to be adopted (a one-sided 90 % level; a choice, not a measurement).
MIN_PROBABILITY = 0.9
#: Bootstrap resamples of the validation cases (the probability's standard error is at most 0.5 / sqrt(n) = 0.011).
BOOTSTRAP_RESAMPLES = 2000

CaseDice = dict[str, dict[str, float | None]]  # case -> foreground label -> Dice


@dataclass(frozen=True)
class ConfirmRun:
    """One fold-0 training at the full fold budget.

    Attributes:
        key: ``rule`` or ``trial_<n>``.
        trial: The trial's number (``None``: the rule plan).
        params: The trial's parameters (empty for the rule plan).
        plan_sha1: Fingerprint of the configuration (with schedule overrides) trained; a run whose plan changed
            is trained again.
        fold_dir: Where the fold is trained (or was found).
        state: ``pending`` (not finished) or ``done``.
        mean_dice: Fold-0 validation mean Dice (``done`` runs).
        source: ``trained`` by the confirmation, ``reused`` (the rule plan's own fold 0) or ``trial`` (a
            full-budget trial of the study).
        case_dice: Per validation case, each foreground label's Dice (empty: not known), for the paired
            bootstrap of the verdict.
    """

    key: str
    trial: int | None
    params: dict[str, Any]
    plan_sha1: str
    fold_dir: str
    state: str = "pending"
    mean_dice: float | None = None
    source: str = "trained"
    case_dice: CaseDice = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Confirmation:
    """``confirmation.json``: the runs and, once they are done, the verdict.

    Attributes:
        study: Optuna study name.
        configuration: The rule-based configuration.
        runs: The rule plan's run first, then the candidates, best trial first.
        winner: ``rule`` or the winning candidate's key (``None`` while runs are pending).
        margin: Best candidate's Dice minus the rule plan's (negative: the rule plan won; ``None``: no candidate).
        probability: Paired-bootstrap probability that the best candidate's mean Dice beats the rule plan's on
            the validation cases (``None``: no per-case figures; the mean alone decided).
        n_cases: Validation cases both runs scored (the bootstrap's sample).
        min_probability: The probability a candidate had to reach to be adopted.
    """

    study: str
    configuration: str
    runs: tuple[ConfirmRun, ...] = ()
    winner: str | None = None
    margin: float | None = None
    probability: float | None = None
    n_cases: int = 0
    min_probability: float = MIN_PROBABILITY

    @property
    def adopted(self) -> bool:
        """A candidate beat the rule plan."""
        return self.winner is not None and self.winner != RULE

    def run(self, key: str) -> ConfirmRun:
        """The run with this key."""
        return next(r for r in self.runs if r.key == key)

    def summary(self) -> str:
        """One line: who won and by how much."""
        candidates = [r for r in self.runs if r.key != RULE]
        if self.winner is None:
            return "confirmation not finished"
        if not candidates:
            return "the rule plan is kept: no searched candidate differs from it"
        rule = self.run(RULE).mean_dice
        best = self.run(self.winner) if self.adopted else max(candidates, key=lambda r: _score(r.mean_dice))
        by = "" if self.margin is None else f" ({self.margin:+.4f}"
        if by and self.probability is not None:
            by += f", P(better) {self.probability:.2f} over {self.n_cases} cases"
        by += ")" if by else ""
        if self.adopted:
            return (f"{best.key} beat the rule plan on fold 0 at the full fold budget: mean Dice "
                    f"{_fmt(best.mean_dice)} vs {_fmt(rule)}{by}")
        if self.margin is not None and self.margin > 0:  # higher mean, but not by more than the cases' noise
            return (f"the rule plan is kept: the best searched candidate ({best.key}) scored mean Dice "
                    f"{_fmt(best.mean_dice)} vs {_fmt(rule)} on fold 0 at the full fold budget{by}, below the "
                    f"{self.min_probability:.2f} a win needs")
        return (f"the rule plan won on fold 0 at the full fold budget: mean Dice {_fmt(rule)} vs "
                f"{_fmt(best.mean_dice)} for the best searched candidate ({best.key}){by}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _score(v: float | None) -> float:
    return v if v is not None and math.isfinite(v) else -math.inf


def confirmation_path(ws: Workspace, study_name: str) -> Path:
    """``<work>/search/<study>/confirmation.json``."""
    return ws.root / "search" / study_name / CONFIRM_FILE


def read_confirmation(path: Path) -> Confirmation:
    """Read ``confirmation.json`` (errors name the file and the field)."""
    return read_artifact(Confirmation, path)


def candidate_trials(study: Any, plans: Plans, base: ConfigurationPlan, n: int) -> list[Any]:
    """The ``n`` best complete trials whose full-fold plan differs from the rule plan's (and each other's)."""
    from optuna.trial import TrialState

    from automedseg.search_space import InfeasibleParams

    rule = _model(full_fold_variant(plans, base, {}, name=base.name))
    seen = {rule}
    out = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for t in sorted(complete, key=lambda t: (-t.value, t.number)):
        try:
            key = _model(full_fold_variant(plans, base, t.params, name=base.name))
        except InfeasibleParams:
            continue
        if key not in seen and len(out) < n:
            seen.add(key)
            out.append(t)
    return out


def _model(config: ConfigurationPlan) -> str:
    return plan_sha1(dataclasses.replace(config, notes=()))


def _rule_trial(study: Any, plans: Plans, base: ConfigurationPlan) -> Any | None:
    """The complete trial that trained the rule plan (trial 0 unless it failed and was retried)."""
    from optuna.trial import TrialState

    from automedseg.search_space import InfeasibleParams

    rule = _model(full_fold_variant(plans, base, {}, name=base.name))
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        try:
            if _model(full_fold_variant(plans, base, t.params, name=base.name)) == rule:
                return t
        except InfeasibleParams:
            continue
    return None


def _same_schedule(trained: ConfigurationPlan, wanted: ConfigurationPlan) -> bool:
    """A fold trained with ``trained`` had the budget (or, without one, the schedule) ``wanted`` asks for."""
    a, b = trained.training, wanted.training
    if b.time_budget_s is not None:
        return a.time_budget_s is not None and abs(a.time_budget_s - b.time_budget_s) <= 0.01 * b.time_budget_s
    return a.time_budget_s is None and (a.epochs, a.iterations_per_epoch) == (b.epochs, b.iterations_per_epoch)


def reusable_rule_fold(ws: Workspace, plans: Plans, wanted: ConfigurationPlan) -> float | None:
    """Fold-0 validation mean Dice of the rule plan's own fold 0 when it can stand for the confirmation run.

    It must be finished (``checkpoint_final.pt``), validated, trained with the same model (the fields of
    :data:`automedseg.trained.MODEL_FIELDS`) and the same budget.
    """
    from automedseg.errors import InputError
    from automedseg.trained import model_difference
    from automedseg.validation_summary import read_validation_summary, summary_path

    fold_dir = ws.fold_dir(wanted.name, 0)
    copy_path = fold_dir / "plans.json"
    if not (fold_dir / "checkpoint_final.pt").is_file() or not copy_path.is_file():
        return None
    try:
        copy = Plans.load(copy_path)
        trained = copy.configurations.get(wanted.name) or next(iter(copy.configurations.values()))
        summary = read_validation_summary(summary_path(fold_dir))
    except (FileNotFoundError, InputError, StopIteration):
        return None
    if model_difference(copy, trained, plans, wanted) is not None or not _same_schedule(trained, wanted):
        return None
    return summary.mean_dice


def case_dice(fold_dir: Path) -> CaseDice:
    """Per validation case of a fold, each foreground label's Dice (empty: the fold has no readable summary)."""
    from automedseg.errors import InputError
    from automedseg.validation_summary import read_validation_summary, summary_path

    try:
        return read_validation_summary(summary_path(fold_dir)).dice_by_case()
    except (FileNotFoundError, InputError):
        return {}


def paired_bootstrap(rule: CaseDice, candidate: CaseDice, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> tuple[float | None, int]:
    """Probability that ``candidate``'s mean Dice beats ``rule``'s, resampling the cases both scored.

    Each resample draws the shared cases with replacement (the same draw for both runs) and computes each run's
    mean Dice as the validation does (per-label mean over the cases, NaN left out, then the mean over labels).

    Returns:
        ``(probability, n_cases)``; the probability is ``None`` with fewer than 2 shared cases.

    Example:
        >>> rule = {c: {"1": 0.80} for c in "abcdef"}
        >>> steady = {c: {"1": 0.81} for c in "abcdef"}
        >>> one_lucky = {**rule, "a": {"1": 0.86}}  # same mean gain (+0.01), from one case
        >>> paired_bootstrap(rule, steady), paired_bootstrap(rule, one_lucky)[0] < 0.9
        ((1.0, 6), True)
    """
    import warnings

    import numpy as np

    cases = sorted(set(rule) & set(candidate))
    if len(cases) < 2:
        return None, len(cases)
    labels = sorted({label for c in cases for label in (*rule[c], *candidate[c])})

    def matrix(d: CaseDice) -> np.ndarray:
        return np.array([[np.nan if d[c].get(k) is None else d[c][k] for k in labels] for c in cases], float)

    a, b = matrix(rule), matrix(candidate)
    if not (np.isfinite(a).any() and np.isfinite(b).any()):  # a run that scored nothing: the means decide
        return None, len(cases)
    rng = np.random.default_rng(seed)
    better = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label without a value in a resample: NaN, left out
        for start in range(0, resamples, 100):  # in chunks: cases x labels x resamples can be large
            idx = rng.integers(0, len(cases), size=(min(100, resamples - start), len(cases)))
            diff = (np.nanmean(np.nanmean(b[idx], axis=1), axis=1)
                    - np.nanmean(np.nanmean(a[idx], axis=1), axis=1))
            better += int(np.sum(np.nan_to_num(diff, nan=0.0) > 0))
    return better / resamples, len(cases)


def _train(ws: Workspace, plans: Plans, config: ConfigurationPlan, out: Path, options: Mapping[str, Any],
           log: Log) -> float | None:
    """Train (or resume) fold 0 of ``config`` into ``out``; its validation mean Dice."""
    from automedseg import training
    from automedseg.training import TrainOptions

    opts = TrainOptions(**{"progress": False, "validate": True, **options, "output_dir": out, "restart": False})
    result = training.train_fold(ws, config.name, 0, plans=plans.with_configuration(config), options=opts, log=log)
    value = (result.validation or {}).get("mean_dice")
    return float(value) if value is not None and math.isfinite(value) else None


def confirm_candidates(ws: Workspace, configuration: str, study: Any, *, n: int, dataset: Path | None = None,
                       full_budget: bool = False, options: Mapping[str, Any] | None = None,
                       log: Log = print) -> Confirmation:
    """Train (or re-use) the rule plan and the ``n`` best candidates at the full fold budget; return the verdict.

    Args:
        ws: Work folder.
        configuration: The rule-based configuration searched.
        study: The Optuna study.
        n: Candidates to confirm (at least 1).
        dataset: Dataset folder, for a candidate with its own preprocessed cache.
        full_budget: The study's trials are full-budget fold-0 trainings: their values are re-used.
        options: :class:`~automedseg.training.TrainOptions` fields for the confirmation trainings (device,
            threads; tests: ``epochs``, ``iterations_per_epoch``).
        log: Where messages go.

    Raises:
        LockedError: Another worker is confirming this study.
    """
    from automedseg.locks import folder_lock

    options = dict(options or {})
    plans = Plans.load(ws.plans_path)
    base = plans.configuration(configuration)
    root = ws.root / "search" / study.study_name
    path = root / CONFIRM_FILE
    with folder_lock(root / "confirm", purpose=f"search: confirm {study.study_name}", name=".confirm.lock"):
        previous = {r.key: r for r in (read_confirmation(path).runs if path.is_file() else ())}
        wanted = _wanted_runs(ws, plans, base, study, n, options, full_budget)
        runs: list[ConfirmRun] = []
        for run, _ in wanted:
            old = previous.get(run.key)
            if old is not None and old.plan_sha1 == run.plan_sha1 and old.source == run.source:
                run = dataclasses.replace(run, state=old.state, mean_dice=old.mean_dice, fold_dir=old.fold_dir,
                                          case_dice=old.case_dice)
            elif run.source == "trained":  # a run of another plan (or none): start it afresh
                shutil.rmtree(run.fold_dir, ignore_errors=True)
            if run.state == "done" and not run.case_dice:  # re-used folds (and files written before the bootstrap)
                run = dataclasses.replace(run, case_dice=case_dice(Path(run.fold_dir)))
            runs.append(run)
        state = Confirmation(study.study_name, configuration, tuple(runs))
        write_artifact(path, state)
        # Without a candidate there is nothing to compare: the rule plan stays, nothing is trained.
        todo = [(i, c) for i, (r, (_, c)) in enumerate(zip(runs, wanted)) if r.state != "done"] if len(runs) > 1 else []
        if todo:
            log(f"search: confirming {len(runs) - 1} candidate(s) against the rule plan on fold 0 at the full fold "
                f"budget: {len(todo)} fold(s) to train (~{sum(_fold_minutes(c) for _, c in todo):.0f} min)")
        for i, config in todo:
            run = runs[i]
            rlog: Log = lambda m, k=run.key: log(f"[confirm {k}] {m}")  # noqa: E731
            ensure_cache(ws, plans, config, dataset, rlog)
            value = _train(ws, plans, config, Path(run.fold_dir), options, rlog)
            runs[i] = dataclasses.replace(run, state="done", mean_dice=value, case_dice=case_dice(Path(run.fold_dir)))
            state = dataclasses.replace(state, runs=tuple(runs))
            write_artifact(path, state)
            rlog(f"fold-0 validation mean Dice {_fmt(value)}")
        state = verdict(state)
        write_artifact(path, state)
    log(f"search: {state.summary()}")
    return state


def _fold_minutes(config: ConfigurationPlan) -> float:
    tr = config.training
    return (tr.time_budget_s or tr.estimated_fold_seconds or 0.0) / 60


def _wanted_runs(ws: Workspace, plans: Plans, base: ConfigurationPlan, study: Any, n: int,
                 options: Mapping[str, Any], full_budget: bool) -> list[tuple[ConfirmRun, ConfigurationPlan]]:
    """The rule run and the candidate runs, each with the configuration it trains (or trained)."""
    from automedseg.training_options import TrainOptions, apply_overrides

    overrides = TrainOptions(**{k: v for k, v in options.items() if k in ("epochs", "iterations_per_epoch",
                                                                           "time_budget_s", "num_workers")})
    confirm_dir = ws.root / "search" / study.study_name / "confirm"

    def run_for(key: str, trial: Any, config: ConfigurationPlan) -> tuple[ConfirmRun, ConfigurationPlan]:
        sha = plan_sha1(dataclasses.replace(apply_overrides(config, overrides), notes=()))
        params = {} if trial is None else dict(trial.params)
        number = None if trial is None else trial.number
        if full_budget and trial is not None:
            value = trial.user_attrs.get("validation_mean_dice")
            value = trial.value if value is None else value  # no reference labels: the trial's own objective
            return ConfirmRun(key, number, params, sha, str(ws.root / "search" / study.study_name /
                                                               f"trial_{trial.number}"), "done", value, "trial"), config
        if trial is None:
            reused = reusable_rule_fold(ws, plans, apply_overrides(config, overrides))
            if reused is not None:
                return ConfirmRun(key, None, {}, sha, str(ws.fold_dir(config.name, 0)), "done", reused,
                                  "reused"), config
        return ConfirmRun(key, number, params, sha, str(confirm_dir / key)), config

    searched = base.name + SEARCHED_SUFFIX
    # In a study of full-budget trials the rule plan's trial stands for its run (when it completed).
    out = [run_for(RULE, _rule_trial(study, plans, base) if full_budget else None, base)]
    for t in candidate_trials(study, plans, base, n):
        out.append(run_for(f"trial_{t.number}", t, full_fold_variant(plans, base, t.params, name=searched)))
    return out


def verdict(state: Confirmation, *, min_probability: float = MIN_PROBABILITY) -> Confirmation:
    """``state`` with its winner once every run is done, else without one.

    The best candidate wins only when its mean Dice is higher than the rule plan's (a tie keeps the rule plan)
    and, where both runs have per-case figures, the paired bootstrap gives it at least ``min_probability``.
    """
    state = dataclasses.replace(state, min_probability=min_probability, probability=None, n_cases=0)
    if any(r.state != "done" for r in state.runs):
        return dataclasses.replace(state, winner=None, margin=None)
    candidates = [r for r in state.runs if r.key != RULE]
    if not candidates:
        return dataclasses.replace(state, winner=RULE, margin=None)
    rule_run = state.run(RULE)
    rule = _score(rule_run.mean_dice)
    best = max(candidates, key=lambda r: (_score(r.mean_dice), -(r.trial or 0)))
    margin = _score(best.mean_dice) - rule if math.isfinite(rule) else math.nan
    probability, n_cases = paired_bootstrap(rule_run.case_dice, best.case_dice)
    wins = _score(best.mean_dice) > rule and (probability is None or probability >= min_probability)
    return dataclasses.replace(state, winner=best.key if wins else RULE,
                               margin=float(margin) if math.isfinite(margin) else None,
                               probability=probability, n_cases=n_cases)


def publish_fold(ws: Workspace, run: ConfirmRun, configuration: str, *, log: Log = print) -> Path | None:
    """Copy a confirmation run's fold to ``<work>/<configuration>/fold_0`` when that fold does not exist yet.

    The copy is made under a temporary name beside the confirmation runs and renamed into place, so the work
    folder never holds half a fold. Returns the new fold folder, or ``None`` when nothing was copied.
    """
    src = Path(run.fold_dir)
    target = ws.fold_dir(configuration, 0)
    if run.source != "trained" or not (src / "checkpoint_final.pt").is_file():
        return None
    if target.exists() and any(p.name != ".automedseg.lock" for p in target.iterdir()):
        return None
    tmp = src.parent / f".publish-{run.key}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".automedseg.lock", ".tmp-*"))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    fsync_path(target.parent)
    log(f"search: {src} -> {target} (fold 0 of {configuration} is trained)")
    return target


def rule_kept_note(study_name: str, state: Confirmation) -> str:
    """The note the rule configuration gets in plans.json when it won the confirmation."""
    return f"search {study_name}: {state.summary()}; {state.configuration}{SEARCHED_SUFFIX} not adopted"


def with_note(config: ConfigurationPlan, note: str, *, replace_prefix: str) -> ConfigurationPlan:
    """``config`` with ``note`` before its last note (the summary line stays last), replacing older ones."""
    notes = [n for n in config.notes if not n.startswith(replace_prefix)]
    notes[max(0, len(notes) - 1):max(0, len(notes) - 1)] = [note]
    return dataclasses.replace(config, notes=tuple(notes))


def runs_table(state: Confirmation) -> Sequence[str]:
    """Markdown lines for the report."""
    lines = ["| run | trial | source | fold-0 mean Dice |", "|---|---|---|---|"]
    for r in state.runs:
        lines.append(f"| {r.key} | {'-' if r.trial is None else r.trial} | {r.source} | {_fmt(r.mean_dice)} |")
    return lines
