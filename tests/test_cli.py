"""CLI tests through click's CliRunner on a tiny planned and trained work folder (fold 0, one short epoch).

The commands only parse options, call the library and print; these tests check the wiring: exit codes,
what is printed and which files appear.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from automedseg.best_choice import read_find_best
from automedseg.cli import main
from automedseg.plans import Plans

COMMANDS = sorted(main.commands)


@pytest.fixture(scope="module")
def trained(trained_demo_validated: tuple[Path, Path]) -> tuple[Path, Path]:
    """Demo dataset (6 cases, 2 test cases), planned for 3d_fullres, fold 0 trained 1 epoch of 2 iterations
    (shared by the session: the tests change copies)."""
    return trained_demo_validated


@pytest.fixture
def copy(trained: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    dataset, work = trained
    shutil.copytree(work, tmp_path / "work")
    return dataset, tmp_path / "work"


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = "import sys; from automedseg.cli import main; print(sorted(m for m in ('torch', 'SimpleITK', 'scipy', " \
           "'numpy', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output and "--help" in r.output


def test_find_best_then_predict_with_its_choice(copy: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, work = copy
    runner = CliRunner()
    r = runner.invoke(main, ["find-best", str(dataset), "--work-dir", str(work), "--no-ensembles"])
    assert r.exit_code == 0, r.output
    assert "best: 3d_fullres" in r.output and "predict with:" in r.output
    best = read_find_best(work / "find_best.json").best
    assert best.configuration == "3d_fullres" and best.postprocessing is not None and best.postprocessing.chosen
    out = tmp_path / "pred"
    r = runner.invoke(main, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "-d", str(work),
                             "--device", "cpu", "--threads", "1", "--no-mirror"])
    assert r.exit_code == 0, r.output
    assert f"post-processing from {best.postprocessing.file}:" in r.output
    assert "2 written, 0 kept (exist), 0 failed" in r.output
    assert len(list(out.glob("*.nii.gz"))) == 2
    r = runner.invoke(main, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(out), "-d", str(dataset),
                             "--work-dir", str(work), "-c", "3d_fullres", "-f", "0", "--no-postprocessing",
                             "--device", "cpu", "--threads", "1", "--no-mirror"])
    assert r.exit_code == 0, r.output
    assert "0 written, 2 kept (exist), 0 failed" in r.output


def test_predict_input_errors(copy: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, work = copy
    runner = CliRunner()
    base = ["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "pred"), "-d", str(work),
            "--device", "cpu"]
    r = runner.invoke(main, base)  # no find_best.json yet
    assert r.exit_code == 2 and "find_best.json: missing" in r.output
    r = runner.invoke(main, [*base, "-c", "3d_fullres", "-f", "3"])
    assert r.exit_code == 2 and "fold_3: no trained checkpoint" in r.output
    r = runner.invoke(main, [*base, "-c", "3d_fullres", "-f", "7"])
    assert r.exit_code == 2 and "use a fold 0-4" in r.output
    r = runner.invoke(main, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "p"),
                             "-d", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no work folder" in r.output
    assert not (tmp_path / "pred").exists() and not (tmp_path / "p").exists()


def test_evaluate(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, _ = trained
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["evaluate", str(dataset / "labelsTs"), str(dataset / "labelsTs"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "label 1: Dice 1.0000" in r.output and f"written to {out}" in r.output
    assert any(out.iterdir())


def test_search_one_tiny_trial(copy: tuple[Path, Path]) -> None:
    dataset, work = copy
    r = CliRunner().invoke(main, ["search", str(dataset), "--work-dir", str(work), "-c", "3d_fullres",
                                  "--trials", "1", "--trial-budget", "15s", "--pruner", "none", "--seed", "0",
                                  "--device", "cpu", "--threads", "1", "--fidelity", "short", "--confirm", "0"])
    assert r.exit_code == 0, r.output
    assert "1 complete, 0 pruned, 0 failed" in r.output, r.output  # pruner none: the rule-plan trial completes
    # --confirm 0: adopted without the full-budget comparison, and the output and the plan's notes say so
    assert "-> 3d_fullres_searched (UNCONFIRMED); train it with `automedseg train" in r.output, r.output
    assert "report: " in r.output
    assert (work / "search" / "search.db").is_file()
    searched = Plans.load(work / "plans.json").configurations["3d_fullres_searched"]
    assert any(n.startswith("unconfirmed: ") for n in searched.notes)


def test_search_without_a_plan(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["search", str(tmp_path), "--trials", "1"])
    assert r.exit_code == 2 and "no plan yet" in r.output
