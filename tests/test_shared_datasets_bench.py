"""benchmarks/shared_datasets.py: the scores it computes itself (FOV-restricted Dice, ISBI pixel error, verdicts)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from automedseg.training_log import EpochRecord, write_training_log

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "shared_datasets.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("shared_datasets_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).astype(np.uint8)


def test_fov_restriction_ignores_everything_outside_the_fov(bench):
    fov = _disc((64, 64), (32, 32), 24)
    ref = np.zeros((64, 64), np.uint8)
    ref[30:34, 10:54] = 1  # a vessel crossing the FOV
    pred = ref.copy()
    pred[0:5, 0:5] = 1  # false positives outside the FOV (the dark border of a fundus image)
    ref[60:64, 0:4] = 1  # a reference pixel outside the FOV (ignored too)
    masked_ref, masked_pred = bench.restrict_to_fov(ref, pred, fov)
    assert masked_ref[fov == 0].max() == 0 and masked_pred[fov == 0].max() == 0
    scores = bench.fov_case_scores(ref, pred, fov, labels=[1], spacing_mm=(1.0, 1.0))
    assert scores["metrics"]["1"]["dice"] == pytest.approx(1.0)
    assert scores["counts"]["1"]["fp"] == 0 and scores["counts"]["1"]["fn"] == 0
    assert scores["accuracy_in_fov"] == pytest.approx(1.0)
    assert scores["fov_pixels"] == int(fov.sum())
    # whole image, the same masks score below 1
    assert 2 * (ref & pred).sum() / (ref.sum() + pred.sum()) < 1


def test_fov_scores_inside_the_fov(bench):
    fov = np.ones((10, 10), np.uint8)
    fov[:, 5:] = 0
    ref = np.zeros((10, 10), np.uint8)
    pred = np.zeros((10, 10), np.uint8)
    ref[0:2, 0:5] = 1  # 10 pixels
    pred[0:1, 0:5] = 1  # 5 of them
    pred[5, 0] = 1  # 1 false positive inside
    scores = bench.fov_case_scores(ref, pred, fov, labels=[1], spacing_mm=(1.0, 1.0))
    assert scores["metrics"]["1"]["dice"] == pytest.approx(2 * 5 / (10 + 6))
    assert scores["counts"]["1"] == {"tp": 5, "fp": 1, "fn": 5}
    assert scores["accuracy_in_fov"] == pytest.approx(1 - 6 / 50)
    assert bench.pooled_dice([{"tp": 5, "fp": 1, "fn": 5}, {"tp": 5, "fp": 0, "fn": 0}]) == pytest.approx(20 / 26)
    with pytest.raises(ValueError):
        bench.restrict_to_fov(ref, pred, fov[:5])


def test_pixel_error_is_one_minus_accuracy_pooled(bench):
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    b[0, :2] = 1  # 2 of 16 wrong
    c = np.ones((2, 8), np.uint8)  # another shape, all right
    out = bench.pixel_error([a, c], [b, c])
    assert out == {"pixel_error": pytest.approx(2 / 32), "pixels": 32, "wrong_pixels": 2}
    with pytest.raises(ValueError):
        bench.pixel_error([a], [c])


def test_verdicts_and_training_facts(bench):
    t = bench.TARGETS
    assert bench.verdict(0.80, t["drive"]["test_fov"]) == "PASS"
    assert bench.verdict(0.78, t["drive"]["test_fov"]) == "short"
    assert bench.verdict(0.05, t["isbi2012_em"]["pixel_error"]) == "PASS"
    assert bench.verdict(0.07, t["isbi2012_em"]["pixel_error"]) == "short"
    assert bench.verdict(0.5, t["openkbp_hn_ct"]["worst"]) == "short"  # every organ > 0.5, strictly
    assert bench.verdict(None, t["hc18"]["val"]) == "n/a"
    assert [bench.budget_verdict(u) for u in (0.9, 0.97, 1.2)] == ["short", "PASS", "over"]
    history = [EpochRecord(epoch=i, pseudo_dice=(0.0, 0.2, math.nan), ema_pseudo_dice=0.1 * i) for i in range(10)]
    assert bench.zero_pseudo_dice_classes(history, ["a", "b", "c"]) == ["a", "c"]
    assert bench.zero_pseudo_dice_classes(history[:1], ["a", "b", "c", "d"]) == ["a", "c", "d"]  # short record
    assert bench.ema_gain_at_end(history) == pytest.approx(0.2)
    assert bench.ema_gain_at_end(history[:3]) is None


def _plans(tmp_path: Path) -> Path:
    from automedseg.plans import (
        AugmentationPlan,
        ChannelNormalization,
        ConfigurationPlan,
        DeviceProfile,
        NetworkPlan,
        Plans,
        TrainingPlan,
    )

    net = NetworkPlan("plain_unet", (8, 16), ((3, 3), (3, 3)), ((1, 1), (2, 2)), (1, 1), (1,))
    cfg = ConfigurationPlan(
        name="2d", data_identifier="data_2d", dims=2, spacing_mm=(1.0, 1.0, 1.0), patch_size=(16, 16), batch_size=4,
        median_shape=(1, 32, 32), normalization=(ChannelNormalization("zscore"),), image_order=3, label_order=1,
        separate_z=False, out_of_plane_order=0, network=net, augmentation=AugmentationPlan(),
        training=TrainingPlan(epochs=2, iterations_per_epoch=3))
    device = DeviceProfile("cpu", "test", 1, 1.0, ((8, 1.0),))
    path = tmp_path / "plans.json"
    Plans("Test", ("T2",), {"background": 0, "vessel": 1}, (0, 1, 2), (1.0, 1.0, 1.0), (1, 32, 32), device,
          {"2d": cfg}).save(path)
    return path


@pytest.mark.parametrize("validated", [True, False])
def test_fold_figures_read_through_the_typed_readers(bench, tmp_path: Path, validated: bool):
    from automedseg.validation_summary import summary_path, write_validation_summary

    _plans(tmp_path)
    records = [EpochRecord(epoch=i, pseudo_dice=(0.1 * i,), ema_pseudo_dice=0.05 * i, lr=0.01, epoch_seconds=2.0,
                           iterations=3, data_wait_fraction=0.5) for i in range(2)]
    write_training_log(tmp_path / "log.jsonl", records)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write("{broken\n")  # a line being written when the benchmark reads: skipped
    if validated:
        summary_path(tmp_path).parent.mkdir()
        write_validation_summary(summary_path(tmp_path), {"cases": ["a", "b"], "mean_dice": 0.7,
                                                          "dice_per_class": {"1": 0.7}, "seconds": 4.0})
    fig = bench.fold_figures(tmp_path, "2d")
    assert fig["epochs"] == 2 and fig["iterations"] == 6 and fig["samples"] == 24
    assert fig["epoch_train_seconds"] == 4.0 and fig["final_ema_pseudo_dice"] == pytest.approx(0.05)
    assert fig["zero_pseudo_dice_classes"] == [] and fig["data_wait_fraction_mean"] == 0.5
    assert fig["plan"]["patch_size"] == [16, 16]
    if validated:
        assert fig["val_cases"] == ["a", "b"] and fig["val_dice_per_class"] == {"vessel": 0.7}
        assert fig["val_mean_dice"] == 0.7 and fig["validation_s"] == 4.0
    else:
        assert not fig["validated"] and fig["val_cases"] is None and fig["val_dice_per_class"] == {}


@pytest.mark.parametrize("keep,expected_ops", [
    ((5, 7), "keep the largest component of Esophagus, Mandible"),
    ((), "none"),
])
def test_postprocessed_figures_read_find_best(bench, tmp_path, keep, expected_ops):
    from automedseg.best_choice import BestChoice, ChosenPostprocessing, FindBest, write_find_best

    pp = ChosenPostprocessing(keep_largest_labels=keep, dice_before={"5": 0.42, "7": 0.81, "mean": 0.615},
                              dice_after={"5": 0.44, "7": 0.83, "mean": 0.635})
    write_find_best(tmp_path / "find_best.json", FindBest(best=BestChoice(configuration="3d_fullres",
                                                                           postprocessing=pp)))
    got = bench.postprocessed_figures(tmp_path / "find_best.json", {0: "background", 5: "Esophagus", 7: "Mandible"})
    assert got == {"mean_dice": 0.635, "dice_per_class": {"Esophagus": 0.44, "Mandible": 0.83},
                   "operations": expected_ops}
    assert bench.postprocessed_figures(tmp_path / "missing.json", {}) is None


def test_slice_extent_separates_length_from_shape(bench, tmp_path: Path):
    """A prediction right in every slice the reference covers but one slice too long: the whole-volume Dice
    drops, the Dice within the reference's slices does not; cases scored from NIfTI files as the benchmark does."""
    import SimpleITK as sitk

    ref = np.zeros((10, 8, 8), np.uint8)
    ref[2:6, 3:5, 3:5] = 5
    pred = ref.copy()
    pred[6, 3:5, 3:5] = 5
    for folder, arr in (("raw/labelsTr", ref), ("fold/validation", pred)):
        (tmp_path / folder).mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / folder / "c1.nii.gz"))
    out = bench.score_slice_extent(tmp_path / "raw", [(tmp_path / "fold", ["c1", "absent"])], label=5)
    assert out["reference_length_slices"] == [4, 4]
    assert out["dice_mean"] == pytest.approx(2 * 16 / (16 + 20))
    assert out["dice_within_reference_slices_mean"] == pytest.approx(1.0)
    assert bench.slice_extent_scores(ref, pred, label=3)["reference_slices"] is None


