"""benchmarks/step_shape_quality.py: the plan without the step shape split, the arms read back, the summary (no
command is run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from automedseg.fingerprint import save_fingerprint
from automedseg.planning import NOMINAL_PROFILES, plan_dataset
from automedseg.plans import Plans, StepShapeCost

SHAPE_2D = StepShapeCost(2, ((8, 0.141), (16, 0.149), (32, 0.153)), 0.05)  # parameters expensive
CPU = dataclasses.replace(NOMINAL_PROFILES["reference-cpu-2core"],
                          step_gflops_by_width_2d=((8, 60.0), (16, 140.0), (32, 230.0)), step_shape_costs=(SHAPE_2D,))


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("step_shape_quality")


def test_the_throughput_plan_is_the_same_device_without_the_split(bench, synthetic_fingerprint,
                                                                   tmp_path: Path) -> None:
    fp = synthetic_fingerprint([(1.0, 0.8, 0.8)] * 20, [(60, 128, 128)] * 20)  # 2d: 128x128, as openkbp_hn_ct
    split_work, out = tmp_path / "split", tmp_path / "throughput"
    split_work.mkdir()
    save_fingerprint(fp, split_work / "fingerprint.json")
    (split_work / "preprocessed").mkdir()
    (split_work / "splits.json").write_text("[]")
    split = plan_dataset(fp, device=CPU, time_budget_s=600, configurations=["2d"])
    split.save(split_work / "plans.json")
    bench.throughput_plan(split_work, out, "2d", 600)
    plans = Plans.load(out / "plans.json")
    assert plans.device == dataclasses.replace(CPU, step_shape_costs=None)
    assert plans == plan_dataset(fp, device=plans.device, time_budget_s=600, configurations=["2d"])
    assert (out / "preprocessed").resolve() == (split_work / "preprocessed").resolve()
    assert (out / "splits.json").read_text() == "[]"
    # parameters charged: the split plan's network has fewer parameters than the one planned without the charge
    from automedseg.network_cost import estimate_parameters

    a, b = split.configuration("2d").network, plans.configuration("2d").network
    assert a != b
    kw = {"in_channels": 1, "num_classes": 2, "dims": 2}
    assert estimate_parameters(a, **kw) < estimate_parameters(b, **kw)


def test_the_summary(bench) -> None:
    arm = {"features": [32, 64], "batch": 2, "patch": [128, 128], "planned_s": 0.3, "measured_s": 0.32,
           "epochs_trained": 12, "epochs_planned": 12, "mean_dice": 0.5, "case_dice": {}, "other_cpu": 0.01}
    figures = {"dataset": "d", "configuration": "2d", "budget": "5m", "command": "python x", "machine":
               {"cpu_model": "cpu", "torch": "2.13"}, "arms": {"split": arm, "throughput": {**arm, "mean_dice": 0.4}},
               "dice_difference": 0.1, "bootstrap": {"probability": None, "n_cases": 1}}
    text = bench.build_summary(figures)
    assert "| split | 32-64 | 2 x 128x128 | 0.300 | 0.320 | 12 of 12 | 0.5000 | 0.01 |" in text
    assert "(split - throughput): +0.1000" in text and "P(split better) = -." in text
    unscored = {**figures, "arms": {"split": {**arm, "mean_dice": None}, "throughput": arm}, "dice_difference": None}
    assert "| - | 0.01 |" in bench.build_summary(unscored) and "throughput): -;" in bench.build_summary(unscored)
