"""Search tests on a tiny search_planned demo dataset: the space, pruning, resuming, two workers, the searched plan.

Trials train 2 epochs x 2 iterations; the pruning and resume tests replace the trainer by a stub that
reports planted pseudo-Dice values, so they exercise the Optuna wiring without training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from automedseg import training
from automedseg.planning import activation_bytes, network_for, step_seconds
from automedseg.plans import ChannelNormalization, DeviceProfile, Plans
from automedseg.preprocessing import complete_cases
from automedseg.search import (
    BASE_LR,
    LR_FACTOR_RANGE,
    InfeasibleParams,
    apply_params,
    choose_fidelity,
    default_params,
    default_storage_url,
    fit_schedule,
    make_storage,
    run_search,
    search_space,
    searched_configuration,
)
from automedseg.search_trial import ensure_cache
from automedseg.training import FoldResult, TrainOptions, train_fold
from automedseg.workspace import Workspace

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

FAST = {"epochs": 2, "iterations_per_epoch": 2, "val_iterations": 2, "num_workers": 0}
COMMON: dict[str, Any] = {"trial_budget_s": 20.0, "device": "cpu", "threads": 1, "heartbeat_interval_s": 1,
                          "confirm": 0, "log": lambda m: None}


def _base(ws: Workspace) -> tuple[Plans, Any]:
    plans = Plans.load(ws.plans_path)
    return plans, plans.configuration("3d_fullres")


def _study(ws: Workspace, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=default_storage_url(ws))


# --- the space ------------------------------------------------------------------------------------------


def test_rule_defaults_are_in_the_space_and_map_back_to_the_rule_plan(search_planned: tuple[Path, Workspace]) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    space = search_space(base)
    assert {"optimizer", "lr_factor", "batch_size", "base_features", "architecture", "aug_strength",
            "oversample_foreground", "dice_fraction"} <= {p.name for p in space}
    for p in space:
        if p.kind == "categorical":
            assert p.default in p.choices and len(p.choices) > 1, p
        else:
            assert p.low <= p.default <= p.high, p
    assert apply_params(plans, base, default_params(base)) == base
    assert apply_params(plans, base, {}) == base


@pytest.mark.parametrize("factor", [2, 4])
def test_batch_trades_against_patch_at_constant_memory(search_planned: tuple[Path, Workspace], factor: int) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    variant = apply_params(plans, base, {"batch_size": base.batch_size * factor})
    assert variant.batch_size == base.batch_size * factor
    assert math.prod(variant.patch_size) < math.prod(base.patch_size)
    ratio = activation_bytes(variant.network, variant.patch_size, batch=variant.batch_size) / activation_bytes(
        base.network, base.patch_size, batch=base.batch_size)
    assert 0.5 < ratio < 2.0
    for axis, size in enumerate(variant.patch_size):  # the patch stays divisible by the total stride
        assert size % math.prod(s[axis] for s in variant.network.strides) == 0


def test_params_reach_the_plan_and_infeasible_ones_are_refused(search_planned: tuple[Path, Workspace]) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    v = apply_params(plans, base, {"optimizer": "adamw", "lr_factor": 2.0, "architecture": "residual_unet",
                                   "depth_delta": -1, "aug_strength": 0.0, "dice_fraction": 0.25,
                                   "oversample_foreground": 0.8}, name="x")
    assert v.name == "x" and v.training.optimizer == "adamw" and v.training.initial_lr == pytest.approx(2e-3)
    assert v.network.architecture == "residual_unet" and v.network.n_stages == base.network.n_stages - 1
    assert v.augmentation.rotation_p == 0.0 and v.augmentation.mirror_axes == base.augmentation.mirror_axes
    assert v.training.dice_weight == pytest.approx(0.5) and v.training.ce_weight == pytest.approx(1.5)
    assert v.training.oversample_foreground == 0.8 and v.data_identifier == base.data_identifier
    tiny = dataclasses.replace(plans, device=dataclasses.replace(plans.device, memory_gib=1e-6))
    with pytest.raises(InfeasibleParams):
        apply_params(tiny, base, {"base_features": 2 * base.network.features_per_stage[0]})


MIRRORS = [  # (rule plan's mirror axes, params, mirror axes of the variant)
    ((0, 1, 2), {"mirror_axis_1": False}, (0, 2)),
    ((0, 1, 2), {"mirror_axis_0": False, "mirror_axis_2": False}, (1,)),
    ((0, 1), {"mirror_axis_2": True}, (0, 1)),  # axis 2 left out by the planner (lateral labels): never back on
    ((0, 1), {"mirror_axis_0": False, "mirror_axis_2": True}, (1,)),
]


@pytest.mark.parametrize(("rule_axes", "params", "expected"), MIRRORS)
def test_mirroring_is_searched_per_axis_of_the_rule_plan_only(search_planned: tuple[Path, Workspace],
                                                              rule_axes: tuple[int, ...], params: dict[str, bool],
                                                              expected: tuple[int, ...]) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    base = dataclasses.replace(base, augmentation=dataclasses.replace(base.augmentation, mirror_axes=rule_axes))
    names = {p.name for p in search_space(base)}
    assert {n for n in names if n.startswith("mirror_axis_")} == {f"mirror_axis_{a}" for a in rule_axes}
    assert apply_params(plans, base, params).augmentation.mirror_axes == expected


def test_a_searched_plan_keeps_the_planners_lateral_notes(search_planned: tuple[Path, Workspace]) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    note = ("mirroring along axis 2 maps left (centre at 0.25 of the image) onto right (0.75): "
            "axis left out of mirroring")
    base = dataclasses.replace(base, notes=(note, *base.notes),
                               augmentation=dataclasses.replace(base.augmentation, mirror_axes=(0, 1)))
    plans = plans.with_configuration(base)
    cfg = searched_configuration(plans, "3d_fullres", {"mirror_axis_0": False}, study_name="s", trial_number=1,
                                 value=0.5, trial_budget_s=10.0, n_finished=2)
    assert note in cfg.notes and cfg.augmentation.mirror_axes == (1,)
    assert any(n.startswith("unconfirmed: ") for n in cfg.notes) and cfg.notes[-1].startswith("searched variant:")


def _roomy(base: Any) -> Any:
    """The rule plan on images four times its patch (room for more context)."""
    return dataclasses.replace(base, median_shape=tuple(4 * v for v in base.patch_size))


@pytest.mark.parametrize("context", [0.5, 2.0])
def test_context_trades_against_width_at_equal_step_time(search_planned: tuple[Path, Workspace],
                                                         context: float) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    base = _roomy(base)
    assert context in next(p for p in search_space(base) if p.name == "context").choices
    v = apply_params(plans, base, {"context": context})
    volume = math.prod(v.patch_size) / math.prod(base.patch_size)
    width = v.network.features_per_stage[0] / base.network.features_per_stage[0]
    assert (volume > 1.3 and width < 1) if context > 1 else (volume < 0.8 and width > 1), (v.patch_size, width)

    assert 0.7 * context < volume < 1.4 * context

    def step(net: Any, patch: Any) -> float:
        return step_seconds(net, patch, batch=base.batch_size, dims=3, in_channels=1,
                            num_classes=plans.num_classes, device=plans.device)

    # The width is the one (multiple of 4, at least 8) whose step time comes closest to the rule plan's; the
    # rule's width on the new patch would be further off (the trial's time budget absorbs what is left).
    ref = step(base.network, base.patch_size)
    off = abs(math.log(step(v.network, v.patch_size) / ref))
    for w in range(8, 65, 4):
        net, patch = network_for(list(base.spacing_mm), list(v.patch_size), dims=3, base=w)
        assert off <= abs(math.log(step(net, patch) / ref)) + 1e-9, w
    for axis, size in enumerate(v.patch_size):
        assert size % math.prod(s[axis] for s in v.network.strides) == 0


@pytest.mark.parametrize("context", [0.5, 2.0])
def test_context_on_a_data_bound_gpu_takes_the_widest_of_the_tied_widths(search_planned: tuple[Path, Workspace],
                                                                          context: float) -> None:
    # Workers far slower than any network: every width steps at the data time, so the widths tie and the
    # device, idle anyway, gets the widest (not the narrowest).
    _, ws = search_planned
    plans, base = _base(ws)
    gpu = DeviceProfile(kind="cuda", name="data-bound test GPU", cpu_threads=4, memory_gib=80.0,
                        gflops_by_width=((8, 1e4), (64, 1e5)), measured=False, window_voxels_per_s=1e3,
                        augment_voxels_per_s=((2, 1e3), (3, 1e3)))
    plans = dataclasses.replace(plans, device=gpu)
    v = apply_params(plans, _roomy(base), {"context": context})
    assert v.network.features_per_stage[0] == 128


def test_no_more_context_where_the_patch_covers_the_image(search_planned: tuple[Path, Workspace]) -> None:
    _, ws = search_planned
    _, base = _base(ws)
    whole = dataclasses.replace(base, median_shape=tuple(base.patch_size))
    assert next(p for p in search_space(whole) if p.name == "context").choices == (0.5, 1.0)


NORMS = [  # (rule schemes, normalisation searched, choices: None = not searched)
    (("ct",), True, ("ct", "zscore")),
    (("ct",), False, None),  # no dataset folder to preprocess another cache from
    (("rgb_to_01", "rgb_to_01", "rgb_to_01"), True, ("rgb_to_01+rgb_to_01+rgb_to_01", "zscore")),
    (("zscore",), True, None),  # MR: z-scored already, nothing else is sensible
]


@pytest.mark.parametrize(("schemes", "searched", "choices"), NORMS)
def test_normalisation_is_searched_where_another_scheme_is_sensible(search_planned: tuple[Path, Workspace],
                                                                   schemes: tuple[str, ...], searched: bool,
                                                                   choices: tuple[str, ...] | None) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    norm = tuple(ChannelNormalization(s, **({"clip_low": -100.0, "clip_high": 300.0, "mean": 50.0, "std": 80.0}
                                           if s == "ct" else {})) for s in schemes)
    base = dataclasses.replace(base, normalization=norm)
    param = next((p for p in search_space(base, normalization=searched) if p.name == "normalization"), None)
    assert (param and param.choices) == choices
    if choices:
        v = apply_params(plans, base, {"normalization": "zscore"})
        assert {n.scheme for n in v.normalization} == {"zscore"}
        assert v.data_identifier != base.data_identifier and v.data_identifier.startswith(base.data_identifier)
        assert apply_params(plans, base, {"normalization": choices[0]}) == base


def test_a_variant_with_its_own_normalisation_gets_its_cache(search_planned: tuple[Path, Workspace]) -> None:
    dataset, ws = search_planned
    plans, base = _base(ws)
    variant = dataclasses.replace(base, name="norm_variant", data_identifier="fullres_other")
    with pytest.raises(InfeasibleParams, match="no dataset folder"):
        ensure_cache(ws, plans, variant, None, lambda m: None)
    ensure_cache(ws, plans, variant, dataset, lambda m: None)
    assert complete_cases(ws.preprocessed_dir("fullres_other"), plans, variant) == complete_cases(
        ws.preprocessed_dir(base.data_identifier), plans, base)


def test_fit_schedule_reproduces_the_planner_and_fixes_trial_epochs(search_planned: tuple[Path, Workspace]) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    full = fit_schedule(plans, base, base.training.time_budget_s).training
    assert (full.epochs, full.iterations_per_epoch) == (base.training.epochs, base.training.iterations_per_epoch)
    short = fit_schedule(plans, base, 5.0, trial_epochs=4).training
    longer = fit_schedule(plans, base, 20.0, trial_epochs=4).training
    assert short.epochs == longer.epochs == 4
    assert longer.iterations_per_epoch > short.iterations_per_epoch


@pytest.mark.parametrize(("budget_s", "trainer_budget_s", "iterations"), [
    pytest.param(0.5, None, None, id="too-short"),  # a 0.5 s trial would be cut to one epoch
    pytest.param(20.0, None, 2, id="to-spare"),  # 3 x 2 iterations leave most of 17 s: it would be extended
    pytest.param(0.5, 1.0, None, id="own-budget"),  # the trainer's refit path
])
def test_a_trial_trains_exactly_its_rungs_epochs(search_planned: tuple[Path, Workspace], budget_s: float,
                                                 trainer_budget_s: float | None, iterations: int | None) -> None:
    """The trainer neither refits a trial's schedule to the full-fold rule nor fits its epochs to the budget
    (a 0.5 s trial would stop after one epoch, a 20 s trial of 2 iterations an epoch would be extended), not even
    when handed a budget of its own (its refit path): a trial trains the epochs the pruner counts."""
    _, ws = search_planned
    name = f"exact-{budget_s:g}-{trainer_budget_s}"
    extra: dict[str, Any] = {} if trainer_budget_s is None else {"time_budget_s": trainer_budget_s}
    if iterations is not None:
        extra["iterations_per_epoch"] = iterations
    run_search(ws, "3d_fullres", n_trials=1, study_name=name, seed=0, keep_trial_files=True,
               trial_options={"epochs": 3, "val_iterations": 2, "num_workers": 0, **extra},
               **{**COMMON, "trial_budget_s": budget_s})
    (trial,) = _study(ws, name).get_trials()
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["epochs_run"] == 3 and sorted(trial.intermediate_values) == [1, 2, 3]
    fold_plan = Plans.load(ws.root / "search" / name / "trial_0" / "plans.json")
    (cfg,) = fold_plan.configurations.values()
    assert cfg.training.epochs == 3 and cfg.training.fixed_epochs
    if trainer_budget_s is None:
        assert cfg.training.iterations_per_epoch == trial.user_attrs["plan"]["iterations_per_epoch"]
    log = (ws.root / "search" / name / "trial_0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1, 2]


FIDELITY = [  # (trials, search budget, trial budget, asked, fidelity): the rule plan's fold takes 30 s
    (10, 300.0, None, "auto", "full"),  # 10 full folds fit the search budget
    (10, 299.0, None, "auto", "short"),
    (4, None, 30.0, "auto", "full"),  # a trial budget of a whole fold
    (4, None, 10.0, "auto", "short"),
    (4, None, None, "auto", "short"),  # no budget given: a quarter of a fold per trial
    (10, 1e6, None, "short", "short"),
    (10, 10.0, None, "full", "full"),
    (10, 1e6, None, "continuation", "continuation"),  # only when asked
]


@pytest.mark.parametrize(("n", "total", "per_trial", "forced", "expected"), FIDELITY)
def test_full_budget_trials_where_they_are_cheap(search_planned: tuple[Path, Workspace], n: int,
                                                 total: float | None, per_trial: float | None, forced: str,
                                                 expected: str) -> None:
    _, ws = search_planned
    _, base = _base(ws)
    assert base.training.time_budget_s == 30.0
    mode, note = choose_fidelity(base, n_trials=n, time_budget_s=total, trial_budget_s=per_trial, asked=forced)
    assert mode == expected and note


def test_a_full_budget_study_trains_full_folds_and_compares_them_free(search_ws: Workspace,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-budget trials are scheduled like a fold of the searched plan, are not pruned, and are their own
    confirmation: the rule plan's trial beats the variant's, so nothing is adopted and nothing more is trained."""
    ws = search_ws
    plans, base = _base(ws)
    seen: list[tuple[str, Any]] = []

    def fake(ws: Workspace, name: str, fold: int, *, plans: Plans, options: TrainOptions, log: Any,
             epoch_callback: Any = None) -> FoldResult:
        cfg = plans.configuration(name)
        seen.append((Path(options.output_dir).name, cfg.training))
        value = 0.8 if name.endswith("trial0") else 0.7
        epoch_callback(0, value)
        return FoldResult(Path(options.output_dir), 1, value, 1.0, {"mean_dice": value})

    monkeypatch.setattr(training, "train_fold", fake)
    storage = make_storage(default_storage_url(ws), heartbeat_interval_s=1)
    study = optuna.create_study(storage=storage, study_name="full", direction="maximize")
    study.enqueue_trial(default_params(base))
    study.enqueue_trial({**default_params(base), "aug_strength": 0.5})
    res = run_search(ws, "3d_fullres", n_trials=2, study_name="full", time_budget_s=600.0,
                     **{**COMMON, "trial_budget_s": None, "confirm": 2})
    assert [d for d, _ in seen] == ["trial_0", "trial_1"]  # no confirmation training
    assert all(not tr.fixed_epochs and tr.time_budget_s == base.training.time_budget_s for _, tr in seen)
    assert seen[0][1] == fit_schedule(plans, base, base.training.time_budget_s).training
    attrs = _study(ws, "full").user_attrs
    assert attrs["fidelity"] == "full" and attrs["pruner"] == "none" and "fit the search budget" in attrs[
        "fidelity_note"]
    assert res.fidelity == "full" and res.adopted is False and res.searched_configuration is None
    assert "the rule plan won" in res.confirmation and "(-0.1000)" in res.confirmation