def test_cv_figures_pool_the_cases_of_every_fold(bench, tmp_path: Path):
    """The CV Dice of a class is the mean over every validated case of every fold (not the mean of fold means);
    the openkbp targets are then scored on it, the fold-0 figures kept beside them."""
    from automedseg.validation_summary import summary_path, write_validation_summary

    dice = {0: [0.8, 0.6], 1: [0.4]}  # fold -> label-5 Dice per case
    dirs = []
    for fold, values in dice.items():
        fd = tmp_path / f"fold_{fold}"
        summary_path(fd).parent.mkdir(parents=True)
        per_case = [{"case": f"f{fold}c{i}", "metrics": {"1": {"dice": 0.9}, "5": {"dice": v}}}
                    for i, v in enumerate(values)]
        write_validation_summary(summary_path(fd), {"cases": [c["case"] for c in per_case], "per_case": per_case})
        dirs.append(fd)
    cv = bench.cv_figures(dirs, {1: "Brainstem", 5: "Esophagus"})
    assert cv["n_cases"] == 3 and cv["folds"] == 2
    assert cv["dice_per_class"] == pytest.approx({"Brainstem": 0.9, "Esophagus": 0.6})
    assert cv["mean_dice"] == pytest.approx(0.75)
    assert bench.cv_figures([*dirs, tmp_path / "fold_9"], {}) is None  # a fold not validated

    plan = {"batch_size": 2, "label_names": {1: "Brainstem", 5: "Esophagus"}}
    fold0 = {"val_cases": ["a"], "val_dice_per_class": {"Brainstem": 0.9, "Esophagus": 0.7}, "val_mean_dice": 0.8,
             "plan": plan}
    rows = bench.figure_rows({"dataset": "openkbp_hn_ct", "fold0": fold0, "cv": cv})
    by_figure = {r["figure"]: r for r in rows}
    assert by_figure["mean Dice of 7 organs, 2-fold CV"]["value"] == pytest.approx(0.75)
    assert by_figure["worst organ Dice, 2-fold CV (Esophagus)"]["status"] == "PASS"
    assert by_figure["Esophagus Dice, fold-0 validation"]["value"] == 0.7
