"""benchmarks/quality_budget.py: automedseg's fold figures come through the owners' typed readers."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("quality_budget")


def _write_fold(fold_dir: Path, *, validated: bool) -> None:
    from automedseg.plans import (
        AugmentationPlan,
        ChannelNormalization,
        ConfigurationPlan,
        DeviceProfile,
        NetworkPlan,
        Plans,
        TrainingPlan,
    )
    from automedseg.training_log import EpochRecord, write_training_log
    from automedseg.validation_summary import summary_path, write_validation_summary

    net = NetworkPlan("plain_unet", (8, 16), ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)), (1, 1), (1,))
    cfg = ConfigurationPlan(
        name="3d_fullres", data_identifier="data_3d", dims=3, spacing_mm=(1.0, 1.0, 1.0), patch_size=(8, 16, 16),
        batch_size=2, median_shape=(8, 16, 16), normalization=(ChannelNormalization("zscore"),), image_order=3,
        label_order=1, separate_z=False, out_of_plane_order=0, network=net, augmentation=AugmentationPlan(),
        training=TrainingPlan(epochs=2, iterations_per_epoch=3, time_budget_s=60.0))
    fold_dir.mkdir(parents=True)
    Plans("Test", ("MRI",), {"background": 0, "a": 1}, (0, 1, 2), (1.0, 1.0, 1.0), (8, 16, 16),
          DeviceProfile("cpu", "test", 1, 1.0, ((8, 1.0),)), {"3d_fullres": cfg}).save(fold_dir / "plans.json")
    write_training_log(fold_dir / "log.jsonl", [
        EpochRecord(epoch=i, epoch_seconds=10.0 + i, iterations=3, ema_pseudo_dice=0.3 * i) for i in range(2)])
    if validated:
        summary_path(fold_dir).parent.mkdir()
        write_validation_summary(summary_path(fold_dir), {"cases": ["x", "y"], "mean_dice": 0.75,
                                                          "dice_per_class": {"1": 0.75}, "seconds": 3.0})


def test_read_automedseg_fold(bench, tmp_path: Path) -> None:
    _write_fold(tmp_path / "3d_fullres" / "fold_0", validated=True)
    fig = bench.read_automedseg_fold(tmp_path)
    assert fig["mean_dice"] == 0.75 and fig["dice_per_class"] == {"1": 0.75} and fig["val_cases"] == ["x", "y"]
    assert fig["epochs"] == 2 and fig["iterations"] == 6 and fig["train_seconds"] == 21.0
    assert fig["epoch_seconds"] == [10.0, 11.0] and fig["final_ema_pseudo_dice"] == pytest.approx(0.3)
    assert fig["batch_size"] == 2 and fig["patch_size"] == [8, 16, 16] and fig["features_per_stage"] == [8, 16]
    assert fig["plan_time_budget_s"] == 60.0 and fig["iterations_per_epoch"] == 3 and fig["validation_s"] == 3.0


def test_read_automedseg_fold_not_validated(bench, tmp_path: Path) -> None:
    _write_fold(tmp_path / "3d_fullres" / "fold_0", validated=False)
    with pytest.raises(SystemExit, match="summary.json: missing"):
        bench.read_automedseg_fold(tmp_path)