# --- optuna wiring with a stub trainer ---------------------------------------------------------------------


def _stub_trainer(calls: list[tuple[str, int]], *, interrupt_first: bool = False):
    """A ``train_fold`` stand-in: pseudo-Dice 0.5 + 0.02 * epoch, or 0 for the planted bad trial."""

    def fake(ws: Workspace, name: str, fold: int, *, plans: Plans, options: TrainOptions, log: Any,
             epoch_callback: Any = None) -> FoldResult:
        if interrupt_first and not calls:
            calls.append((name, -1))
            raise KeyboardInterrupt
        cfg = plans.configuration(name)
        bad = (cfg.training.initial_lr == pytest.approx(BASE_LR[cfg.training.optimizer] * LR_FACTOR_RANGE[0])
               and cfg.augmentation.gamma_p == 0)
        for epoch in range(cfg.training.epochs):
            calls.append((name, epoch))
            epoch_callback(epoch, 0.0 if bad else 0.5 + 0.02 * epoch)
        return FoldResult(Path(options.output_dir), cfg.training.epochs, 0.6, 1.0, {"mean_dice": 0.6})

    return fake


def test_a_planted_bad_trial_is_pruned(search_planned: tuple[Path, Workspace], monkeypatch: pytest.MonkeyPatch) -> None:
    _, ws = search_planned
    plans, base = _base(ws)
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(training, "train_fold", _stub_trainer(calls))
    storage = make_storage(default_storage_url(ws), heartbeat_interval_s=1)
    study = optuna.create_study(storage=storage, study_name="planted", direction="maximize")
    good = default_params(base)
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "aug_strength": 0.5})
    study.enqueue_trial({**good, "lr_factor": LR_FACTOR_RANGE[0], "aug_strength": 0.0})  # planted: bad
    res = run_search(ws, "3d_fullres", n_trials=3, study_name="planted", pruner="sha",
                     trial_options={"epochs": 4}, **COMMON)
    trials = _study(ws, "planted").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[2].user_attrs["pruned_at_epoch"] == 1
    assert [e for n, e in calls if n.endswith("trial2")] == [0]  # training stopped at the pruning epoch
    assert sorted(trials[0].intermediate_values) == [1, 2, 3, 4]
    assert res.counts["pruned"] == 1 and res.best_trial in (0, 1)


