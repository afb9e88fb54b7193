"""Successive halving with continuation: the rungs, the learning rate, and a promoted trial that resumes from
before its cool-down instead of starting again (real training: 8 epochs of 1 iteration)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from automedseg.plans import Plans
from automedseg.search import default_storage_url, run_search
from automedseg.search_rungs import continuation_lr, cooldown_epochs, extra_epochs, rung_ends
from automedseg.workspace import Workspace

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(("epochs", "ends", "cooldowns"), [
    (20, [5, 15, 20], [1, 2, 2]),
    (8, [2, 6, 8], [1, 1, 1]),
    (40, [10, 30, 40], [1, 3, 4]),
    (4, [2, 4], [1, 1]),
    (2, [2], [1]),
])
def test_rungs_follow_the_pruner_and_each_has_a_cooldown(epochs: int, ends: list[int], cooldowns: list[int]) -> None:
    assert rung_ends(epochs) == ends
    assert [cooldown_epochs(e) for e in ends] == cooldowns
    assert extra_epochs(epochs) == sum(cooldowns[:-1])


@pytest.mark.parametrize(("planned", "lrs"), [
    (5, [1.0, 1.0, 1.0, 1.0, 0.5]),
    (15, [1.0] * 13 + [2 / 3, 1 / 3]),
    (2, [1.0, 0.5]),
])
def test_the_learning_rate_is_constant_then_cools_down_before_the_rung(planned: int, lrs: list[float]) -> None:
    assert [continuation_lr(e, planned, 1.0) for e in range(planned)] == pytest.approx(lrs)


def test_a_promoted_trial_resumes_rather_than_restarts(search_ws: Workspace) -> None:
    ws = search_ws
    messages: list[str] = []
    res = run_search(ws, "3d_fullres", n_trials=1, study_name="cont", seed=0, fidelity="continuation", pruner="sha",
                     confirm=0, keep_trial_files=True, trial_budget_s=20.0, device="cpu", threads=1,
                     heartbeat_interval_s=1, log=messages.append,
                     trial_options={"epochs": 8, "iterations_per_epoch": 1, "val_iterations": 1, "num_workers": 0})
    (trial,) = optuna.load_study(study_name="cont", storage=default_storage_url(ws)).get_trials()
    assert trial.state == TrialState.COMPLETE and res.fidelity == "continuation"
    assert sorted(trial.intermediate_values) == [2, 6, 8]  # judged at the rungs, after their cool-downs
    # Promoted twice, each time resumed from the checkpoint before the cool-down (epochs 1 and 5, counted from 0).
    resumed = [int(m.group(1)) for m in (re.search(r"resuming .* at epoch (\d+)", x) for x in messages) if m]
    assert resumed == [1, 5], messages
    trained = [x for x in messages if re.match(r"\[trial 0\] epoch \d+/\d+:", x)]
    assert len(trained) == 8 + extra_epochs(8) == 10  # the discarded cool-downs, nothing trained twice besides
    out = ws.root / "search" / "cont" / "trial_0"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    lr = Plans.load(out / "plans.json").configurations["3d_fullres_trial0"].training.initial_lr
    assert [e["epoch"] for e in log] == list(range(8))
    assert [e["lr"] for e in log] == pytest.approx([lr] * 7 + [lr / 2])  # only the last rung's cool-down stays
    assert trial.user_attrs["epochs_run"] == 8 and trial.user_attrs["validation_mean_dice"] is not None
    assert not (out / "checkpoint_pre_cooldown.pt").exists()
    assert Path(out / "checkpoint_final.pt").is_file()
