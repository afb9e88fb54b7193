"""Optuna refinement of a rule-based configuration: ``automedseg search`` (and ``plan --search N``).

The rule-based planner (:mod:`automedseg.planning`) picks one sensible configuration. The search tries
variants of it, each trained on fold 0, confirms the best against the rule plan at the full fold budget, and
writes a winner into ``plans.json`` as a new named configuration (``<configuration>_searched``) that
``automedseg train`` trains like any other; when no candidate beats the rule plan, nothing is adopted and the
rule configuration's notes say by how much it won.

What is searched (:func:`search_space`, derived from the rule-based configuration so the ranges suit any
dataset; parameters with a single option are left out; the rule plan is always trial 0):

========================  ===========================================================================
``optimizer``             ``sgd`` (Nesterov, momentum 0.99) or ``adamw``
``lr_factor``             learning rate = factor x the optimizer's base rate (plan's rate for the plan's
                          optimizer, else SGD 1e-2 / AdamW 1e-3), log-uniform in [0.2, 5]
``batch_size``            batch size traded against patch size at constant memory: the patch volume
                          scales with ``rule batch / batch`` (clipped to the median image), so
                          ``batch x patch voxels`` and thus activation memory and FLOPs stay put
``base_features``         width of the first stage (half, rule, double); deeper stages double it
``depth_delta``           0, -1 or -2 resolution stages (the deepest ones are dropped)
``architecture``          a family of :data:`automedseg.plans.ARCHITECTURES`: ``plain_unet``,
                          ``residual_unet`` (residual encoder), ``attention_unet``, ``aspp_unet``,
                          ``segnet_unet`` (see :mod:`automedseg.network`)
``aug_strength``          every augmentation probability multiplied by this factor (0 to 2, capped at 1)
``oversample_foreground`` fraction of each batch forced to contain foreground
``dice_fraction``         share of the Dice term in the loss (Dice + CE weights keep their sum)
``context``               context vs capacity: patch volume x 0.5, 1 or 2 (2 only where the patch is
                          smaller than the median image), the width chosen so that the planner's cost
                          model gives about the same step time
``mirror_axis_<a>``       mirroring on or off along each of the rule plan's mirror axes; an axis the
                          planner left out (it would swap lateralised labels, see :mod:`automedseg.lateral`)
                          is never offered
``normalization``         the rule's scheme or per-image z-score, for CT and RGB channels (the variant
                          gets its own preprocessed cache, made on first use; needs the dataset folder)
========================  ===========================================================================

Fidelity (:func:`choose_fidelity`, recorded in the study's ``fidelity`` and ``fidelity_note`` attributes and the
report). *Short* (multi-fidelity, the default on CPUs): each trial trains exactly ``TRIAL_EPOCHS`` epochs (the
pruner's steps; ``fixed_epochs`` in the trial's plan, so the trainer's budget refit does not change them) in
its share of the search budget, after every epoch the pseudo-Dice (mean of the last ``SMOOTHING_EPOCHS``
epochs) is reported to Optuna, and a Hyperband (default) or successive-halving pruner stops trials that lag (a
pruned trial stops at once, no final validation). *Full*: when ``n_trials`` full folds fit the search budget
(or the trial budget given is a whole fold), as on a GPU, each trial trains fold 0 exactly as a fold of its
variant would be trained (the rule plan's per-fold budget, the trainer's refit), without pruning.
*Continuation* (only when asked, ``--fidelity continuation``; :mod:`automedseg.search_rungs`): successive halving
whose trials train at a constant learning rate with a cool-down before each rung, and a promoted trial resumes
from its checkpoint before that cool-down instead of starting again. The training
length is not a free parameter: it is fitted to the time given by the planner's cost model
(:func:`automedseg.planning.step_seconds`), so the search compares what each variant reaches *in the budget*.

How a trial is judged: :func:`automedseg.training.train_fold` (the trainer of ``automedseg train``, reading the
same preprocessed cache) trains fold 0 of the variant; the objective is the fold-0 sliding-window validation
mean Dice (the best EMA pseudo-Dice when no reference labels are available). Sampling is Optuna's TPE, seeded:
every trial's random draws come from ``(seed, trial number)``, so workers sharing a study do not repeat each
other's random draws and a resumed search does not repeat its first ones.

Confirmation before adoption (:mod:`automedseg.search_confirm`, ``--confirm N``, default 2): short trials
reward fast starters, so the best ``N`` candidates and the rule plan are trained on fold 0 at the full fold
budget (the rule plan's own fold 0 is re-used when trained alike; in a study of full-budget trials the trials
are the confirmation and nothing more is trained) and ``<configuration>_searched`` is written only if a
candidate's fold-0 validation mean Dice beats the rule plan's. The confirmation is resumable (its state file is
written atomically after every run; a killed run resumes from its checkpoint). ``--confirm 0`` adopts the best
trial without it, and its notes say that it is unconfirmed.

Budget: ``time_budget_s`` is the wall time of this worker's trials (the confirmation comes on top: ``N + 1``
full folds at most); each trial gets ``time_budget_s / n_trials`` (or ``trial_budget_s``), of which 85% is
training and the rest start-up and the final validation. Without either, a trial gets ``DEFAULT_FIDELITY`` of
the rule plan's per-fold budget. The first worker records the trial budget in the study; later workers use it.

Storage and resuming: by default an SQLite file ``<work>/search/search.db``; any Optuna RDB URL
(``postgresql://user:password@host/db``, ``mysql+pymysql://...``) lets workers on several machines
share one study. Trials report a heartbeat; a trial whose worker died (killed, machine lost) is marked
FAIL once its heartbeat is stale (or, killed before its first heartbeat, once the same grace has passed:
:func:`~automedseg.search_study.fail_orphaned_trials`) and re-queued with the same parameters; a trial stopped
by Ctrl-C is
marked FAIL and re-queued the next time a worker starts. Each worker runs trials until the study holds
``n_trials`` finished (complete or pruned) trials, so running the same command again continues.

Several machines: copy the work folder (``plans.json``, ``splits.json``, ``preprocessed/``) to each,
then on each run the same command with the same ``--storage`` and ``--study-name``; one worker per machine
confirms (the others find its lock and leave the result to it), so give the others ``--confirm 0`` or let
only one machine's work folder be the one that counts::

    automedseg search DATASET -c 3d_fullres --trials 40 --time-budget 8h \\
        --storage postgresql://user:pw@dbhost/optuna --study-name demo_3d

Outputs (``<work>/search/<study>/``): ``trial_<n>/`` (log.jsonl, progress.png, plans.json,
validation/summary.json of each trial; checkpoints are deleted), ``confirmation.json`` and ``confirm/<run>/``
(the confirmation's fold-0 runs; the winner's is copied to ``<work>/<configuration>_searched/fold_0``, the rule
plan's to ``<work>/<configuration>/fold_0``, where those do not exist yet), ``search_report.md``,
``search_history.png``, ``param_importances.png``; and ``plans.json`` gains ``<configuration>_searched`` (its
``notes`` record study, trial, value, budget and the confirmation) or a note on the rule configuration. Inspect
a study with Optuna's own tools, e.g. ``optuna trials --storage sqlite:///<work>/search/search.db --study-name
<study>`` or ``optuna-dashboard sqlite:///<work>/search/search.db``.

Modules: this one runs the search (:func:`run_search`); the space and the variants are
:mod:`automedseg.search_space`, the Optuna plumbing :mod:`automedseg.search_study`, one trial
:mod:`automedseg.search_trial`, the confirmation :mod:`automedseg.search_confirm`, the searched plan and the end
of a search :mod:`automedseg.search_adopt`, the report :mod:`automedseg.search_report`. Their public names are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from automedseg.plans import ConfigurationPlan, Plans
from automedseg.search_adopt import SearchResult, finalize_search, searched_configuration
from automedseg.search_confirm import DEFAULT_CONFIRM, Confirmation
from automedseg.search_report import write_search_report
from automedseg.search_rungs import first_rung
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
)
from automedseg.search_study import (
    DEFAULT_HEARTBEAT_S,
    MAX_RETRY,
    PRUNERS,
    best_trial,
    default_storage_url,
    default_study_name,
    fail_orphaned_trials,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
    plan_sha1,
    quiet_optuna,
    redact_url,
    retry_interrupted,
    trial_counts,
)
from automedseg.search_trial import SMOOTHING_EPOCHS, TRAIN_SHARE, run_trial
from automedseg.workspace import Workspace

Log = Callable[[str], None]

__all__ = [  # the public API, also what the split modules hold (re-exported for compatibility)
    "AUG_STRENGTH_RANGE", "BASE_LR", "BASE_WEIGHT_DECAY", "DEFAULT_CONFIRM", "DEFAULT_FIDELITY",
    "DEFAULT_HEARTBEAT_S", "DICE_FRACTION_RANGE", "FIDELITIES", "LR_FACTOR_RANGE", "MAX_CONSECUTIVE_FAILURES",
    "MAX_RETRY", "PRUNERS", "SEARCHED_SUFFIX", "SMOOTHING_EPOCHS", "TRAIN_SHARE", "TRIAL_EPOCHS", "Confirmation",
    "InfeasibleParams", "SearchParam", "SearchResult", "apply_params", "best_trial", "choose_fidelity",
    "default_params", "default_storage_url", "default_study_name", "finalize_search", "fit_schedule", "make_pruner",
    "make_sampler", "make_storage", "redact_url", "run_search", "search_space", "searched_configuration",
    "trial_budget", "trial_counts", "write_search_report",
]

TRIAL_EPOCHS = 20  # epochs of every trial: the pruner's resource axis (same for all variants)
DEFAULT_FIDELITY = 0.25  # trial budget as a fraction of the rule plan's fold budget when none is given
FIDELITIES = ("auto", "full", "short", "continuation")
MAX_CONSECUTIVE_FAILURES = 3

# --- running the search ------------------------------------------------------------------------------


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


def choose_fidelity(base: ConfigurationPlan, *, n_trials: int, time_budget_s: float | None,
                    trial_budget_s: float | None, asked: str = "auto") -> tuple[str, str]:
    """The trials' fidelity, and why: ``full`` (every trial trains a full fold, no pruning), ``short``
    (multi-fidelity: fixed epochs, pruned) or ``continuation`` (successive halving with continuation, only when
    asked: :mod:`automedseg.search_rungs`).

    ``auto`` chooses full-budget trials when they are cheap: ``n_trials`` full folds fit the search budget, or the
    trial budget given is at least a full fold. A full fold's time is the rule plan's per-fold budget, else the
    planner's estimate of its schedule (GPU plans).

    Example:
        >>> choose_fidelity(base, n_trials=10, time_budget_s=3600, trial_budget_s=None)  # doctest: +SKIP
        ('full', '10 trials x a full fold (~4 min) fit the search budget (60 min): ...')
    """
    if asked not in FIDELITIES:
        raise ValueError(f"fidelity {asked!r} is not one of {FIDELITIES}")
    fold = base.training.time_budget_s or base.training.estimated_fold_seconds
    what = f"a full fold (~{fold / 60:.1f} min)" if fold else "a full fold (no estimate)"
    if asked == "short":
        return "short", "short trials (multi-fidelity, pruned), as asked"
    if asked == "continuation":
        return "continuation", ("successive halving with continuation, as asked: constant learning rate with a "
                                "cool-down at each rung; a promoted trial resumes from before its cool-down")
    if asked == "full":
        return "full", f"full-budget trials, as asked: each trains {what}, no pruning"
    if fold and time_budget_s is not None and n_trials * fold <= time_budget_s:
        return "full", (f"{n_trials} trials x {what} fit the search budget ({time_budget_s / 60:.0f} min): every "
                        "trial trains a full fold, no pruning, and the trials are the confirmation")
    if fold and trial_budget_s is not None and trial_budget_s >= fold:
        return "full", (f"the trial budget ({trial_budget_s / 60:.1f} min) covers {what}: every trial trains a full "
                        "fold, no pruning")
    return "short", (f"{n_trials} trials x {what} exceed the search budget: short trials (multi-fidelity, pruned), "
                     "then the best are confirmed at the full budget")


def run_search(ws: Workspace, configuration: str, *, n_trials: int, time_budget_s: float | None = None,
               storage: str | None = None, study_name: str | None = None, seed: int = 12345,
               trial_budget_s: float | None = None, pruner: str = "hyperband", device: str | None = None,
               threads: int | None = None, heartbeat_interval_s: int = DEFAULT_HEARTBEAT_S, max_retry: int = MAX_RETRY,
               keep_trial_files: bool = False, trial_options: Mapping[str, Any] | None = None,
               dataset: Path | None = None, confirm: int = DEFAULT_CONFIRM,
               confirm_options: Mapping[str, Any] | None = None, fidelity: str = "auto",
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
        dataset: The dataset folder: lets the search try another normalisation (it preprocesses that cache).
        confirm: Candidates confirmed against the rule plan at the full fold budget before adoption
            (:mod:`automedseg.search_confirm`); 0: no confirmation, the best trial is adopted unconfirmed.
        confirm_options: :class:`~automedseg.training.TrainOptions` fields for the confirmation trainings
            (tests: ``epochs``, ``iterations_per_epoch``, ``num_workers``).
        fidelity: ``auto``, ``full``, ``short`` or ``continuation`` (:func:`choose_fidelity`).
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
    chosen, fidelity_note = choose_fidelity(base, n_trials=n_trials, time_budget_s=time_budget_s,
                                            trial_budget_s=trial_budget_s, asked=fidelity)
    full_fold = base.training.time_budget_s or base.training.estimated_fold_seconds
    space = search_space(base, normalization=dataset is not None)
    wanted = {
        "configuration": configuration,
        "space": [p.name for p in space],
        "fidelity": chosen,
        "fidelity_note": fidelity_note,
        "trial_budget_s": float(full_fold) if chosen == "full" else trial_budget(
            base, n_trials=n_trials, time_budget_s=time_budget_s, trial_budget_s=trial_budget_s),
        "trial_epochs": int(sched.get("epochs", TRIAL_EPOCHS)),
        "pruner": "none" if chosen == "full" else pruner,
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
        elif key in ("fidelity", "trial_budget_s", "trial_epochs", "pruner") and attrs[key] != value:
            log(f"search: the study's {key} is {attrs[key]} (set by its first worker); using it, not {value}")
    if attrs["rule_plan_sha1"] != wanted["rule_plan_sha1"]:
        log(f"search: warning: {configuration} in {ws.plans_path} differs from the plan the study started with")
    per_trial = float(attrs["trial_budget_s"])
    epochs = int(attrs["trial_epochs"])
    study.pruner = make_pruner(str(attrs["pruner"]), trial_epochs=epochs,
                               min_resource=first_rung(epochs) if attrs.get("fidelity") == "continuation" else None)
    study.sampler = make_sampler(int(attrs["seed"]), n_trials=int(attrs["n_trials"]))
    full = attrs.get("fidelity") == "full"
    out_root = ws.root / "search" / study_name
    out_root.mkdir(parents=True, exist_ok=True)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    log(f"search: study {study_name!r} in {redact_url(url)}; {configuration}, {n_trials} trials of "
        f"~{per_trial / 60:.1f} min" + ("" if full else f" ({epochs} epochs each)") +
        f", pruner {attrs['pruner']}, worker {worker}")
    log(f"search: {attrs.get('fidelity_note', fidelity_note)}")

    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(default_params(base), user_attrs={"rule_defaults": True}, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        return run_trial(trial, ws=ws, plans=plans, base=base, space=space, budget_s=per_trial, epochs=epochs,
                          sched=sched, opts=opts, device=device, threads=threads, out_root=out_root,
                          keep_files=keep_trial_files, worker=worker, log=log,
                         fidelity=str(attrs.get("fidelity", "short")), dataset=dataset)

    t0 = time.monotonic()
    failures = 0
    while True:
        with quiet_optuna():
            optuna.storages.fail_stale_trials(study)
            fail_orphaned_trials(study, grace_s=3 * heartbeat_interval_s)
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
    confirm_opts = {"device": device, "threads": threads, **opts, **dict(confirm_options or {})}
    return finalize_search(ws, configuration, study, storage_url=url, log=log, confirm=confirm, dataset=dataset,
                           confirm_options=confirm_opts)
