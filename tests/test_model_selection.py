"""Tests of automedseg.model_selection on a synthetic work folder (validation outputs written by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from automedseg.io import Geometry, write_segmentation
from automedseg.model_selection import cross_validation_dice, find_best, predict_command, read_find_best
from automedseg.plans import (
    AugmentationPlan,
    ChannelNormalization,
    ConfigurationPlan,
    DeviceProfile,
    NetworkPlan,
    Plans,
    TrainingPlan,
)
from automedseg.postprocessing import load_postprocessing
from automedseg.splits import FoldSplit, write_splits
from automedseg.validation_outputs import ValidationCases, average_probabilities, collect_validation
from automedseg.workspace import Workspace

SHAPE = (6, 10, 10)  # (z, y, x)
SPACING = (2.0, 1.0, 1.0)
CASES = [f"case_{i}" for i in range(4)]
SPLITS = (FoldSplit(train=tuple(CASES[2:]), val=tuple(CASES[:2])),
          FoldSplit(train=tuple(CASES[:2]), val=tuple(CASES[2:])))
GEOMETRY = Geometry(size=tuple(reversed(SHAPE)), spacing=tuple(reversed(SPACING)), origin=(0.0, 0.0, 0.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _configuration(name: str) -> ConfigurationPlan:
    dims = 2 if name == "2d" else 3
    k, s = (3,) * dims, (1,) * dims
    net = NetworkPlan("plain_unet", (8, 16), (k, k), (s, (2,) * dims), (1, 1), (1,))
    return ConfigurationPlan(
        name=name, data_identifier=f"data_{dims}d", dims=dims, spacing_mm=SPACING, patch_size=(8,) * dims,
        batch_size=2, median_shape=SHAPE, normalization=(ChannelNormalization("zscore"),), image_order=3,
        label_order=1, separate_z=False, out_of_plane_order=0, network=net, augmentation=AugmentationPlan(),
        training=TrainingPlan(epochs=1, iterations_per_epoch=1))


def _reference() -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:5, 2:8, 2:8] = 1  # 144 voxels
    return ref


def _probabilities(missed: tuple[slice, ...]) -> np.ndarray:
    """Confident (0.9) everywhere except ``missed``, a part of the object given 0.4 (so argmax misses it)."""
    p1 = np.where(_reference() == 1, 0.9, 0.1)
    p1[missed] = 0.4
    return np.stack([1 - p1, p1]).astype(np.float16)


# Each configuration misses a different part; their average (0.65 there) finds everything.
MISSES = {
    "3d_fullres": (slice(1, 2), slice(2, 8), slice(2, 8)),  # 36 voxels: Dice 216/252
    "3d_lowres": (slice(3, 5), slice(2, 8), slice(2, 5)),  # 36 voxels as well, elsewhere
}


def _dice_missing(n_missed: int) -> float:
    return 2 * (144 - n_missed) / (144 + 144 - n_missed)


def _make_work(root: Path, *, folds: dict[str, list[int]] | None = None, value: int = 1) -> Workspace:
    """Plans with 2d, 3d_fullres, 3d_lowres; validation outputs of the 3D ones for the folds given.

    ``value``: the declared label value of the organ (training index 1); masks on disk hold it.
    """
    folds = {"3d_fullres": [0, 1], "3d_lowres": [0, 1]} if folds is None else folds
    ws = Workspace(root / "work")
    configs = {n: _configuration(n) for n in ("2d", "3d_fullres", "3d_lowres")}
    device = DeviceProfile("cpu", "test", 1, 1.0, ((8, 1.0),))
    Plans("Test", ("T2",), {"background": 0, "organ": value}, (0, 1, 2), SPACING, SHAPE, device, configs
          ).save(ws.plans_path)
    write_splits(ws.splits_path, SPLITS)
    for case in CASES:
        label_file = root / "raw" / "labelsTr" / f"{case}.nii.gz"
        write_segmentation(_reference().astype(np.uint16) * value, GEOMETRY, label_file)
        for did in ("data_2d", "data_3d"):
            ws.preprocessed_dir(did).mkdir(parents=True, exist_ok=True)
            meta = json.dumps({"label_file": str(label_file)})
            (ws.preprocessed_dir(did) / f"{case}.json").write_text(meta)
    for name, fold_list in folds.items():
        probs = _probabilities(MISSES[name])
        for fold in fold_list:
            vdir = ws.fold_dir(name, fold) / "validation"
            vdir.mkdir(parents=True)
            for case in SPLITS[fold].val:
                np.savez_compressed(vdir / f"{case}.npz", probabilities=probs)
                write_segmentation(probs.argmax(0) * value, GEOMETRY, vdir / f"{case}.nii.gz")
            (vdir / "summary.json").write_text(json.dumps({"cases": list(SPLITS[fold].val), "mean_dice": 0.0}))
    return ws


# --- probabilities -----------------------------------------------------------------------------------


def test_average_probabilities():
    a = np.array([[0.2, 0.6], [0.8, 0.4]], np.float16)
    b = np.array([[0.4, 0.2], [0.6, 0.8]], np.float32)
    out = average_probabilities([a, b])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.3, 0.4], [0.7, 0.6]], atol=1e-3)
    np.testing.assert_array_equal(average_probabilities([b]), b)
    assert average_probabilities([b]) is not b


@pytest.mark.parametrize("arrays, message", [
    ([], "at least one"),
    ([np.zeros((2, 3)), np.zeros((2, 4))], "shape"),
])
def test_average_probabilities_rejects(arrays, message):
    with pytest.raises(ValueError, match=message):
        average_probabilities(arrays)


# --- scoring -----------------------------------------------------------------------------------------


def test_collect_validation_lists_outputs_and_gaps(tmp_path: Path):
    ws = _make_work(tmp_path, folds={"3d_fullres": [0, 1], "3d_lowres": [0]})
    full = collect_validation(ws, "3d_fullres")
    assert sorted(full.cases) == CASES and full.complete and full.labels == (1,)
    low = collect_validation(ws, "3d_lowres")
    assert sorted(low.cases) == CASES[:2] and low.folds_missing == ["1"] and low.cases_missing == CASES[2:]
    assert any("fold(s) 1" in line for line in low.problems())
    with pytest.raises(ValueError, match="available"):
        collect_validation(ws, "3d_nonexistent")


def test_cross_validation_dice_single_and_ensemble(tmp_path: Path):
    ws = _make_work(tmp_path)
    single = cross_validation_dice(ws, ["3d_fullres"])
    assert single["n_cases"] == 4 and single["complete"] and single["missing"] == []
    assert single["mean_dice"] == pytest.approx(_dice_missing(36))
    assert single["dice_per_class"] == {"1": pytest.approx(_dice_missing(36))}
    ensemble = cross_validation_dice(ws, "3d_fullres+3d_lowres")
    assert ensemble["members"] == ["3d_fullres", "3d_lowres"]
    assert ensemble["mean_dice"] == pytest.approx(1.0)
    assert [c["case"] for c in ensemble["per_case"]] == CASES


def test_sparse_label_value_is_scored_and_ensembled_in_declared_values(tmp_path: Path):
    ws = _make_work(tmp_path, value=200)  # probabilities in index order: channel 1 is value 200
    single = cross_validation_dice(ws, ["3d_fullres"])
    assert single["dice_per_class"] == {"200": pytest.approx(_dice_missing(36))}
    ensemble = cross_validation_dice(ws, "3d_fullres+3d_lowres")
    assert ensemble["dice_per_class"] == {"200": pytest.approx(1.0)}
    ref, pred, _ = ValidationCases(ws, ["3d_fullres", "3d_lowres"])[0]
    assert pred.dtype == np.uint8 and set(np.unique(pred).tolist()) == {0, 200}
    np.testing.assert_array_equal(pred, ref)


def test_cross_validation_dice_reports_missing_reference(tmp_path: Path):
    ws = _make_work(tmp_path)
    (tmp_path / "raw" / "labelsTr" / "case_3.nii.gz").unlink()
    result = cross_validation_dice(ws, ["3d_fullres"])
    assert result["n_cases"] == 3 and not result["complete"]
    assert "case_3" in result["cases_skipped"]
    assert any("case_3" in line for line in result["missing"])
    cases = ValidationCases(ws, ["3d_fullres"])
    assert cases.case_ids == CASES[:3] and any("reference" in line for line in cases.missing)
    ref, pred, spacing = cases[0]
    assert ref.shape == pred.shape == SHAPE and spacing == SPACING
    with pytest.raises(IndexError):
        cases[3]


# --- find_best ---------------------------------------------------------------------------------------


def test_find_best_picks_the_ensemble_and_writes_json(tmp_path: Path):
    ws = _make_work(tmp_path)
    result = find_best(ws)
    on_disk = json.loads((ws.root / "find_best.json").read_text())
    assert read_find_best(ws.root / "find_best.json") == result
    best = on_disk["best"]
    assert best["configuration"] == "3d_fullres+3d_lowres" and best["mean_dice"] == pytest.approx(1.0)
    assert best["predict_command"] == (
        f"automedseg predict -i INPUT -o OUTPUT -d {ws.root} -c 3d_fullres+3d_lowres")
    assert [c["name"] for c in on_disk["candidates"]] == ["3d_fullres+3d_lowres", "3d_fullres", "3d_lowres"]
    assert [c["rank"] for c in on_disk["candidates"]] == [1, 2, 3]
    assert on_disk["candidates"][1]["dice_per_class"]["1"] == pytest.approx(_dice_missing(36))
    assert "2d" in on_disk["not_evaluated"] and "no validation outputs" in on_disk["not_evaluated"]["2d"]
    assert not on_disk["complete"]  # 2d was never trained
    # post-processing of the ensemble, where `automedseg predict -c A+B` looks for it
    pp_file = ws.root / "postprocessing_3d_fullres+3d_lowres.json"
    assert best["postprocessing"]["file"] == str(pp_file)
    choice = load_postprocessing(pp_file)
    assert choice.members == ("3d_fullres", "3d_lowres")
    summary = result.best.postprocessing
    assert summary is not None and summary.chosen and summary.file == str(pp_file)
    assert summary.dice_after == choice.dice_after and summary.as_postprocessing().operations() == choice.operations()
    assert result.best.mean_dice_postprocessed == choice.dice_after["mean"]


def test_find_best_partial_state_ranks_on_shared_cases(tmp_path: Path):
    ws = _make_work(tmp_path, folds={"3d_fullres": [0, 1], "3d_lowres": [0]})
    result = find_best(ws, configurations=["3d_fullres", "3d_lowres"], postprocess=False)
    assert "cases every candidate was scored on" in result.ranking_basis
    by_name = {c.name: c for c in result.candidates}
    assert by_name["3d_fullres"].n_cases == 4 and by_name["3d_lowres"].n_cases == 2
    assert by_name["3d_fullres+3d_lowres"].n_cases == 2
    assert by_name["3d_fullres"].mean_dice_common_cases == pytest.approx(_dice_missing(36))
    assert result.best.configuration == "3d_fullres+3d_lowres"
    assert result.best.postprocessing is None and result.best.mean_dice_postprocessed is None
    assert not result.complete
    assert any("3d_lowres" in line and "fold(s) 1" in line for line in result.missing)


def test_find_best_without_ensembles_and_with_folds(tmp_path: Path):
    ws = _make_work(tmp_path)
    result = find_best(ws, folds=[0], ensembles=False)
    assert {c.name for c in result.candidates} == {"3d_fullres", "3d_lowres"}
    assert result.best.predict_command.endswith("-c 3d_fullres -f 0")  # ties: name order
    assert (ws.root / "3d_fullres" / "postprocessing.json").is_file()
    assert result.folds == ["0"]


def test_find_best_nothing_trained(tmp_path: Path):
    ws = _make_work(tmp_path, folds={})
    with pytest.raises(ValueError, match="nothing to evaluate"):
        find_best(ws)
    assert not (ws.root / "find_best.json").exists()


def test_predict_command_quotes_paths():
    ws = Workspace(Path("/data/my work"))
    assert predict_command(ws, "2d") == "automedseg predict -i INPUT -o OUTPUT -d '/data/my work' -c 2d"
