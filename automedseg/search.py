"""Optuna refinement of a rule-based configuration: ``automedseg search`` (and ``plan --search N``).

The rule-based planner (:mod:`automedseg.planning`) picks one sensible configuration. The search tries
variants of it, each trained briefly on fold 0, and writes the best one into ``plans.json`` as a new
named configuration (``<configuration>_searched``) that ``automedseg train`` trains like any other.

What is searched (:func:`search_space`, derived from the rule-based configuration so the ranges suit any
dataset; the rule plan is always trial 0):

========================  ===========================================================================
``optimizer``             ``sgd`` (Nesterov, momentum 0.99) or ``adamw``
``lr_factor``             learning rate = factor x the optimizer's base rate (plan's rate for the plan's
                          optimizer, else SGD 1e-2 / AdamW 1e-3), log-uniform in [0.2, 5]
``batch_size``            batch size traded against patch size at constant memory: the patch volume
                          scales with ``rule batch / batch`` (clipped to the median image), so
                          ``batch x patch voxels`` and thus activation memory and FLOPs stay put
``base_features``         width of the first stage (half, rule, double); deeper stages double it
``depth_delta``           0, -1 or -2 resolution stages (the deepest ones are dropped)
``architecture``          ``plain_unet`` or ``residual_unet`` (residual encoder)
``aug_strength``          every augmentation probability multiplied by this factor (0 to 2, capped at 1)
``oversample_foreground`` fraction of each batch forced to contain foreground
``dice_fraction``         share of the Dice term in the loss (Dice + CE weights keep their sum)
========================  ===========================================================================

The training length is not a free parameter: for every variant it is fitted to the time it is given by
the planner's cost model (:func:`automedseg.planning.step_seconds`): a wider network or a bigger batch
gets fewer iterations in the same time, so the search compares what each variant reaches *in the
budget*. Trials train exactly ``TRIAL_EPOCHS`` epochs (the pruner's steps; ``fixed_epochs`` in the trial's
plan, so the trainer does not refit them) in their share of the budget (multi-fidelity: a fraction of a full
fold); the searched plan's schedule is fitted to the rule plan's full per-fold budget. Both schedules are the
planner's (:func:`automedseg.planning.schedule_for_budget`).

How a trial is judged: :func:`automedseg.training.train_fold` (the trainer of ``automedseg train``,
reading the same preprocessed cache) trains fold 0 of the variant; after every epoch the pseudo-Dice
(mean of the last ``SMOOTHING_EPOCHS`` epochs) is reported to Optuna, and a Hyperband (default) or
successive-halving pruner stops trials that lag; a pruned trial stops at once (no final validation).
The objective is the fold-0 sliding-window validation mean Dice (the best EMA pseudo-Dice when no
reference labels are available). Sampling is Optuna's TPE, seeded: every trial's random draws come
from ``(seed, trial number)``, so workers sharing a study do not repeat each other's random draws and a
resumed search does not repeat its first ones.

Budget: ``time_budget_s`` is the wall time of the whole search (one worker); each trial gets
``time_budget_s / n_trials`` (or ``trial_budget_s``), of which 85% is training and the rest start-up and
the final validation. Without either, a trial gets ``DEFAULT_FIDELITY`` of the rule plan's per-fold
budget. The first worker records the trial budget in the study; later workers use the study's.

Storage and resuming: by default an SQLite file ``<work>/search/search.db``; any Optuna RDB URL
(``postgresql://user:password@host/db``, ``mysql+pymysql://...``) lets workers on several machines
share one study. Trials report a heartbeat; a trial whose worker died (killed, machine lost) is marked
FAIL once its heartbeat is stale and re-queued with the same parameters; a trial stopped by Ctrl-C is
marked FAIL and re-queued the next time a worker starts. Each worker runs trials until the study holds
``n_trials`` finished (complete or pruned) trials, so running the same command again continues.

Several machines: copy the work folder (``plans.json``, ``splits.json``, ``preprocessed/``) to each,
then on each run the same command with the same ``--storage`` and ``--study-name``::

    automedseg search DATASET -c 3d_fullres --trials 40 --time-budget 8h \\
        --storage postgresql://user:pw@dbhost/optuna --study-name demo_3d

Outputs (``<work>/search/<study>/``): ``trial_<n>/`` (log.jsonl, progress.png, plans.json,
validation/summary.json of each trial; checkpoints are deleted), ``search_report.md``,
``search_history.png``, ``param_importances.png``; and ``plans.json`` gains ``<configuration>_searched``
(its ``notes`` record study, trial, value and budget). Inspect a study with Optuna's own tools, e.g.
``optuna trials --storage sqlite:///<work>/search/search.db --study-name <study>`` or
``optuna-dashboard sqlite:///<work>/search/search.db``.

Modules: this one runs the search (:func:`run_search`) and writes the searched plan; the space and the variants
are :mod:`automedseg.search_space`, the Optuna plumbing :mod:`automedseg.search_study`, one trial
:mod:`automedseg.search_trial`, the report :mod:`automedseg.search_report`. Their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automedseg.plans import ConfigurationPlan, Plans
from automedseg.search_report import write_search_report
from automedseg.search_space import (
    AUG_STRENGTH_RANGE,
    BASE_LR,
    BASE_WEIGHT_DECAY,
    DICE_FRACTION_RANGE,
    LR_FACTOR_RANGE,
    SEARCHED_SUFFIX,
    InfeasibleParams,
    SearchParam,
    apply_params,
    default_params,
    fit_schedule,
    search_space,
    summary_line,
)
from automedseg.search_study import (
    DEFAULT_HEARTBEAT_S,
    MAX_RETRY,
    PRUNERS,
    best_trial,
    default_storage_url,
    default_study_name,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
    plan_sha1,
    plans_lock,
    quiet_optuna,
    redact_url,
    retry_interrupted,
    trial_counts,
)
from automedseg.search_trial import SMOOTHING_EPOCHS, TRAIN_SHARE, run_trial
from automedseg.workspace import Workspace

Log = Callable[[str], None]

__all__ = [  # the public API, also what the split modules hold (re-exported for compatibility)
    "AUG_STRENGTH_RANGE", "BASE_LR", "BASE_WEIGHT_DECAY", "DEFAULT_FIDELITY", "DEFAULT_HEARTBEAT_S",
    "DICE_FRACTION_RANGE", "LR_FACTOR_RANGE", "MAX_CONSECUTIVE_FAILURES", "MAX_RETRY", "PRUNERS", "SEARCHED_SUFFIX",
    "SMOOTHING_EPOCHS", "TRAIN_SHARE", "TRIAL_EPOCHS", "InfeasibleParams", "SearchParam", "SearchResult",
    "apply_params", "best_trial", "default_params", "default_storage_url", "default_study_name", "finalize_search",
    "fit_schedule", "make_pruner", "make_sampler", "make_storage", "redact_url", "run_search", "search_space",
    "searched_configuration", "trial_budget", "trial_counts", "write_search_report",
]

TRIAL_EPOCHS = 20  # epochs of every trial: the pruner's resource axis (same for all variants)
DEFAULT_FIDELITY = 0.25  # trial budget as a fraction of the rule plan's fold budget when none is given
MAX_CONSECUTIVE_FAILURES = 3

# --- running the search ------------------------------------------------------------------------------


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


def trial_budget(base: ConfigurationPlan, *, n_trials: int, time_budget_s: float | None,
                 trial_budget_s: float | None) -> float:
    """Wall time of one trial: given, or the search budget over the trials, or a fraction of a fold."""
    if trial_budget_s is not None:
        return float(trial_budget_s)
    if time_budget_s is not None:
        return float(time_budget_s) / max(1, n_trials)
    fold = base.training.time_budget_s or base.training.estimated_fold_seconds
    if not fold:
        raise ValueError("no search budget: pass time_budget_s (--time-budget) or trial_budget_s (--trial-budget)")
    return DEFAULT_FIDELITY * float(fold)


def run_search(ws: Workspace, configuration: str, *, n_trials: int, time_budget_s: float | None = None,
               storage: str | None = None, study_name: str | None = None, seed: int = 12345,
               trial_budget_s: float | None = None, pruner: str = "hyperband", device: str | None = None,
               threads: int | None = None, heartbeat_interval_s: int = DEFAULT_HEARTBEAT_S, max_retry: int = MAX_RETRY,
               keep_trial_files: bool = False, trial_options: Mapping[str, Any] | None = None,
               log: Log = print) -> SearchResult:
    """Run (or continue, or join) an Optuna search around one configuration and write the searched plan.

    Every worker calls this with the same ``storage`` and ``study_name``; each runs trials until the
    study holds ``n_trials`` finished trials (or its ``time_budget_s`` is spent), then writes
    ``<configuration>_searched`` into its ``plans.json`` and the report.

    Args:
        ws: Work folder with plans.json and the preprocessed cache.
        configuration: The rule-based configuration to refine (e.g. ``3d_fullres``).
        n_trials: Finished (complete + pruned) trials the study should hold.
        time_budget_s: Wall time of this worker's search; also sets the trial budget (divided by ``n_trials``).
        storage: Optuna RDB URL (default :func:`default_storage_url`).
        study_name: Default :func:`default_study_name`.
        seed: Sampler seed.
        trial_budget_s: Wall time of one trial (overrides the division above).
        pruner: ``hyperband``, ``sha`` or ``none``.
        device: Training device (``cpu``, ``cuda``, ``mps``; default what exists).
        threads: Torch CPU threads per trial.
        heartbeat_interval_s: Trial heartbeat; a trial silent for 3 intervals counts as dead.
        max_retry: How often a dead or interrupted trial is re-queued.
        keep_trial_files: Keep checkpoints and validation probabilities of every trial.
        trial_options: Tests and experts: ``epochs``, ``iterations_per_epoch`` and ``val_iterations``
            set the trial schedule; other keys are :class:`~automedseg.training.TrainOptions` fields.
        log: Where messages go.
    """
    import optuna

    plans = Plans.load(ws.plans_path)
    if configuration.endswith(SEARCHED_SUFFIX):
        raise ValueError(f"{configuration!r} is already a searched configuration; search its rule-based origin")
    base = plans.configuration(configuration)
    if n_trials < 0:
        raise ValueError("n_trials must be at least 0")
    study_name = study_name or default_study_name(plans, configuration)
    url = storage or default_storage_url(ws)
    opts = dict(trial_options or {})
    sched = {k: opts.pop(k) for k in ("epochs", "iterations_per_epoch", "val_iterations") if k in opts}
    from automedseg.training import TrainOptions

    unknown = sorted(set(opts) - {f.name for f in dataclasses.fields(TrainOptions)})
    if unknown:
        raise ValueError(f"trial_options: unknown TrainOptions field(s) {unknown}")
    storage_obj = make_storage(url, heartbeat_interval_s=heartbeat_interval_s, max_retry=max_retry)
    with quiet_optuna():
        study = open_study(storage_obj, study_name)
    attrs = dict(study.user_attrs)
    if attrs.get("configuration", configuration) != configuration:
        raise ValueError(f"study {study_name!r} searches {attrs['configuration']!r}, not {configuration!r}; "
                         "pass another --study-name")
    wanted = {
        "configuration": configuration,
        "trial_budget_s": trial_budget(base, n_trials=n_trials, time_budget_s=time_budget_s,
                                       trial_budget_s=trial_budget_s),
        "trial_epochs": int(sched.get("epochs", TRIAL_EPOCHS)),
        "pruner": pruner,
        "seed": int(seed),
        "n_trials": int(n_trials),
        "total_budget_s": time_budget_s,
        "rule_plan_sha1": plan_sha1(base),
        "rule_defaults": default_params(base),
    }
    for key, value in wanted.items():
        if key not in attrs:
            study.set_user_attr(key, value)
            attrs[key] = value
        elif key in ("trial_budget_s", "trial_epochs", "pruner") and attrs[key] != value:
            log(f"search: the study's {key} is {attrs[key]} (set by its first worker); using it, not {value}")
    if attrs["rule_plan_sha1"] != wanted["rule_plan_sha1"]:
        log(f"search: warning: {configuration} in {ws.plans_path} differs from the plan the study started with")
    per_trial = float(attrs["trial_budget_s"])
    epochs = int(attrs["trial_epochs"])
    study.pruner = make_pruner(str(attrs["pruner"]), trial_epochs=epochs)
    study.sampler = make_sampler(int(attrs["seed"]), n_trials=int(attrs["n_trials"]))
    out_root = ws.root / "search" / study_name
    out_root.mkdir(parents=True, exist_ok=True)
    space = search_space(base)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    log(f"search: study {study_name!r} in {redact_url(url)}; {configuration}, {n_trials} trials of "
        f"~{per_trial / 60:.1f} min ({epochs} epochs each), pruner {attrs['pruner']}, worker {worker}")

    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(default_params(base), user_attrs={"rule_defaults": True}, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        return run_trial(trial, ws=ws, plans=plans, base=base, space=space, budget_s=per_trial, epochs=epochs,
                          sched=sched, opts=opts, device=device, threads=threads, out_root=out_root,
                          keep_files=keep_trial_files, worker=worker, log=log)

    t0 = time.monotonic()
    failures = 0
    while True:
        with quiet_optuna():
            optuna.storages.fail_stale_trials(study)
            retried = retry_interrupted(study, max_retry)
        if retried:
            log(f"search: re-queued {retried} interrupted trial(s)")
        c = trial_counts(study)
        if c["finished"] >= n_trials:
            break
        if time_budget_s is not None and time.monotonic() - t0 + 0.5 * per_trial > time_budget_s:
            log(f"search: time budget spent after {(time.monotonic() - t0) / 60:.1f} min")
            break
        if c["waiting"] == 0 and c["finished"] + c["running"] >= n_trials:
            # The last trials run elsewhere; wait in case their worker dies and they come back re-queued.
            time.sleep(max(1.0, min(float(heartbeat_interval_s), 10.0)))
            continue
        n_before = {t.number for t in study.get_trials(deepcopy=False)}
        with quiet_optuna():
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        mine = [t for t in study.get_trials(deepcopy=False) if t.number not in n_before
                and t.user_attrs.get("worker") == worker]
        if mine and mine[-1].state.name == "FAIL":
            failures += 1
            log(f"search: trial {mine[-1].number} failed: {mine[-1].user_attrs.get('error', '?')}")
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise RuntimeError(f"{failures} trials in a row failed; last error: "
                                   f"{mine[-1].user_attrs.get('error', '?')}")
        elif mine:
            failures = 0
    return finalize_search(ws, configuration, study, storage_url=url, log=log)



# --- the result: searched plan and report ---------------------------------------------------------------


def searched_configuration(plans: Plans, configuration: str, params: Mapping[str, Any], *, study_name: str,
                           trial_number: int, value: float, trial_budget_s: float, n_finished: int,
                           total_budget_s: float | None = None) -> ConfigurationPlan:
    """The best parameters merged into ``<configuration>_searched``, scheduled for a full fold, with provenance.

    The full-fold schedule uses the rule plan's per-fold budget (``training.time_budget_s``); without one
    (GPU plans) the rule plan's epochs and iterations are kept.
    """
    base = plans.configuration(configuration)
    name = configuration + SEARCHED_SUFFIX
    variant = apply_params(plans, base, params, name=name)
    variant = fit_schedule(plans, variant, base.training.time_budget_s)
    notes = (
        f"derived from the rule-based {configuration!r} by automedseg search",
        f"searched: study={study_name}, trial={trial_number}, value={value:.4f}, budget_s={trial_budget_s:.0f} "
        f"per trial, trials={n_finished}" + (f", total_budget_s={total_budget_s:.0f}" if total_budget_s else ""),
        "search params: " + json.dumps(dict(params), sort_keys=True, default=str),
        summary_line(variant, plans.device.name),
    )
    return dataclasses.replace(variant, notes=notes)


def finalize_search(ws: Workspace, configuration: str, study: Any, *, storage_url: str = "", log: Log = print
                    ) -> SearchResult:
    """Write ``<configuration>_searched`` (best trial so far) into plans.json and the report; safe to repeat."""
    attrs = study.user_attrs
    per_trial = float(attrs.get("trial_budget_s", 0.0))
    counts = trial_counts(study)
    best = best_trial(study)
    written = None
    if best is not None:
        with plans_lock(ws):
            plans = Plans.load(ws.plans_path)
            config = searched_configuration(plans, configuration, best.params, study_name=study.study_name,
                                            trial_number=best.number, value=float(best.value),
                                            trial_budget_s=per_trial, n_finished=counts["finished"],
                                            total_budget_s=attrs.get("total_budget_s"))
            plans.with_configuration(config).save(ws.plans_path)
        written = config.name
        log(f"search: best trial {best.number}, fold-0 Dice {best.value:.4f} -> {written} in {ws.plans_path}")
    else:
        log("search: no trial completed yet; plans.json unchanged")
    report = write_search_report(ws, configuration, study, storage_url=storage_url)
    log(f"search: report {report}")
    return SearchResult(
        study_name=study.study_name, storage=redact_url(storage_url) if storage_url else "", counts=counts,
        best_trial=None if best is None else best.number, best_value=None if best is None else float(best.value),
        best_params={} if best is None else dict(best.params), searched_configuration=written,
        report_path=report, trial_budget_s=per_trial,
    )

