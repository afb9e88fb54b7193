"""Report tests on a tiny trained demo dataset: fold 0 of 3d_fullres and 2d, one short epoch each."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from automedseg.demo import make_demo_dataset
from automedseg.model_selection import find_best
from automedseg.pipeline import run_plan
from automedseg.plans import ConfigurationPlan, Plans
from automedseg.postprocessing import Postprocessing
from automedseg.report import collect_state, write_report
from automedseg.report_render import _dice_limits
from automedseg.report_sections import _boxplot_figure
from automedseg.report_state import _cv_cases
from automedseg.training import TrainOptions, train_fold
from automedseg.workspace import Workspace

torch.set_num_threads(1)

CONFIGS = ("3d_fullres", "2d")
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Workspace]:
    """Demo dataset (6 cases), planned, fold 0 of both configurations trained and validated."""
    root = tmp_path_factory.mktemp("report")
    dataset = make_demo_dataset(root / "Dataset_Demo", n_cases=6, n_test=0)
    ws = Workspace.for_dataset(dataset)
    run_plan(dataset, ws, configurations=list(CONFIGS), jobs=1, device="reference-cpu-2core", time_budget_s=30)
    options = TrainOptions(epochs=1, iterations_per_epoch=2, num_workers=0, threads=1, progress=False, device="cpu")
    for cfg in CONFIGS:
        train_fold(ws, cfg, 0, options=options, log=lambda _: None)
    return dataset, ws


def _copy(ws: Workspace, dest: Path) -> Workspace:
    shutil.copytree(ws.root, dest, ignore=shutil.ignore_patterns("report"))
    return Workspace(dest)


def _read(html_path: Path) -> tuple[str, str]:
    return html_path.read_text(), (html_path.parent / "report.md").read_text()


def test_report_is_self_contained_with_tables_and_figures(trained: tuple[Path, Workspace]) -> None:
    _, ws = trained
    html_path = write_report(ws)
    assert html_path == ws.root / "report" / "report.html"
    html, md = _read(html_path)
    images = DATA_URI.findall(html)
    # box plot, two training-curve figures, and at least one overlay per configuration
    assert len(images) >= 5
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert not re.search(r'(src|href)="(https?:|//)', html) and "<link" not in html and "<script" not in html
    for needle in ("Cross-validation results", "HD95 (mm)", "NSD", "Per-case Dice", "Training curves", "Time",
                   "Plans", "Validation overlays", "Machine", "Missing", "torch", "nominal 2-core"):
        assert needle in html, needle
        assert needle in md, needle
    assert html.count("<table>") >= 6
    for cfg in CONFIGS:
        assert f"<td>{cfg}</td>" in html
        assert f"fig_curves_{cfg}.png" in md
    # the Markdown's figures are files next to it
    figures = re.findall(r"\]\((fig_[^)]+\.png)\)", md)
    assert figures and all((html_path.parent / f).is_file() for f in figures)
    # the plans differ in dims and patch size between the two configurations
    assert "patch_size" in md and "dims" in md


def test_report_lists_what_is_missing(trained: tuple[Path, Workspace], tmp_path: Path) -> None:
    _, ws = trained
    html, md = _read(write_report(ws, tmp_path / "out"))
    for text in (html, md):
        assert "3d_fullres: folds 1, 2, 3, 4 not trained" in text
        assert "2d: folds 1, 2, 3, 4 not trained" in text
        assert "find_best.json: missing" in text
        assert "no best configuration, ensemble or post-processing chosen yet" in text


@pytest.mark.parametrize("remove, expected", [
    (["fold_0/checkpoint_final.pt", "fold_0/validation"], "2d: fold 0 not finished (1 of 1 epochs logged"),
    (["fold_0/validation/summary.json"], "2d: fold 0 not validated"),
    (["fold_0"], "2d: folds 0, 1, 2, 3, 4 not trained"),
])
def test_report_partial_fold_states(trained: tuple[Path, Workspace], tmp_path: Path, remove: list[str],
                                    expected: str) -> None:
    _, ws = trained
    copy = _copy(ws, tmp_path / "work")
    for rel in remove:
        target = copy.configuration_dir("2d") / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    html, md = _read(write_report(copy))
    assert expected in html and expected in md
    assert "3d_fullres: folds 1, 2, 3, 4 not trained" in md
    assert "<td>3d_fullres</td>" in html  # the trained configuration is still reported


@pytest.mark.parametrize("files, expected", [
    ([], "plans.json: missing"),
    (["plans.json"], "3d_fullres: folds 0, 1, 2, 3, 4 not trained"),
])
def test_report_before_training(trained: tuple[Path, Workspace], tmp_path: Path, files: list[str],
                                expected: str) -> None:
    _, ws = trained
    work = tmp_path / "work"
    work.mkdir()
    for name in files:
        shutil.copy(ws.root / name, work / name)
    html, md = _read(write_report(Workspace(work)))
    assert expected in html and expected in md
    assert "data:image/png" not in html  # nothing to plot yet
    assert "No validated case yet." in md


def test_report_without_work_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no work folder"):
        write_report(Workspace(tmp_path / "absent"))


def test_report_marks_the_chosen_ensemble(trained: tuple[Path, Workspace], tmp_path: Path) -> None:
    _, ws = trained
    copy = _copy(ws, tmp_path / "work")
    result = find_best(copy)
    chosen = result.best.configuration
    html, md = _read(write_report(copy))
    assert "2d+3d_fullres" in html
    rows = re.findall(r'<tr class="chosen">(.*?)</tr>', html)
    assert any(f"<td>{chosen}</td>" in r and "<td>chosen</td>" in r for r in rows)  # the candidates table
    assert "find_best.json: missing" not in md
    pp = result.best.postprocessing
    if pp is not None and pp.chosen:
        assert "Post-processing chosen" in md
        if "+" not in chosen:
            assert "Dice after PP" in md


def test_collect_state_reads_folds(trained: tuple[Path, Workspace]) -> None:
    _, ws = trained
    state = collect_state(ws)
    assert sorted(state.configurations) == sorted(CONFIGS)
    assert state.expected_folds == ["0", "1", "2", "3", "4"]
    assert state.labels == {1: "outer", 2: "core"}
    assert isinstance(state.plans, Plans) and state.dataset_name == state.plans.dataset_name
    for cfg in CONFIGS:
        record = state.configurations[cfg]
        fold = record.folds["0"]
        assert fold.finished and fold.validated and len(fold.history) == 1
        assert fold.planned_epochs == 1 and fold.train_seconds > 0
        assert isinstance(fold.plan, ConfigurationPlan) and fold.plan.name == cfg  # the fold's plans.json copy
        assert record.data_identifier == record.plan.data_identifier
    assert not state.problems


def test_report_shows_a_configurations_postprocessing(trained: tuple[Path, Workspace], tmp_path: Path) -> None:
    _, ws = trained
    copy = _copy(ws, tmp_path / "work")
    Postprocessing(labels=(1, 2), keep_largest_foreground=True, keep_largest_labels=(), min_voxels={"2": 5},
                   n_cases=3, dice_before={"1": 0.5, "2": 0.4, "mean": 0.45},
                   dice_after={"1": 0.6, "2": 0.5, "mean": 0.55}).save(copy.postprocessing_path("2d"))
    assert collect_state(copy).configurations["2d"].postprocessing.n_cases == 3
    _, md = _read(write_report(copy))
    assert "Dice after PP" in md and "0.5500" in md
    assert ("Post-processing chosen on 3 cases: keep the largest foreground component; remove components of class 2 "
            "smaller than 5 voxels.") in md


@pytest.mark.parametrize("rel, content, expected", [
    ("2d/fold_0/plans.json", '{"dataset_name": 3}', "fold_0/plans.json: plans.dataset_name: expected a string"),
    ("2d/postprocessing.json", '{"keep_largest_foreground": "yes", "keep_largest_labels": [], "min_voxels": {}}',
     "postprocessing.json.keep_largest_foreground: expected true or false"),
    ("splits.json", "[1]", "splits.json: expected a list"),
    ("find_best.json", '{"best": {"configuration": 2}}', "find_best.json.best.configuration: expected a string"),
])
def test_report_lists_unreadable_files_with_the_field(trained: tuple[Path, Workspace], tmp_path: Path, rel: str,
                                                      content: str, expected: str) -> None:
    _, ws = trained
    copy = _copy(ws, tmp_path / "work")
    (copy.root / rel).write_text(content)
    assert any(expected in line for line in collect_state(copy).problems)
    _, md = _read(write_report(copy))
    assert expected in md and "(ignored)" in md


def test_cli_report(trained: tuple[Path, Workspace], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from automedseg.cli import main

    if "report" not in main.commands:
        pytest.skip("the report command is not in the CLI yet")
    dataset, _ = trained
    out = tmp_path / "cli_report"
    result = CliRunner().invoke(main, ["report", str(dataset), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


@pytest.mark.parametrize("values, lo, hi", [
    ([0.97, 0.99], 0.94, 1.01),  # near 1: a narrow window, clamped at 1 (plus the pad)
    ([1.0, 1.0], 0.94, 1.01),  # all equal: at least the minimum span
    ([0.2, 0.9], 0.12, 0.98),  # 10 % margin each side
    ([0.0, 1.0], -0.01, 1.01),  # the whole range
    ([0.0, 0.01], -0.01, 0.06),
    ([], -0.01, 1.01),  # nothing finite: the whole range
    ([float("nan"), 0.5], 0.465, 0.535),
])
def test_dice_limits_scale_to_the_data(values: list[float], lo: float, hi: float) -> None:
    assert _dice_limits(values) == pytest.approx((lo, hi))


def test_boxplot_axes_are_scaled_to_the_cases(trained: tuple[Path, Workspace]) -> None:
    _, ws = trained
    state = collect_state(ws)
    data = {name: _cv_cases(r, state.expected_folds) for name, r in state.configurations.items()}
    fig = _boxplot_figure(state, data)
    assert len(fig.axes) == len(state.labels)
    for ax, label in zip(fig.axes, state.labels):
        dice = [(c["metrics"].get(str(label)) or {}).get("dice") for cases in data.values() for _, c in cases]
        finite = [float(d) for d in dice if d is not None and np.isfinite(d)]
        assert finite
        assert ax.get_ylim() == pytest.approx(_dice_limits(finite))
        assert ax.get_ylim()[0] <= min(finite) and ax.get_ylim()[1] >= max(finite)
