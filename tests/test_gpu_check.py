"""benchmarks/gpu_check.py without a GPU: a clear message and exit code 2; its report renders partial figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device is available here" in proc.stderr


def test_the_report_renders_what_a_failed_run_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    md = gpu_check.render({"data": "/d/msd_hippocampus", "status": "FAIL", "error": "plan failed (exit 1)",
                           "steps": {"plan": {"seconds": 3.0, "returncode": 1}}, "folds": {}, "gpu": {},
                           "machine": {}})
    assert "# GPU check (msd_hippocampus, 3d_fullres)" in md and "**FAIL**" in md and "plan failed" in md


def _write_fold(fold_dir: Path, *, with_time: bool) -> None:
    """A finished 3d_fullres fold: plan copy, two logged epochs, a validation summary."""
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
        training=TrainingPlan(epochs=2, iterations_per_epoch=3, precision="bf16"))
    fold_dir.mkdir(parents=True)
    Plans("Test", ("MRI",), {"background": 0, "a": 1}, (0, 1, 2), (1.0, 1.0, 1.0), (8, 16, 16),
          DeviceProfile("cuda", "test", 1, 1.0, ((8, 1.0),)), {"3d_fullres": cfg}).save(fold_dir / "plans.json")
    write_training_log(fold_dir / "log.jsonl", [
        EpochRecord(epoch=i, epoch_seconds=10.0, iterations=3, seconds_per_iteration=0.5 + i,
                    data_wait_fraction=0.1 * (i + 1), time=100.0 + 10 * i if with_time else None) for i in range(2)])
    summary_path(fold_dir).parent.mkdir()
    write_validation_summary(summary_path(fold_dir), {"cases": ["x"], "mean_dice": 0.75})


@pytest.mark.parametrize("with_time", [True, False])
def test_fold_figures_read_through_the_typed_readers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     with_time: bool) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    _write_fold(tmp_path / "fold_0", with_time=with_time)
    fig = gpu_check.fold_figures(tmp_path / "fold_0")
    assert fig["epochs"] == 2 and fig["iterations"] == 6 and fig["train_seconds"] == 20.0
    assert fig["seconds_per_iteration"] == 1.0 and fig["data_wait_mean"] == pytest.approx(0.15)
    assert fig["data_wait_after_first_epoch"] == pytest.approx(0.2)
    assert fig["precision"] == "bf16" and fig["batch_size"] == 2 and fig["patch_size"] == [8, 16, 16]
    assert fig["validation_mean_dice"] == 0.75
    if with_time:
        assert fig["window"] == (90.0, 110.0)
    assert gpu_check.fold_figures(tmp_path / "absent") == {"epochs": 0}
