"""``automedseg demo`` run twice: the second run re-plans nothing, retrains nothing and reports the same figures;
each run prints the prediction counts as ``predict`` does and ends with the report's path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from automedseg import calibration_step, calibration_timing, planning
from automedseg.calibration_timing import DataThroughput
from automedseg.pipeline import run_demo

torch.set_num_threads(1)
TABLE = ((8, 210.0), (16, 610.0), (32, 1000.0), (64, 1400.0))
WIDTHS = ((8, 100.0), (16, 220.0), (32, 300.0))
STEPS = calibration_step.CalibratedSteps(WIDTHS, WIDTHS, ((2, "w32 128x128 b2", 120.0),))  # the timed training steps


def _hashes(folder: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern)) if p.is_file()}


def test_demo_twice_replans_nothing_and_retrains_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def timing(**kwargs: object) -> tuple[tuple[int, float], ...]:
        calls.append(kwargs)
        return TABLE

    monkeypatch.setattr(planning, "calibrate_conv_gflops", timing)
    monkeypatch.setattr(calibration_timing, "calibrate_data_throughput",
                        lambda **_: DataThroughput(2e8, ((2, 6e6), (3, 5.5e6))))
    monkeypatch.setattr(calibration_step, "calibrate_steps", lambda **_: STEPS)
    monkeypatch.setattr(calibration_step, "calibrate_placement", lambda **_: ("shared", (("shared", 0.3),)))
    options = dict(n_cases=5, n_test=1, time_budget_s=8.0, jobs=1, threads=1,
                   calibration_cache=tmp_path / "calibration.json", progress=False)
    first_log: list[str] = []
    first = run_demo(tmp_path, log=first_log.append, **options)
    work = tmp_path / "Dataset_Demo" / "automedseg"
    plans = (work / "plans.json").read_bytes()
    fold = _hashes(work / "3d_fullres" / "fold_0", "checkpoint_*.pt")
    predictions = _hashes(work / "predictions_imagesTs", "**/*")
    assert [c.get("dims", 3) for c in calls] == [3, 2] and fold  # one calibration: 3D and 2D convolutions

    def no_timing(**_: object) -> None:
        raise AssertionError("the second demo timed the device again")

    monkeypatch.setattr(planning, "calibrate_conv_gflops", no_timing)
    monkeypatch.setattr(calibration_timing, "calibrate_data_throughput", no_timing)
    monkeypatch.setattr(calibration_step, "calibrate_steps", no_timing)
    monkeypatch.setattr(calibration_step, "calibrate_placement", no_timing)
    second_log: list[str] = []
    second = run_demo(tmp_path, log=second_log.append, **options)
    text = "\n".join(second_log)
    assert (work / "plans.json").read_bytes() == plans  # re-plans nothing
    assert "keeping 3d_fullres as trained" in text and "a fresh plan is the same" in text
    assert "already trained" in text and not any(line.startswith("epoch ") for line in second_log)  # retrains nothing
    assert _hashes(work / "3d_fullres" / "fold_0", "checkpoint_*.pt") == fold
    assert _hashes(work / "predictions_imagesTs", "**/*") == predictions
    # the counts as `automedseg predict` prints them
    assert any(line.startswith("   1 written, 0 kept (exist), 0 failed; ") for line in first_log), first_log
    assert any(line.startswith("   0 written, 1 kept (exist), 0 failed; ") for line in second_log), second_log
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)  # the same figures
    done = [line for line in first_log if line.startswith("done: ")]
    assert len(done) == 1 and done == [line for line in second_log if line.startswith("done: ")]
    # it ends by writing the report and saying where
    report = work / "report" / "report.html"
    assert report.is_file()
    assert first_log[-1] == second_log[-1] == f"report: {report} and {report.with_name('report.md')}"