def test_the_pruner_follows_the_whole_image_pseudo_dice_of_the_log(search_planned: tuple[Path, Workspace],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each epoch reports the running mean of the logged whole-image pseudo-Dice; an epoch that scored no whole
    image repeats the last report (its EMA, 0.9 here, is not mixed in), and the patch figure is never used."""
    from automedseg.training_log import write_training_log

    _, ws = search_planned
    epochs = [(0.2, 1, 0.2), (None, 0, 0.9), (0.5, 2, 0.9)]  # (mean whole-image pseudo-Dice, images, EMA)

    def fake(ws: Workspace, name: str, fold: int, *, plans: Plans, options: TrainOptions, log: Any,
             epoch_callback: Any) -> FoldResult:
        out = Path(options.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        history: list[dict[str, Any]] = []
        for epoch, (mean, images, ema) in enumerate(epochs):
            history.append({"epoch": epoch, "mean_pseudo_dice": mean, "pseudo_dice_images": images,
                            "ema_pseudo_dice": ema, "mean_patch_pseudo_dice": 0.95, "epoch_seconds": 1.0})
            write_training_log(out / "log.jsonl", history)
            epoch_callback(epoch, ema)
        return FoldResult(out, len(epochs), 0.9, 1.0, {"mean_dice": 0.5})

    monkeypatch.setattr(training, "train_fold", fake)
    run_search(ws, "3d_fullres", n_trials=1, study_name="whole_images", pruner="none",
               trial_options={"epochs": len(epochs)}, **COMMON)
    (trial,) = _study(ws, "whole_images").get_trials()
    assert trial.intermediate_values == {1: 0.2, 2: 0.2, 3: pytest.approx(0.35)}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_interrupted_and_dead_trials_are_retried(search_planned: tuple[Path, Workspace],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, ws = search_planned
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(training, "train_fold", _stub_trainer(calls, interrupt_first=True))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during trial 0
        run_search(ws, "3d_fullres", n_trials=2, study_name="resume", trial_options={"epochs": 2}, **COMMON)
    # A worker that died mid-trial: its trial stays RUNNING with a heartbeat that goes stale.
    storage = make_storage(default_storage_url(ws), heartbeat_interval_s=1)
    dead = optuna.load_study(study_name="resume", storage=storage).ask()
    storage.record_heartbeat(dead._trial_id)
    res = run_search(ws, "3d_fullres", n_trials=2, study_name="resume", trial_options={"epochs": 2}, **COMMON)
    trials = _study(ws, "resume").get_trials()
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    assert [t.number for t in by_state[TrialState.FAIL]] == [0, dead.number]
    assert by_state[TrialState.FAIL][0].user_attrs["interrupted"] is True
    assert sorted(t.system_attrs["failed_trial"] for t in by_state[TrialState.COMPLETE]) == [0, dead.number]
    assert by_state[TrialState.COMPLETE][0].params == by_state[TrialState.FAIL][0].params
    assert res.counts["finished"] == 2 and res.counts["running"] == 0


# --- real trials ----------------------------------------------------------------------------------------------


def test_search_writes_a_searched_plan_that_trains(search_planned: tuple[Path, Workspace]) -> None:
    _, ws = search_planned
    res = run_search(ws, "3d_fullres", n_trials=3, study_name="e2e", seed=0, trial_options=FAST, **COMMON)
    assert res.counts["finished"] == 3 and res.counts["complete"] >= 1
    plans = Plans.load(ws.plans_path)
    searched = plans.configuration("3d_fullres_searched")
    assert "3d_fullres" in plans.configurations and searched.data_identifier == "fullres"
    assert any(n.startswith(f"searched: study=e2e, trial={res.best_trial}, value=") for n in searched.notes)
    assert searched.training.time_budget_s == plans.configuration("3d_fullres").training.time_budget_s
    out = ws.root / "search" / "e2e"
    report = (out / "search_report.md").read_text()
    assert "rule default" in report and (out / "search_history.png").stat().st_size > 0
    assert (out / "param_importances.png").is_file() == (res.counts["complete"] >= 2)
    assert not list(out.glob("trial_*/*.pt"))
    summary = json.loads((out / f"trial_{res.best_trial}" / "validation" / "summary.json").read_text())
    assert summary["mean_dice"] is not None
    # Running the same command again continues the study: it is complete, so nothing new runs.
    again = run_search(ws, "3d_fullres", n_trials=3, study_name="e2e", seed=0, trial_options=FAST, **COMMON)
    assert len(_study(ws, "e2e").get_trials()) == 3 and again.best_trial == res.best_trial
    fold = train_fold(ws, "3d_fullres_searched", 0, options=TrainOptions(
        epochs=1, iterations_per_epoch=2, num_workers=0, threads=1, device="cpu", progress=False,
        validate=False, restart=True), log=lambda m: None)
    assert fold.fold_dir == ws.fold_dir("3d_fullres_searched", 0) and (fold.fold_dir / "checkpoint_final.pt").is_file()


WORKER = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from automedseg.search import run_search
from automedseg.workspace import Workspace
run_search(Workspace(Path(sys.argv[1])), "3d_fullres", n_trials=4, study_name=sys.argv[3], seed=0,
           storage=sys.argv[2] or None, trial_budget_s=20.0, device="cpu", threads=1, heartbeat_interval_s=1, confirm=0,
           trial_options={"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 2, "num_workers": 0})
"""

POSTGRES_URL = os.environ.get("AUTOMEDSEG_TEST_POSTGRES")  # set by .ci/run, which starts a throwaway server
STORAGES = [
    pytest.param("", id="sqlite"),
    pytest.param(POSTGRES_URL or "", id="postgresql", marks=pytest.mark.skipif(
        not POSTGRES_URL, reason="no PostgreSQL server: set AUTOMEDSEG_TEST_POSTGRES (.ci/run starts one)")),
]


def _worker(ws: Workspace, storage: str, study: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(ws.root), storage, study], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("storage", STORAGES)
def test_two_workers_share_one_study(search_planned: tuple[Path, Workspace], storage: str) -> None:
    _, ws = search_planned
    name = f"shared-{uuid.uuid4().hex[:8]}"
    procs = [_worker(ws, storage, name) for _ in range(2)]
    t0 = time.time()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    study = optuna.load_study(study_name=name, storage=storage or default_storage_url(ws))
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in finished}) == 2, outputs
    assert "3d_fullres_searched" in Plans.load(ws.plans_path).configurations
    assert time.time() - t0 < 300


