"""benchmarks/calibration_check.py: iterations sized from the plan, the measured step without the first epoch, the
verdict, the summary and the dry run (no command is run)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("calibration_check")


def test_doctests(bench) -> None:
    assert doctest.testmod(bench).failed == 0


@pytest.mark.parametrize(("predicted", "measured", "status"), [
    (0.16, 0.184, "PASS"), (0.16, 0.136, "PASS"), (0.16, 0.19, "FAIL"), (0.287, 0.150, "FAIL"), (0.2, None, "-"),
])
def test_verdict(bench, predicted: float, measured: float | None, status: str) -> None:
    assert bench.verdict(predicted, measured)["status"] == status


def _plan_row() -> dict:
    return {"predicted_s": 0.16, "features_per_stage": [8, 16, 32, 64], "patch_size": [40, 56, 40], "batch_size": 2,
            "note": "width 8, batch 2, patch [40, 56, 40]: ~0.16 s/iteration", "device": "AMD EPYC, 2 threads",
            "calibration": "AMD EPYC, 2 threads, torch 2.13.0, bf16, measured 2026-12-02T00:00:00Z",
            "step_gflops_by_width": [[8, 107.6]], "step_gflops_by_width_2d": [[8, 60.0]]}


def test_check_configuration_compares_the_plan_with_the_log(bench, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_cli(args: list, **_: object) -> dict:
        calls.append([str(a) for a in args])
        fold = tmp_path / "3d_fullres" / "fold_0"
        fold.mkdir(parents=True)
        epochs = [{"epoch": i, "seconds_per_iteration": s, "planned_seconds_per_iteration": 0.16,
                   "data_wait_fraction": 0.01} for i, s in enumerate([0.4, 0.17, 0.18, 0.16])]
        (fold / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
        return {"wall_s": 80.0, "foreign_cores": 0.02, "log": "x.log"}

    monkeypatch.setattr(bench, "_run_cli", fake_cli)
    monkeypatch.setattr(bench, "read_plan", lambda work, configuration: _plan_row())
    row = bench.check_configuration(tmp_path / "Dataset", tmp_path, "3d_fullres", epochs=4, epoch_seconds=20.0,
                                    logs=tmp_path, env={})
    assert calls[0][:1] == ["train"] and calls[0][calls[0].index("--iterations-per-epoch") + 1] == "125"
    assert (row["measured_s"], row["ratio"], row["status"], row["epochs"]) == (0.17, 1.062, "PASS", 4)
    assert row["planned_in_log_s"] == 0.16 and row["foreign_cores"] == 0.02
    figures = {"command": "python benchmarks/calibration_check.py", "configurations": ["3d_fullres"], "epochs": 4,
               "epoch_seconds": 20.0, "machine": {"cpu_model": "AMD EPYC", "cpu_count_usable": 2}, "checks": [row]}
    text = bench.build_summary(figures)
    assert "| Dataset | 3d_fullres | 8-16-32-64 | 2 x 40x56x40 | 0.160 | 0.170 | 1.06 | PASS | 4 x 125 | 0.02 |" in text
    assert "1 of 1 within 15%" in text


def test_dry_run_runs_nothing(bench, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "_run_cli", lambda *a, **k: pytest.fail("a command was run"))
    assert bench.main(["--dry-run", "--data-root", str(tmp_path), "--work-root", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "msd_hippocampus" in out and "(MISSING)" in out and "estimated time: ~" in out
    assert not (tmp_path / "w").exists()


def test_options_are_checked(bench) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--epochs", "1"])
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--configurations", "3d_lowres"])
