"""A trained configuration is never silently replaced: ``plan`` keeps it, ``plan --replan`` moves it aside, and
``train`` / ``predict`` refuse a fold whose checkpoint was trained with another plan.

One small work folder with fold 0 of 3d_fullres trained (1 epoch of 2 iterations) is made per module; each test
works on a copy of it through the CLI (``CliRunner``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from automedseg.cli import main
from automedseg.demo import make_demo_dataset
from automedseg.locks import folder_lock
from automedseg.plans import Plans, to_jsonable
from automedseg.trained import check_fold_matches

torch.set_num_threads(1)


@dataclass
class Env:
    dataset: Path
    work: Path

    @property
    def fold(self) -> Path:
        return self.work / "3d_fullres" / "fold_0"

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, [a.format(dataset=self.dataset, work=self.work) for a in args])

    def plan(self, *extra: str) -> Result:
        return self.cli("plan", "{dataset}", "--work-dir", "{work}", "-j", "1", "--device", "reference-cpu-2core",
                        "-c", "3d_fullres", *extra)

    def config(self, name: str = "3d_fullres") -> dict[str, Any]:
        return to_jsonable(Plans.load(self.work / "plans.json").configurations[name])


TRAIN = ("train", "{dataset}", "--work-dir", "{work}", "-c", "3d_fullres", "-f", "0", "--workers", "0", "--threads",
         "1", "--device", "cpu", "--no-validate", "--epochs", "1", "--iterations-per-epoch", "2")
PREDICT = ("predict", "-i", "{dataset}/imagesTs", "-o", "{work}/../out", "-d", "{work}", "-c", "3d_fullres", "-f",
           "0", "--no-mirror", "--threads", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    env = Env(make_demo_dataset(root / "Dataset_Demo", n_cases=5, n_test=1, seed=2), root / "work")
    r = env.plan("--time-budget", "1m")
    assert r.exit_code == 0, r.output
    r = env.cli(*TRAIN)
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def env(trained: Path, tmp_path: Path) -> Env:
    shutil.copytree(trained, tmp_path / "c", symlinks=True)
    return Env(tmp_path / "c" / "Dataset_Demo", tmp_path / "c" / "work")


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _edit_plans(path: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data, data["configurations"]["3d_fullres"])
    path.write_text(json.dumps(data, indent=2) + "\n")


def _double_widths(_: dict, c: dict) -> None:
    c["network"]["features_per_stage"] = [2 * f for f in c["network"]["features_per_stage"]]


def _taller_patch(_: dict, c: dict) -> None:
    c["patch_size"][1] += 16


def _finer_spacing(_: dict, c: dict) -> None:
    c["spacing_mm"] = [c["spacing_mm"][0], 0.9, 0.9]


def _no_normalization(_: dict, c: dict) -> None:
    c["normalization"] = [{"scheme": "none"}]


def _extra_label(p: dict, _: dict) -> None:
    p["labels"]["extra"] = 3


# edit of the work folder's plans.json, the field the refusal must name
EDITS = [
    (_taller_patch, "patch_size"),
    (_double_widths, "network.features_per_stage"),
    (_finer_spacing, "spacing_mm"),
    (_no_normalization, "normalization"),
    (_extra_label, "labels"),
]


def test_plan_keeps_the_trained_configuration_and_replan_moves_it_aside(env: Env, tmp_path: Path) -> None:
    trained_config = env.config()
    r = env.plan("--time-budget", "20m")  # a longer budget: a fresh plan would differ
    assert r.exit_code == 0, r.output
    assert "keeping 3d_fullres as trained (checkpoints in fold_0; a fresh plan would differ" in r.output
    assert "--replan 3d_fullres" in r.output
    assert env.config() == trained_config

    r = env.plan("--time-budget", "20m", "--replan", "3d_fullres")
    assert r.exit_code == 0, r.output
    (moved,) = env.work.glob("3d_fullres.replaced-*")
    assert (moved / "fold_0" / "checkpoint_latest.pt").is_file()  # renamed, not deleted
    assert not env.fold.exists()
    assert "moved" in r.output and "keeping" not in r.output
    # the new plan is exactly what a fresh work folder gets
    fresh = Env(env.dataset, tmp_path / "fresh")
    assert fresh.plan("--time-budget", "20m", "--no-preprocess").exit_code == 0
    assert (env.work / "plans.json").read_bytes() == (fresh.work / "plans.json").read_bytes()
    assert env.config() != trained_config


def test_replan_of_a_configuration_not_planned_is_refused(env: Env) -> None:
    before = _hashes(env.work)
    r = env.plan("--time-budget", "20m", "--replan", "2d")
    assert r.exit_code == 2 and "--replan 2d" in r.output and "Traceback" not in r.output
    assert _hashes(env.work) == before


def test_replan_waits_for_nobody_while_a_fold_is_being_trained(env: Env) -> None:
    with folder_lock(env.fold, purpose="train 3d_fullres fold 0"):
        r = env.plan("--replan", "3d_fullres", "--no-preprocess")
    assert r.exit_code == 2 and "in use by process" in r.output
    assert env.fold.is_dir() and not list(env.work.glob("3d_fullres.replaced-*"))


def test_plan_restores_a_trained_configuration_that_plans_json_lost(env: Env) -> None:
    trained_config = env.config()
    _edit_plans(env.work / "plans.json", _taller_patch)  # as an older automedseg's silent re-plan left it
    r = env.plan("--time-budget", "1m")
    assert r.exit_code == 0, r.output
    assert "restoring the plan its folds were trained with" in r.output
    assert env.config()["patch_size"] == trained_config["patch_size"]
    check_fold_matches(Plans.load(env.work / "plans.json"), "3d_fullres", env.fold)  # train accepts it again


def test_plan_carries_over_a_trained_configuration_not_planned_this_time(env: Env) -> None:
    trained_config = env.config()
    r = env.cli("plan", "{dataset}", "--work-dir", "{work}", "-j", "1", "--device", "reference-cpu-2core", "-c", "2d",
                "--no-preprocess")
    assert r.exit_code == 0, r.output
    assert "keeping 3d_fullres as trained" in r.output and "not planned this time" in r.output
    assert set(Plans.load(env.work / "plans.json").configurations) == {"2d", "3d_fullres"}
    assert env.config() == trained_config


@pytest.mark.parametrize("command", [TRAIN, PREDICT], ids=["train", "predict"])
@pytest.mark.parametrize(("edit", "field"), EDITS, ids=[f for _, f in EDITS])
def test_train_and_predict_refuse_a_fold_trained_with_another_plan(env: Env, command: tuple[str, ...],
                                                                    edit: Callable, field: str) -> None:
    _edit_plans(env.work / "plans.json", edit)
    fold_before = _hashes(env.fold)
    r = env.cli(*command)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert f"({field}" in lines[0] and str(env.fold) in lines[0]
    assert "--replan 3d_fullres" in lines[0] and "-f 0 --restart" in lines[0]
    assert _hashes(env.fold) == fold_before
    assert not (env.work.parent / "out").exists() or not any((env.work.parent / "out").iterdir())


def test_train_restart_retrains_a_fold_on_the_current_plan(env: Env) -> None:
    _edit_plans(env.work / "plans.json", _taller_patch)
    r = env.cli(*TRAIN, "--restart")
    assert r.exit_code == 0, r.output
    check_fold_matches(Plans.load(env.work / "plans.json"), "3d_fullres", env.fold)


def test_a_matching_fold_is_trained_as_before(env: Env) -> None:
    r = env.cli(*TRAIN)
    assert r.exit_code == 0, r.output
    assert "already trained" in r.output