def test_a_trial_whose_worker_died_before_starting_it_is_requeued() -> None:
    """A worker killed between taking a trial and its first heartbeat leaves it RUNNING without one (Optuna's stale
    check passes over it): past the grace it is failed as interrupted and re-queued; a started trial is left."""
    import datetime

    from automedseg.search_study import fail_orphaned_trials, quiet_optuna, retry_interrupted

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.25})
    orphan = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})  # taken, never started
    started = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    started.set_user_attr("started", started.number)
    now = datetime.datetime.now()
    assert fail_orphaned_trials(study, grace_s=30.0, now=now) == 0  # within the grace: it may still start
    assert fail_orphaned_trials(study, grace_s=30.0, now=now + datetime.timedelta(seconds=31)) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {orphan.number: TrialState.FAIL, started.number: TrialState.RUNNING}
    with quiet_optuna():  # (as the search calls it: Optuna's retry callback is 'experimental')
        assert retry_interrupted(study, max_retry=3) == 1
    requeued = study.get_trials(states=(TrialState.WAITING,))
    assert [t.params for t in requeued] == [{"x": 0.25}]
    # its copy of a predecessor's mark does not count as started
    study._storage.set_trial_user_attr(requeued[0]._trial_id, "started", orphan.number)
    again = study.ask()
    assert again.number == requeued[0].number
    assert fail_orphaned_trials(study, grace_s=30.0, now=now + datetime.timedelta(seconds=62)) == 1
    # two workers racing for one orphan: the one that comes second finds it failed already and goes on
    stale = [t for t in study.get_trials() if t.number == again.number]
    stale[0].state = TrialState.RUNNING  # the racer's view, read before the other worker failed it
    study.get_trials = lambda **_: stale
    assert fail_orphaned_trials(study, grace_s=30.0, now=now + datetime.timedelta(seconds=62)) == 0


