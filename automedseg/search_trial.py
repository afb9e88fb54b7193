"""One search trial of :mod:`automedseg.search`: sample a variant, fit its schedule, train fold 0 with
pruning after every epoch, and return its fold-0 validation Dice.

A trial trains exactly its epochs: the schedule is fitted here (:func:`~automedseg.search_space.fit_schedule`)
and marked ``fixed_epochs``, and the trial passes no time budget to the trainer, so neither the trainer's
budget refit (:func:`~automedseg.schedule.budget_epochs`) nor its last-epoch trim changes what the pruner counts.
A full-budget trial (``fidelity`` ``full`` of :func:`run_trial`) is instead scheduled exactly as the searched
plan would be (:func:`full_fold_variant`) and trained like a fold of it; a ``continuation`` trial trains its
fixed epochs rung by rung (:mod:`automedseg.search_rungs`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from automedseg.locks import waiting_lock
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.search_space import InfeasibleParams, SearchParam, apply_params, fit_schedule, normalization_key
from automedseg.training_log import read_training_log
from automedseg.workspace import Workspace

Log = Callable[[str], None]

TRAIN_SHARE = 0.85  # share of a trial's budget given to training (the rest: start-up, final validation)
SMOOTHING_EPOCHS = 3  # the pruner sees the mean pseudo-Dice of the last 3 epochs


def full_fold_variant(plans: Plans, base: ConfigurationPlan, params: Mapping[str, Any], *, name: str
                      ) -> ConfigurationPlan:
    """A variant scheduled for a full fold: the rule plan's per-fold budget (``training.time_budget_s``); without
    one (GPU plans) the rule plan's epochs and iterations are kept.

    Raises:
        InfeasibleParams: The variant does not fit the planned device's memory.
    """
    return fit_schedule(plans, apply_params(plans, base, params, name=name), base.training.time_budget_s)


def trial_variant(plans: Plans, base: ConfigurationPlan, params: Mapping[str, Any], *, name: str, fidelity: str,
                  budget_s: float, epochs: int) -> ConfigurationPlan:
    """The variant a trial of ``fidelity`` trains, with its schedule.

    ``full``: :func:`full_fold_variant`. ``short`` and ``continuation``: exactly ``epochs`` epochs
    (``fixed_epochs``) whose iterations fill ``TRAIN_SHARE x budget_s`` by the planner's cost model; with
    continuation the cool-downs a promoted trial discards come out of the same budget.

    Raises:
        InfeasibleParams: The variant does not fit the planned device's memory.
    """
    if fidelity == "full":
        return full_fold_variant(plans, base, params, name=name)
    from automedseg.search_rungs import extra_epochs

    share = epochs / (epochs + extra_epochs(epochs)) if fidelity == "continuation" else 1.0
    return fit_schedule(plans, apply_params(plans, base, params, name=name), TRAIN_SHARE * budget_s * share,
                        trial_epochs=epochs)


def ensure_cache(ws: Workspace, plans: Plans, config: ConfigurationPlan, dataset: Path | None, log: Log) -> None:
    """Preprocess the cache of a variant that has its own (another normalisation), once; workers wait in turn.

    Raises:
        InfeasibleParams: The cache is missing and no dataset folder was given to make it from.
    """
    from automedseg.preprocessing import preprocess_dataset, preprocessing_key, read_cache_manifest

    folder = ws.preprocessed_dir(config.data_identifier)

    def ready() -> bool:
        manifest = read_cache_manifest(folder)
        return manifest is not None and manifest.preprocessing_key == preprocessing_key(plans, config)

    if ready():
        return
    if dataset is None:
        raise InfeasibleParams(f"{folder}: this variant needs its own preprocessed cache and no dataset folder "
                               "was given to make it")
    from automedseg.io import load_dataset_spec

    spec = load_dataset_spec(dataset)
    with waiting_lock(folder, purpose="search: preprocess a variant's cache", name=".search-cache.lock"):
        if not ready():  # else another worker made it meanwhile
            log(f"preprocessing {folder} ({normalization_key(config.normalization)} normalisation)")
            preprocess_dataset(spec, plans.with_configuration(config), ws.preprocessed_root,
                               configurations=[config.name], jobs=1)


def run_trial(trial: Any, *, ws: Workspace, plans: Plans, base: ConfigurationPlan, space: Sequence[SearchParam],
              budget_s: float, epochs: int, sched: Mapping[str, Any], opts: Mapping[str, Any], device: str | None,
              threads: int | None, out_root: Path, keep_files: bool, worker: str, log: Log,
              fidelity: str = "short", dataset: Path | None = None) -> float:
    """Train one trial on fold 0 and return its objective.

    Args:
        fidelity: ``short``: ``epochs`` fixed epochs in ``TRAIN_SHARE x budget_s``, reported after every epoch;
            ``continuation``: the same budget and epochs, trained rung by rung with continuation
            (:mod:`automedseg.search_rungs`), reported at the rungs; ``full``: scheduled for a full fold
            (:func:`full_fold_variant`, the trainer refits it to the budget as for any fold).
        dataset: The dataset folder, to preprocess the cache of a variant with another normalisation.
    """
    import optuna

    from automedseg.search_rungs import continuation_attrs, train_with_continuation
    from automedseg.training import TrainOptions, train_fold

    trial.set_user_attr("worker", worker)
    trial.set_user_attr("started", trial.number)  # (search_study.fail_orphaned_trials: a worker has it)
    trial.set_user_attr("interrupted", False)
    params = {p.name: p.suggest(trial) for p in space}
    name = f"{base.name}_trial{trial.number}"
    tlog: Log = lambda m: log(f"[trial {trial.number}] {m}")  # noqa: E731
    try:
        variant = trial_variant(plans, base, params, name=name, fidelity=fidelity, budget_s=budget_s, epochs=epochs)
        ensure_cache(ws, plans, variant, dataset, tlog)
    except InfeasibleParams as e:
        trial.set_user_attr("infeasible", str(e))
        tlog(f"pruned before training: {e}")
        raise optuna.TrialPruned(str(e)) from None
    if sched:  # tests and experts: this schedule exactly (a full-budget trial's is not refitted to the budget)
        extra: dict[str, Any] = {"time_budget_s": None} if fidelity == "full" else {}
        tr = dataclasses.replace(variant.training, **{k: int(v) for k, v in sched.items()}, **extra)
        variant = dataclasses.replace(variant, training=tr)
    tr = variant.training
    trial.set_user_attr("plan", {
        "batch_size": variant.batch_size, "patch_size": list(variant.patch_size),
        "features_per_stage": list(variant.network.features_per_stage), "n_stages": variant.network.n_stages,
        "architecture": variant.network.architecture, "optimizer": tr.optimizer, "initial_lr": tr.initial_lr,
        "epochs": tr.epochs, "iterations_per_epoch": tr.iterations_per_epoch,
    })
    tlog(f"{json.dumps(params, default=str)} -> batch {variant.batch_size}, patch {list(variant.patch_size)}, "
         f"{tr.epochs} x {tr.iterations_per_epoch} iterations")
    out_dir = out_root / f"trial_{trial.number}"
    curve: list[float] = []

    def on_epoch(epoch: int, ema: float) -> bool:
        # The trainer's EMA (factor 0.9) lags by ~10 epochs, half a trial: report a short running mean
        # of the epochs' whole-image pseudo-Dice instead (read from the fold log, which is written before this
        # call). An epoch that scored no whole image (a large one is scored every few epochs) adds nothing.
        logged, raw = _epoch_pseudo_dice(out_dir / "log.jsonl", epoch)
        if raw is not None or (not logged and math.isfinite(ema)):
            curve.append(float(ema) if raw is None else raw)
        if not curve:
            return False
        score = float(np.mean(curve[-SMOOTHING_EPOCHS:]))
        trial.report(score, epoch + 1)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", epoch + 1)
            tlog(f"pruned after epoch {epoch + 1} (pseudo-Dice {score:.4f})")
            # Raised, not returned: a pruned trial skips the final validation.
            raise optuna.TrialPruned(f"pseudo-Dice {score:.4f} after epoch {epoch + 1}")
        return False

    # No time_budget_s option: the trial's plan holds its budget and its fixed epochs, which the trainer keeps.
    options = TrainOptions(**{
        "device": device, "threads": threads, "output_dir": out_dir, "progress": False, "validate": True,
        "restart": True, **opts,
    })
    def on_rung(score: float, end: int) -> None:
        trial.report(score, end)
        if end < epochs and trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", end)
            tlog(f"pruned at the rung of epoch {end} (pseudo-Dice {score:.4f} after its cool-down)")
            raise optuna.TrialPruned(f"pseudo-Dice {score:.4f} at epoch {end}")
        trial.set_user_attr("passed_rung", end)

    try:
        if fidelity == "continuation":
            trial.set_user_attr("continuation", continuation_attrs(epochs))
            result = train_with_continuation(ws, name, plans=plans.with_configuration(variant), options=options,
                                             epochs=epochs, report=on_rung, log=tlog)
        else:
            result = train_fold(ws, name, 0, plans=plans.with_configuration(variant), options=options, log=tlog,
                                epoch_callback=on_epoch)
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)
        raise
    except optuna.TrialPruned:
        raise
    except Exception as e:
        trial.set_user_attr("error", repr(e)[:500])
        raise
    finally:
        if not keep_files:
            _clean_trial_dir(out_dir)
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    val = (result.validation or {}).get("mean_dice")
    value = float(val) if val is not None and math.isfinite(val) else float(result.best_ema_dice)
    if not math.isfinite(value):
        value = 0.0
    trial.set_user_attr("best_ema_pseudo_dice", float(result.best_ema_dice))
    trial.set_user_attr("validation_mean_dice", None if val is None else float(val))
    trial.set_user_attr("epochs_run", int(result.epochs_run))
    trial.set_user_attr("train_seconds", float(result.train_seconds))
    tlog(f"value {value:.4f} ({'validation Dice' if val is not None else 'best EMA pseudo-Dice'}), "
         f"{result.epochs_run} epochs in {result.train_seconds:.0f} s")
    return value


def _epoch_pseudo_dice(log_path: Path, epoch: int) -> tuple[bool, float | None]:
    """Whether a fold's log.jsonl holds ``epoch``, and its mean pseudo-Dice (``None``: absent or not finite)."""
    history = read_training_log(log_path, problems=[])
    entry = history[-1] if history and history[-1].epoch == epoch else None
    value = entry.mean_pseudo_dice if entry is not None else None
    return entry is not None, float(value) if value is not None and math.isfinite(value) else None


def _clean_trial_dir(out_dir: Path) -> None:
    """Drop a trial's checkpoints and validation volumes; keep log, curves, plan and validation summary."""
    if not out_dir.is_dir():
        return
    for p in out_dir.glob("*.pt"):
        p.unlink(missing_ok=True)
    val = out_dir / "validation"
    if val.is_dir():
        for p in val.iterdir():
            if p.name != "summary.json":
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
