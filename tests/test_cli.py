"""CLI tests through click's CliRunner on a tiny planned and trained work folder (fold 0, one short epoch).

The commands only parse options, call the library and print; these tests check the wiring: exit codes,
what is printed and which files appear.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from automedseg import model_selection
from automedseg.best_choice import read_find_best
from automedseg.cli import main
from automedseg.plans import Plans
from automedseg.postprocessing import Postprocessing

COMMANDS = sorted(main.commands)
NX = "/nonexistent/automedseg-test"


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
    best = read_find_best(work / "find_best.json").best
    assert best.configuration == "3d_fullres" and best.postprocessing is not None and best.postprocessing.chosen
    # the winner, its post-processing (before -> after) and the predict hint, once each
    assert r.output.count("best: 3d_fullres (CV mean Dice") == 1 and r.output.count("predict with") == 1
    assert r.output.count(best.predict_command) == 1 and r.output.count("post-processing: ") == 1
    pp = best.postprocessing
    assert f"post-processing: {pp.describe()} ({pp.file})" in r.output
    assert "none adopted" in pp.describe() or f"mean Dice {pp.dice_before['mean']:.4f} -> " in r.output
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
    assert r.exit_code == 2 and r.output == f"{tmp_path / 'nowhere'}: dataset or work folder does not exist\n"
    (tmp_path / "empty").mkdir()
    r = runner.invoke(main, ["predict", "-i", str(dataset / "imagesTs"), "-o", str(tmp_path / "p"),
                             "-d", str(tmp_path / "empty")])
    assert r.exit_code == 2 and f"no work folder at {tmp_path / 'empty' / 'automedseg'}" in r.output
    assert not (tmp_path / "pred").exists() and not (tmp_path / "p").exists()


def test_evaluate(trained: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, _ = trained
    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["evaluate", str(dataset / "labelsTs"), str(dataset / "labelsTs"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "label 1: Dice 1.0000" in r.output and f"written to {out}" in r.output
    assert any(out.iterdir())


def test_search_one_tiny_trial(copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The search command's wiring: one trial of 2 epochs (not the 20 of a real trial) of the fewest iterations
    (a 1 s trial budget), adopted unconfirmed."""
    dataset, work = copy
    monkeypatch.setattr("automedseg.search.TRIAL_EPOCHS", 2)
    r = CliRunner().invoke(main, ["search", str(dataset), "--work-dir", str(work), "-c", "3d_fullres",
                                  "--trials", "1", "--trial-budget", "1s", "--pruner", "none", "--seed", "0",
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


def test_find_best_says_when_no_postprocessing_is_adopted(copy: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, work = copy

    def nothing_helps(*_: object, **__: object) -> Postprocessing:
        return Postprocessing(labels=(1, 2), keep_largest_foreground=False, keep_largest_labels=(), min_voxels={},
                              dice_before={"1": 0.9, "2": 0.8, "mean": 0.85}, dice_after={"1": 0.9, "2": 0.8,
                                                                                          "mean": 0.85})

    monkeypatch.setattr(model_selection, "determine_postprocessing", nothing_helps)
    runner = CliRunner()
    r = runner.invoke(main, ["find-best", str(dataset), "--work-dir", str(work), "--no-ensembles"])
    assert r.exit_code == 0, r.output
    assert "post-processing: none adopted: no operation raised the mean Dice (0.8500)" in r.output
    r = runner.invoke(main, ["find-best", str(dataset), "--work-dir", str(work), "--no-postprocessing"])
    assert r.exit_code == 0, r.output
    assert r.output.count("post-processing: not chosen") == 1 and r.output.count("predict with") == 1


@pytest.mark.parametrize(("args", "first_line"), [
    (["plan", NX], f"{NX}: dataset folder does not exist"),
    (["plan", "{tmp}/file.txt"], "{tmp}/file.txt: is not a dataset folder (it is a file)"),
    (["check", NX], f"{NX}: dataset folder does not exist"),
    (["train", NX], f"{NX}: dataset folder does not exist"),
    (["train", "{tmp}", "--work-dir", NX],
     f"{NX}: work folder does not exist; run `automedseg plan {{tmp}} --work-dir {NX}` first"),
    (["search", NX, "--trials", "1"], f"{NX}: dataset folder does not exist"),
    (["find-best", NX], f"{NX}: dataset or work folder does not exist"),
    (["find-best", "{tmp}", "--work-dir", NX], f"{NX}: work folder does not exist"),
    (["report", NX], f"{NX}: dataset or work folder does not exist"),
    (["export", NX, "-o", "{tmp}/model.zip"], f"{NX}: dataset or work folder does not exist"),
    (["predict", "-i", "{tmp}", "-o", "{tmp}/out", "-d", NX], f"{NX}: dataset or work folder does not exist"),
    (["predict", "-i", "{tmp}", "-o", "{tmp}/out", "-d", NX, "-c", "3d_fullres", "-f", "0"],
     f"{NX}: dataset or work folder does not exist"),
    (["predict", "-i", "{tmp}", "-o", "{tmp}/out", "-d", "{tmp}", "--work-dir", NX],
     f"{NX}: work folder does not exist"),
    (["predict", "-i", NX, "-o", "{tmp}/out", "-d", "{tmp}/work"], f"{NX}: input folder does not exist"),
    (["evaluate", NX, "{tmp}"], f"{NX}: reference folder does not exist"),
    (["evaluate", "{tmp}", NX], f"{NX}: prediction folder does not exist"),
])
def test_a_missing_folder_is_named_first(args: list[str], first_line: str, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("not a dataset")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "plans.json").write_text("{}")  # a work folder, as far as finding it goes
    r = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert r.output.splitlines()[0] == first_line.format(tmp=tmp_path)
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    assert not (tmp_path / "out").exists()


def test_argument_errors_are_answered_before_the_heavy_imports(tmp_path: Path) -> None:
    commands = [["plan", NX], ["train", NX], ["search", NX, "--trials", "1"], ["find-best", NX], ["report", NX],
                ["export", NX, "-o", str(tmp_path / "m.zip")], ["check", NX], ["evaluate", NX, NX],
                ["predict", "-i", NX, "-o", str(tmp_path / "out"), "-d", NX]]
    code = textwrap.dedent(f"""
        import sys
        from automedseg.cli import main
        for args in {commands!r}:
            try:
                main(args, prog_name="automedseg")
            except SystemExit as e:
                assert e.code == 2, (args, e.code)
            heavy = [m for m in ("torch", "SimpleITK", "scipy", "numpy", "optuna") if m in sys.modules]
            print(args[0], heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == [f"{args[0]} []" for args in commands], r.stdout + r.stderr
    assert r.stderr.splitlines()[0] == f"{NX}: dataset folder does not exist"


def _option(command: str, name: str) -> click.Option:
    return next(p for p in main.commands[command].params if isinstance(p, click.Option) and name in p.opts)


def test_every_option_is_documented_and_repeatable_ones_say_so() -> None:
    for name, command in main.commands.items():
        for p in command.params:
            if isinstance(p, click.Option):
                assert p.help, f"{name} {p.opts[0]}: no help"
                assert not p.multiple or "repeatable" in p.help, f"{name} {p.opts[0]}: does not say it repeats"
    assert "default: 30m on a CPU" in (_option("plan", "--time-budget").help or "")
    assert "residual" in (_option("plan", "--architecture").help or "")
    assert "3d_fullres_searched" in (_option("train", "-c").help or "")
    assert "masks" in (_option("predict", "-o").help or "")
    for command in ("predict", "find-best", "train", "plan", "report", "export", "search"):
        assert "Work folder" in (_option(command, "--work-dir").help or ""), command
    for command in ("plan", "search"):
        assert "seed" in (_option(command, "--seed").help or "").lower(), command