@pytest.mark.skipif(not POSTGRES_URL, reason="no PostgreSQL server: set AUTOMEDSEG_TEST_POSTGRES (.ci/run starts one)")
def test_killing_one_postgres_worker_keeps_the_others_results(search_planned: tuple[Path, Workspace]) -> None:
    _, ws = search_planned
    assert POSTGRES_URL
    name = f"kill-{uuid.uuid4().hex[:8]}"
    victim, survivor = _worker(ws, POSTGRES_URL, name), _worker(ws, POSTGRES_URL, name)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill the victim once the study has a trial under way
        try:
            if optuna.load_study(study_name=name, storage=POSTGRES_URL).get_trials():
                break
        except KeyError:
            pass
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out = survivor.communicate(timeout=300)[0]
    assert survivor.returncode == 0, out
    trials = optuna.load_study(study_name=name, storage=POSTGRES_URL).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4, [t.state for t in trials]
    assert len({t.number for t in trials}) == len(trials)


@pytest.mark.parametrize(("rule_value", "fidelity", "warns"), [
    (0.0, "short", True),  # the rule plan learned nothing in its trial: the ranking is noise
    (0.005, "continuation", True),
    (0.3, "short", False),
    (0.0, "full", False),  # full folds: nothing shorter to blame
])
def test_the_report_warns_when_the_rule_plans_trial_learned_nothing(rule_value: float, fidelity: str,
                                                                    warns: bool) -> None:
    from automedseg.search_report import fidelity_warning

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("fidelity", fidelity)
    study.set_user_attr("trial_budget_s", 75.0)
    study.enqueue_trial({"x": rule_value}, user_attrs={"rule_defaults": True})
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=3)
    warning = fidelity_warning(study)
    assert (warning is not None) is warns
    if warns:
        assert "~1.2 min" in warning and "--fidelity full" in warning
