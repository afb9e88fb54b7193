"""benchmarks/worker_speed.py: both variants on a small synthetic cached case give the same labels; the summary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from automedseg.calibration_step import reference_step_config
from automedseg.calibration_timing import synthetic_case
from automedseg.plans import AugmentationPlan


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("worker_speed")


def test_the_variant_is_restored_and_checked(bench) -> None:
    import automedseg.augmentation_transforms as transforms

    original = transforms.resample_labels_linear
    with bench.label_resampling("per label"):
        assert transforms.resample_labels_linear is not original
    assert transforms.resample_labels_linear is original
    with pytest.raises(ValueError, match="unknown variant"), bench.label_resampling("nearest"):
        pass


def test_both_variants_give_the_same_labels(bench, tmp_path: Path) -> None:
    synthetic_case(tmp_path, 2)
    config = reference_step_config(2, 8, patch=(64, 64))
    config = dataclasses.replace(config, augmentation=AugmentationPlan(rotation_p=1.0, scale_p=1.0))
    result = bench.time_worker(tmp_path, ["case"], config, batches=2, blocks=2)
    assert result["labels_identical"] is True
    assert set(result["cpu_s_per_batch"]) == {"per label", "one pass"} and result["speedup"] > 0
    assert [len(v) for v in result["blocks_cpu_s_per_batch"].values()] == [2, 2]
    _, labels = bench.make_batches(tmp_path, ["case"], config, batches=1, seed=1)
    assert len(np.unique(labels[0])) >= 2  # the synthetic case's labels made it through the rotations


def test_cached_cases_and_summary(bench, tmp_path: Path) -> None:
    for case in ("b", "a"):
        np.save(tmp_path / f"{case}.npy", np.zeros((1, 2, 2), np.float32))
        np.save(tmp_path / f"{case}_seg.npy", np.zeros((1, 2, 2), np.int8))
    assert bench.cached_cases(tmp_path) == ["a", "b"]
    case = {"dataset": "d", "configuration": "3d_fullres", "patch_size": [8, 8, 8], "batch_size": 2, "labels": 8,
            "cpu_s_per_batch": {"per label": 0.2, "one pass": 0.1}, "speedup": 2.0, "labels_identical": True}
    figures = {"command": "python benchmarks/worker_speed.py", "machine": {"cpu_model": "cpu", "cpu_count_logical": 2,
               "python": "3.11", "torch": "2"}, "batches": 20, "blocks": 4, "cases": [case]}
    text = bench.build_summary(json.loads(json.dumps(figures)))
    assert "| d | 3d_fullres | 2 x [8, 8, 8] | 8 | 0.200 | 0.100 | 2.00x | yes |" in text


def test_dry_run(bench, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--dry-run"]) == 0
    assert "4 configurations x 2 variants" in capsys.readouterr().out
