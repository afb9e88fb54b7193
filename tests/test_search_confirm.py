"""Confirmation before adoption: a planted worse candidate is not adopted, a better one is, the rule plan's own
fold 0 is re-used, and a confirmation killed part-way resumes.

Trials are replaced by a stub trainer that reports planted values; the confirmation runs are stubbed too, except
in the kill test, which trains them for real (2 epochs of 1 iteration).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from automedseg import training
from automedseg.plans import Plans
from automedseg.search import default_params, default_storage_url, make_storage, run_search
from automedseg.search_confirm import (
    Confirmation,
    ConfirmRun,
    case_dice,
    confirmation_path,
    read_confirmation,
    reusable_rule_fold,
    verdict,
)
from automedseg.training import FoldResult, TrainOptions
from automedseg.validation_summary import summary_path, write_validation_summary
from automedseg.workspace import Workspace

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

COMMON: dict[str, Any] = {"n_trials": 2, "trial_budget_s": 20.0, "device": "cpu", "threads": 1,
                          "heartbeat_interval_s": 1, "pruner": "none", "trial_options": {"epochs": 2},
                          "fidelity": "short"}


def _enqueue(ws: Workspace, name: str) -> None:
    """Trial 0 is the rule plan, trial 1 a variant (half the augmentation)."""
    plans = Plans.load(ws.plans_path)
    good = default_params(plans.configuration("3d_fullres"))
    study = optuna.create_study(storage=make_storage(default_storage_url(ws), heartbeat_interval_s=1),
                                study_name=name, direction="maximize")
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "aug_strength": 0.5})


def _stub(values: dict[str, float], calls: list[str]) -> Any:
    """``train_fold`` stand-in: trial ``trial_<n>`` scores ``values['search/trial_<n>']``, confirmation run ``k``
    (``rule``, ``trial_<n>``) scores ``values['confirm/k']``."""

    def fake(ws: Workspace, name: str, fold: int, *, plans: Plans, options: TrainOptions, log: Any,
             epoch_callback: Any = None) -> FoldResult:
        out = Path(options.output_dir)
        where = "confirm" if out.parent.name == "confirm" else "search"
        calls.append(f"{where}/{out.name}")
        value = values[f"{where}/{out.name}"]
        epochs = plans.configuration(name).training.epochs
        for epoch in range(epochs if epoch_callback else 0):
            epoch_callback(epoch, value)
        return FoldResult(out, epochs, value, 1.0, {"mean_dice": value})

    return fake


TRIALS = {"search/trial_0": 0.60, "search/trial_1": 0.70}  # on short trials the variant looks better
VERDICTS = [  # (confirmation scores, adopted, margin)
    pytest.param({"confirm/rule": 0.80, "confirm/trial_1": 0.50}, False, -0.30, id="planted-worse"),
    pytest.param({"confirm/rule": 0.60, "confirm/trial_1": 0.75}, True, 0.15, id="better"),
]


@pytest.mark.parametrize(("scores", "adopted", "margin"), VERDICTS)
def test_a_candidate_is_adopted_only_when_it_beats_the_rule_plan(search_ws: Workspace,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  scores: dict[str, float], adopted: bool,
                                                                  margin: float) -> None:
    ws = search_ws
    calls: list[str] = []
    monkeypatch.setattr(training, "train_fold", _stub({**TRIALS, **scores}, calls))
    _enqueue(ws, "verdict")
    # First unconfirmed (--confirm 0): the variant is written, marked unconfirmed.
    first = run_search(ws, "3d_fullres", study_name="verdict", confirm=0, log=lambda m: None, **COMMON)
    assert first.searched_configuration == "3d_fullres_searched" and first.adopted is None
    # Then confirmed: the rule plan and trial 1 are trained at the full budget and compared.
    res = run_search(ws, "3d_fullres", study_name="verdict", confirm=2, log=lambda m: None, **COMMON)
    assert calls == ["search/trial_0", "search/trial_1", "confirm/rule", "confirm/trial_1"]
    state = read_confirmation(confirmation_path(ws, "verdict"))
    assert [(r.key, r.state, r.source) for r in state.runs] == [("rule", "done", "trained"),
                                                                 ("trial_1", "done", "trained")]
    assert state.margin == pytest.approx(margin) and state.adopted is adopted and res.adopted is adopted
    plans = Plans.load(ws.plans_path)
    report = res.report_path.read_text()
    if adopted:
        searched = plans.configuration("3d_fullres_searched")
        assert res.searched_configuration == "3d_fullres_searched"
        assert any(n.startswith("confirmed: trial_1 beat the rule plan") and "+0.1500" in n for n in searched.notes)
        rule_p = plans.configuration("3d_fullres").augmentation.rotation_p
        assert searched.augmentation.rotation_p == pytest.approx(0.5 * rule_p)
        assert "`3d_fullres_searched` adopted" in report
    else:  # the unconfirmed searched plan of this study is withdrawn; the rule plan's notes say by how much
        assert res.searched_configuration is None and "3d_fullres_searched" not in plans.configurations
        (note,) = [n for n in plans.configuration("3d_fullres").notes if n.startswith("search verdict: ")]
        assert "the rule plan won" in note and f"({margin:+.4f})" in note, note
        assert plans.configuration("3d_fullres").notes[-1].startswith("width ")  # the summary line stays last
        assert "not adopted: plans.json keeps the rule plan" in report
    # Repeating the command trains nothing again and gives the same verdict.
    again = run_search(ws, "3d_fullres", study_name="verdict", confirm=2, log=lambda m: None, **COMMON)
    assert len(calls) == 4 and again.adopted is adopted and again.confirmation == res.confirmation


VERDICT_TABLE = [  # (rule plan's Dice, candidates' Dice, winner, margin)
    (0.8, (0.5, 0.7), "rule", -0.1),
    (0.8, (0.8,), "rule", 0.0),  # a tie keeps the rule plan
    (0.8, (0.81, 0.9), "trial_2", 0.1),
    (None, (0.5,), "trial_1", None),  # the rule plan's validation scored nothing
    (0.8, (None,), "rule", None),
    (0.8, (), "rule", None),  # no candidate differs from the rule plan
]


@pytest.mark.parametrize(("rule", "candidates", "winner", "margin"), VERDICT_TABLE)
def test_the_verdict_adopts_only_a_candidate_that_beats_the_rule_plan(rule: float | None,
                                                                     candidates: tuple[float | None, ...],
                                                                     winner: str, margin: float | None) -> None:
    runs = (ConfirmRun("rule", None, {}, "x", "d", "done", rule),
            *(ConfirmRun(f"trial_{i + 1}", i + 1, {}, "x", "d", "done", v) for i, v in enumerate(candidates)))
    state = verdict(Confirmation("s", "3d_fullres", runs))
    assert state.winner == winner and state.adopted is (winner != "rule")
    assert state.margin == (None if margin is None else pytest.approx(margin))
    assert state.summary() and verdict(dataclasses.replace(state, runs=(
        dataclasses.replace(runs[0], state="pending"), *runs[1:]))).winner is None  # pending: no verdict yet


def _cases(values: list[float]) -> dict[str, dict[str, float | None]]:
    return {f"case_{i}": {"1": v} for i, v in enumerate(values)}


RULE_CASES = [0.80, 0.70, 0.90, 0.85, 0.75, 0.80]
NOISY_VERDICTS = [  # (candidate's per-case Dice or None, adopted, what the summary says)
    pytest.param([v + 0.01 for v in RULE_CASES], True, "P(better) 1.00 over 6 cases", id="steady-gain"),
    pytest.param([RULE_CASES[0] + 0.06, *RULE_CASES[1:]], False, "below the 0.90 a win needs", id="one-lucky-case"),
    pytest.param([v + (0.05 if i % 2 else -0.03) for i, v in enumerate(RULE_CASES)], False,
                 "below the 0.90 a win needs", id="mixed"),
    pytest.param(None, True, "(+0.0100)", id="no-per-case-figures"),  # older files: the mean decides
]


@pytest.mark.parametrize(("candidate", "adopted", "says"), NOISY_VERDICTS)
def test_a_higher_mean_is_adopted_only_when_the_cases_agree(candidate: list[float] | None, adopted: bool,
                                                           says: str) -> None:
    rule_mean = sum(RULE_CASES) / len(RULE_CASES)
    rule = ConfirmRun("rule", None, {}, "x", "d", "done", rule_mean, case_dice=_cases(RULE_CASES))
    cand = ConfirmRun("trial_1", 1, {}, "x", "d", "done", rule_mean + 0.01,
                      case_dice={} if candidate is None else _cases(candidate))
    state = verdict(Confirmation("s", "3d_fullres", (rule, cand)))
    assert state.margin == pytest.approx(0.01) and state.adopted is adopted
    assert says in state.summary(), state.summary()
    assert (state.probability is None) is (candidate is None)


def test_case_dice_reads_the_folds_validation_summary(tmp_path: Path) -> None:
    write_validation_summary(summary_path(tmp_path), {
        "configuration": "3d_fullres", "fold": "fold_0", "cases": ["a", "b"], "mean_dice": 0.5,
        "per_case": [{"case": "a", "metrics": {"0": {"dice": 1.0}, "1": {"dice": 0.6}, "2": {"dice": None}}},
                     {"case": "b", "metrics": {"1": {"dice": 0.4, "hd95": 3.0}, "2": {"dice": 0.5}}}]})
    assert case_dice(tmp_path) == {"a": {"1": 0.6, "2": None}, "b": {"1": 0.4, "2": 0.5}}
    assert case_dice(tmp_path / "missing") == {}


def _fake_rule_fold(ws: Workspace, change: str) -> None:
    """A finished, validated fold 0 of the rule plan (mean Dice 0.77), altered as ``change`` says."""
    plans = Plans.load(ws.plans_path)
    cfg = plans.configuration("3d_fullres")
    if change == "other budget":
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training,
                                                                     time_budget_s=2 * cfg.training.time_budget_s))
    if change == "other patch":
        cfg = dataclasses.replace(cfg, patch_size=tuple(v + 8 for v in cfg.patch_size))
    fold = ws.fold_dir("3d_fullres", 0)
    fold.mkdir(parents=True)
    dataclasses.replace(plans, configurations={cfg.name: cfg}).save(fold / "plans.json")
    if change != "not finished":
        (fold / "checkpoint_final.pt").write_bytes(b"")
    if change != "not validated":
        write_validation_summary(summary_path(fold), {"configuration": "3d_fullres", "fold": "fold_0",
                                                      "mean_dice": 0.77})


@pytest.mark.parametrize(("change", "reused"), [
    ("none", 0.77), ("other budget", None), ("other patch", None), ("not finished", None), ("not validated", None),
])
def test_the_rule_plans_own_fold_0_is_reused_when_trained_alike(search_ws: Workspace, change: str,
                                                                reused: float | None) -> None:
    _fake_rule_fold(search_ws, change)
    plans = Plans.load(search_ws.plans_path)
    assert reusable_rule_fold(search_ws, plans, plans.configuration("3d_fullres")) == reused


def test_a_reused_rule_fold_is_not_trained_again(search_ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = search_ws
    _fake_rule_fold(ws, "none")
    calls: list[str] = []
    monkeypatch.setattr(training, "train_fold", _stub({**TRIALS, "confirm/trial_1": 0.75}, calls))
    _enqueue(ws, "reuse")
    res = run_search(ws, "3d_fullres", study_name="reuse", confirm=1, log=lambda m: None, **COMMON)
    assert calls == ["search/trial_0", "search/trial_1", "confirm/trial_1"]
    rule = read_confirmation(confirmation_path(ws, "reuse")).run("rule")
    assert (rule.source, rule.mean_dice, rule.fold_dir) == ("reused", 0.77, str(ws.fold_dir("3d_fullres", 0)))
    assert res.adopted is False  # 0.75 < 0.77


def test_the_confirmation_resumes_after_a_kill(search_ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed in the first epoch of the second confirmation run: the rerun keeps the finished rule run and resumes
    the interrupted one from its checkpoint."""
    ws = search_ws
    real = training.train_fold
    stub = _stub(TRIALS, [])
    trained: list[str] = []
    armed = [True]

    def train(ws: Workspace, name: str, fold: int, *, plans: Plans, options: TrainOptions, log: Any,
              epoch_callback: Any = None) -> FoldResult:
        out = Path(options.output_dir)
        if out.parent.name != "confirm":
            return stub(ws, name, fold, plans=plans, options=options, log=log, epoch_callback=epoch_callback)
        trained.append(out.name)

        def kill(epoch: int, ema: float) -> bool:
            if armed[0] and out.name != "rule":
                raise KeyboardInterrupt  # after the epoch's checkpoint, as a kill would leave it
            return False

        return real(ws, name, fold, plans=plans, options=options, log=log, epoch_callback=kill)

    monkeypatch.setattr(training, "train_fold", train)
    _enqueue(ws, "kill")
    quick = {"confirm": 1, "confirm_options": {"epochs": 2, "iterations_per_epoch": 1, "num_workers": 0}}
    with pytest.raises(KeyboardInterrupt):
        run_search(ws, "3d_fullres", study_name="kill", log=lambda m: None, **quick, **COMMON)
    state = read_confirmation(confirmation_path(ws, "kill"))
    assert [(r.key, r.state) for r in state.runs] == [("rule", "done"), ("trial_1", "pending")]
    assert state.winner is None and "3d_fullres_searched" not in Plans.load(ws.plans_path).configurations
    rule_dir = Path(state.run("rule").fold_dir)
    rule_mtime = (rule_dir / "checkpoint_final.pt").stat().st_mtime_ns
    armed[0] = False
    messages: list[str] = []
    res = run_search(ws, "3d_fullres", study_name="kill", log=messages.append, **quick, **COMMON)
    assert trained == ["rule", "trial_1", "trial_1"]  # the rule run is not trained again
    assert any("[confirm trial_1] resuming" in m and "at epoch 1" in m for m in messages), messages
    log = (Path(state.run("trial_1").fold_dir) / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [0, 1]
    assert (rule_dir / "checkpoint_final.pt").stat().st_mtime_ns == rule_mtime
    final = read_confirmation(confirmation_path(ws, "kill"))
    assert all(r.state == "done" for r in final.runs) and final.winner is not None
    assert res.adopted is final.adopted
    # The rule plan's confirmation run is the work folder's fold 0 of it now (it did not exist).
    assert (ws.fold_dir("3d_fullres", 0) / "checkpoint_final.pt").is_file()
