"""Tests of automedseg.postprocessing: the CV choice, postprocessing.json (typed), work-folder glue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from automedseg.io import Geometry, write_segmentation
from automedseg.metrics import dice_per_label
from automedseg.model_selection import determine_postprocessing
from automedseg.plans import (
    AugmentationPlan,
    ChannelNormalization,
    ConfigurationPlan,
    DeviceProfile,
    NetworkPlan,
    Plans,
    TrainingPlan,
)
from automedseg.postprocessing import (
    Postprocessing,
    PostprocessingError,
    PostprocessingStep,
    apply_postprocessing,
    choose_postprocessing,
    load_postprocessing,
    no_postprocessing,
    postprocessing_path,
    save_postprocessing,
)
from automedseg.workspace import Workspace

SPACING = (2.0, 1.0, 1.0)


def _blobs() -> np.ndarray:
    """(4, 16, 16): label 1 big block (32 voxels) + label 1 speck (1) + label 2 block touching 1 (8) +
    label 2 far block (4)."""
    seg = np.zeros((4, 16, 16), np.uint8)
    seg[0:2, 0:4, 0:4] = 1  # 32 voxels
    seg[3, 15, 15] = 1  # 1 voxel, isolated
    seg[0:2, 4:6, 0:2] = 2  # 8 voxels, touches the big label-1 block
    seg[3, 10:12, 10:12] = 2  # 4 voxels, far away
    return seg


def test_dice_per_label_matches_definition():
    ref = np.array([[0, 1, 1, 2]])
    pred = np.array([[1, 1, 0, 0]])
    d = dice_per_label(ref, pred, labels=[1, 2, 3])
    assert d[1] == pytest.approx(2 * 1 / (2 + 2)) and d[2] == 0.0 and d[3] == 1.0


@pytest.mark.parametrize("values", [(1, 2), (1, 200), (5, 40000)])
def test_dice_per_label_sparse_values(values):
    """Sparse or large label values (up to 40000) give the same Dice as consecutive ones, in small memory."""
    a, b = values
    ref = np.array([[0, a, a, b, b]], dtype=np.uint16)
    pred = np.array([[a, a, 0, b, a]], dtype=np.uint16)
    d = dice_per_label(ref, pred, labels=[a, b, 7])
    assert d == {a: pytest.approx(2 * 1 / (2 + 3)), b: pytest.approx(2 * 1 / (2 + 1)), 7: 1.0}


# --- choosing ----------------------------------------------------------------------------------------


def _cube(seg: np.ndarray, z: int, y: int, x: int, size: int, value: int) -> None:
    seg[z:z + size, y:y + size, x:x + size] = value


def _case_spurious(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Reference: one cube of class 1. Prediction: the cube, slightly off, plus a far-away false blob."""
    ref = np.zeros((12, 20, 20), np.uint8)
    _cube(ref, 2, 2, 2, 6, 1)
    pred = ref.copy()
    pred[2, 2, 2:2 + int(rng.integers(1, 4))] = 0
    _cube(pred, 9, 15, 15, 3, 1)
    return ref, pred, SPACING


def _case_two_parts() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Reference genuinely has two components of class 1; the prediction finds both."""
    ref = np.zeros((12, 20, 20), np.uint8)
    _cube(ref, 1, 1, 1, 6, 1)
    _cube(ref, 8, 14, 14, 4, 1)
    pred = ref.copy()
    pred[1, 1, 1] = 0
    return ref, pred, SPACING


def test_choose_adopts_largest_component_against_spurious_blobs():
    rng = np.random.default_rng(0)
    cases = [_case_spurious(rng) for _ in range(4)]
    choice = choose_postprocessing(cases, labels=[1])
    assert choice.keep_largest_foreground is True and choice.n_cases == 4 and choice.labels == (1,)
    assert choice.dice_after["1"] > choice.dice_before["1"]
    assert choice.dice_after["mean"] > choice.dice_before["mean"]
    # applying the choice reproduces the figure it was chosen on
    dice = [dice_per_label(r, apply_postprocessing(p, choice), labels=[1])[1] for r, p, _ in cases]
    assert np.mean(dice) == pytest.approx(choice.dice_after["1"])
    json.dumps(choice.to_dict())  # JSON-able
    assert choice.operations() == ["keep the largest foreground component"]


def test_choose_rejects_largest_component_when_reference_has_two_parts():
    choice = choose_postprocessing([_case_two_parts() for _ in range(3)], labels=[1])
    assert choice.keep_largest_foreground is False
    assert choice.keep_largest_labels == ()
    assert choice.min_voxels == {} and choice.operations() == []
    assert choice.dice_after == choice.dice_before
    first = choice.steps[0]
    assert first.step == "keep_largest_foreground" and not first.adopted
    assert first.dice_after["1"] < first.dice_before["1"]


def test_choose_per_class_when_foreground_step_would_hurt_a_class():
    """Class 1 has a spurious blob, class 2 genuinely two parts: only class 1 gets largest-component."""
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(3):
        ref, pred, sp = _case_spurious(rng)
        _cube(ref, 1, 12, 2, 3, 2)
        _cube(ref, 8, 2, 12, 3, 2)
        _cube(pred, 1, 12, 2, 3, 2)
        _cube(pred, 8, 2, 12, 3, 2)
        cases.append((ref, pred, sp))
    choice = choose_postprocessing(cases, labels=[1, 2])
    assert choice.keep_largest_foreground is False
    assert "[2]" in choice.steps[0].reason
    assert choice.keep_largest_labels == (1,)
    assert choice.dice_after["2"] == pytest.approx(1.0)
    assert choice.dice_after["1"] > choice.dice_before["1"]


def test_choose_small_component_threshold():
    """Two true parts (largest-component would hurt) plus one-voxel false specks: a min size helps."""
    cases = []
    for k in range(3):
        ref, pred, sp = _case_two_parts()
        pred[11, 0, 19 - k] = 1
        pred[0, 19, 10] = 1
        cases.append((ref, pred, sp))
    choice = choose_postprocessing(cases, labels=[1])
    assert choice.keep_largest_labels == () and not choice.keep_largest_foreground
    assert choice.min_voxels == {} and choice.version == 2  # the threshold is in mm^3 now (2 mm^3 per voxel)
    assert "1" in choice.min_size_mm3 and 4 <= choice.min_size_mm3["1"] <= 128
    assert choice.min_size_mm3_by_label == {1: choice.min_size_mm3["1"]}
    (step,) = [s for s in choice.steps if s.step == "remove_small"]
    assert step.adopted and step.min_size_mm3 == choice.min_size_mm3["1"] and step.min_voxels is None
    assert step.candidates and f"{step.min_size_mm3:g}" in step.candidates
    out = apply_postprocessing(cases[0][1], choice, spacing_mm=SPACING)
    assert int(out.sum()) == int(cases[0][1].sum()) - 2
    assert choice.dice_after["1"] > choice.dice_before["1"]
    no_small = choose_postprocessing(cases, labels=[1], remove_small=False)
    assert no_small.min_size_mm3 == {} and no_small.min_voxels == {}


def test_choose_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one case"):
        choose_postprocessing([], labels=[1])
    ref = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        choose_postprocessing([(ref, np.zeros((2, 3, 4), np.uint8), SPACING)], labels=[1])


# --- morphology on cross-validation ------------------------------------------------------------------

FLAT = (999.0, 1.0, 1.0)  # a single-slice image (1, Y, X) with its dummy z spacing


def _disk(shape: tuple[int, ...], center: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def _planted_spur() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A blob open under the cross (5 x 5 without corners) and a voxel touching it at a corner only: one component,
    so only the opening removes it."""
    ref = np.zeros((1, 9, 9), np.uint8)
    ref[0, 3:6, 2:7] = ref[0, 2:7, 3:6] = 1
    pred = ref.copy()
    pred[0, 1, 2] = 1
    return ref, pred, FLAT


def _planted_slit() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A rectangle cut in two by a one-voxel slit."""
    ref = np.zeros((1, 9, 12), np.uint8)
    ref[0, 2:7, 2:10] = 1
    pred = ref.copy()
    pred[0, :, 6] = 0
    return ref, pred, FLAT


def _planted_channel() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A cylinder along z predicted with a channel through it, open at both ends: a hole of every slice only."""
    ref = np.zeros((6, 12, 12), np.uint8)
    ref[:, _disk((12, 12), (6, 6), 4)] = 1
    pred = ref.copy()
    pred[:, _disk((12, 12), (6, 6), 2)] = 0
    return ref, pred, (1.0, 1.0, 1.0)


def _planted_cavity() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A cube predicted with a ball-shaped cavity: a hole in 3D (and of each slice through it)."""
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[1:11, 1:11, 1:11] = 1
    pred = ref.copy()
    pred[_disk(ref.shape, (6, 6, 6), 2)] = 0
    return ref, pred, (1.0, 1.0, 1.0)


@pytest.mark.parametrize("make, name, step, value", [
    (_planted_spur, "opening_radius_mm", "opening", 1.0),
    (_planted_slit, "closing_radius_mm", "closing", 1.0),
    (_planted_channel, "fill_holes", "fill_holes", "2d"),  # filling in 3D does nothing
    (_planted_cavity, "fill_holes", "fill_holes", "3d"),  # both fill it: the 3D one, the milder, is preferred
])
def test_choose_adopts_a_planted_helpful_operation(make, name: str, step: str, value: object):
    cases = [make() for _ in range(3)]
    choice = choose_postprocessing(cases, labels=[1])
    assert getattr(choice, name) == {"1": value} and choice.version == 2
    (adopted,) = [s for s in choice.steps if s.step == step]
    assert adopted.adopted and (adopted.mode if step == "fill_holes" else adopted.radius_mm) == value
    assert adopted.dice_after > adopted.dice_before and str(value).removesuffix(".0") in adopted.candidates
    assert choice.dice_after["1"] > choice.dice_before["1"]
    dice = [dice_per_label(r, apply_postprocessing(p, choice, spacing_mm=sp), labels=[1])[1] for r, p, sp in cases]
    assert np.mean(dice) == pytest.approx(choice.dice_after["1"])  # applying reproduces the figure


def _fine_detail() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Predicted perfectly: a thin line (opening deletes it), a true gap (closing fills it), a true hole."""
    ref = np.zeros((1, 12, 14), np.uint8)
    ref[0, 2:6, 2:6] = ref[0, 3, 6:9] = 1
    ref[0, 2:6, 10:12] = ref[0, 7:10, 2:5] = ref[0, 7:10, 6:9] = 1
    ref[0, 8, 3] = 0
    return ref, ref.copy(), FLAT


@pytest.mark.parametrize("step", ["opening", "closing", "fill_holes"])
def test_choose_refuses_an_operation_that_lowers_the_dice(step: str):
    choice = choose_postprocessing([_fine_detail() for _ in range(2)], labels=[1])
    assert choice.operations() == [] and choice.version == 1
    (tested,) = [s for s in choice.steps if s.step == step]
    assert not tested.adopted and tested.dice_after < tested.dice_before == 1.0
    assert tested.radius_mm is None and tested.mode is None


def test_choose_refuses_what_helps_some_cases_but_lowers_the_mean():
    cases = [_planted_spur(), _fine_detail()]  # the opening would fix the spur but delete the thin line
    choice = choose_postprocessing(cases, labels=[1])
    (opening,) = [s for s in choice.steps if s.step == "opening"]
    assert not opening.adopted and opening.dice_after < opening.dice_before and choice.opening_radius_mm == {}


def test_choose_decides_per_class_and_leaves_the_others_alone():
    cases = []
    for _ in range(2):
        ref, pred, spacing = _planted_slit()  # class 1: closing helps
        detail = _fine_detail()[0][:, :9, :12] * 2  # class 2: predicted perfectly, any operation hurts it
        ref, pred = np.concatenate([ref, detail], axis=1), np.concatenate([pred, detail], axis=1)
        cases.append((ref, pred, spacing))
    choice = choose_postprocessing(cases, labels=[1, 2])
    assert choice.closing_radius_mm == {"1": 1.0} and choice.opening_radius_mm == choice.fill_holes == {}
    assert choice.dice_after["2"] == choice.dice_before["2"] == 1.0
    assert choice.dice_after["1"] > choice.dice_before["1"]


def _contested() -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Class 1 inside a ring of class 2; filling the holes of either takes class 1's missing centre. Class 1's hole
    filling pays only with that centre (it also fills a true hole of its other ring)."""
    shape = (22, 34)
    ref = np.zeros(shape, np.uint8)
    ref[_disk(shape, (11, 11), 9)] = 2
    ref[_disk(shape, (11, 11), 4)] = 1
    pred = ref.copy()
    pred[_disk(shape, (11, 11), 6) & ~_disk(shape, (11, 11), 4)] = 0  # class 2 misses its inner band
    pred[_disk(shape, (11, 11), 2)] = 0  # class 1 misses its centre
    for seg in (ref, pred):
        seg[_disk(shape, (11, 27), 5)] = 1
        seg[_disk(shape, (11, 27), 2)] = 0  # a true hole
    return ref[None], pred[None], FLAT


def test_choose_withdraws_what_the_classes_together_would_spoil():
    cases = [_contested() for _ in range(2)]
    choice = choose_postprocessing(cases, labels=[1, 2])
    fills = {s.label: s.adopted for s in choice.steps if s.step == "fill_holes"}
    assert fills == {1: True, 2: True}  # each alone raises its Dice
    (withdrawn,) = [s for s in choice.steps if s.step == "withdrawn"]
    assert withdrawn.label == 1 and withdrawn.dice_after < withdrawn.dice_before
    assert choice.fill_holes == {"2": "2d"}
    assert choice.dice_after["1"] == choice.dice_before["1"] and choice.dice_after["2"] > choice.dice_before["2"]
    for label in (1, 2):
        dice = [dice_per_label(r, apply_postprocessing(p, choice, spacing_mm=sp), labels=[label])[label]
                for r, p, sp in cases]
        assert np.mean(dice) == pytest.approx(choice.dice_after[str(label)])


def test_choose_without_morphology():
    choice = choose_postprocessing([_planted_slit() for _ in range(2)], labels=[1], morphology=False)
    assert choice.operations() == [] and not any(s.step == "closing" for s in choice.steps)


def _mm_choice(**fields: dict) -> Postprocessing:
    return Postprocessing(keep_largest_foreground=False, keep_largest_labels=(), min_voxels={}, **fields)


@pytest.mark.parametrize("fields, spacing_mm, kept", [
    ({"closing_radius_mm": {"1": 1.0}}, (1.0, 1.0, 1.0), 80),  # the gap slice (1 mm) is bridged
    ({"closing_radius_mm": {"1": 1.0}}, (3.0, 1.0, 1.0), 64),  # ... not when it is 3 mm thick
    ({"min_size_mm3": {"1": 40.0}}, (1.0, 1.0, 1.0), 0),  # two blocks of 32 mm^3
    ({"min_size_mm3": {"1": 40.0}}, (2.0, 1.0, 1.0), 64),  # ... of 64 mm^3
    ({"min_size_mm3": {"1": 40.0}}, (2.0, 2.0, 2.0), 64),
])
def test_apply_measures_in_mm_with_the_spacing_given(fields: dict, spacing_mm: tuple[float, ...], kept: int):
    seg = np.zeros((7, 4, 4), np.uint8)
    seg[1:6] = 1
    seg[3] = 0  # two blocks of 32 voxels, one slice apart
    for image in (seg, seg[None]):  # a leading axis of one is accepted
        out = apply_postprocessing(image, _mm_choice(**fields), spacing_mm=spacing_mm)
        assert out.shape == image.shape and out.dtype == image.dtype and int(out.sum()) == kept


def test_apply_in_mm_needs_the_spacing():
    with pytest.raises(ValueError, match="spacing_mm"):
        apply_postprocessing(np.zeros((2, 3, 3), np.uint8), _mm_choice(opening_radius_mm={"1": 1.0}))
    seg = np.zeros((1, 5, 5), np.uint8)
    seg[0, 1:4, 1:4] = 1
    seg[0, 2, 2] = 0
    assert apply_postprocessing(seg, _mm_choice(fill_holes={"1": "3d"}))[0, 2, 2] == 1  # holes need no mm


def test_predict_applies_the_choice_with_the_image_spacing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import automedseg.prediction as prediction

    path = tmp_path / "postprocessing.json"
    _mm_choice(closing_radius_mm={"1": 1.0}).save(path)
    seen = []

    def spy(seg: np.ndarray, choice: Postprocessing, *, spacing_mm: object = None) -> np.ndarray:
        seen.append(spacing_mm)
        return apply_postprocessing(seg, choice, spacing_mm=spacing_mm)

    monkeypatch.setattr(prediction, "apply_postprocessing", spy)
    post, ops = prediction._postprocessing(path, log=lambda s: None)
    seg = np.zeros((7, 4, 4), np.uint8)
    seg[1:6] = 1
    seg[3] = 0
    assert ops == ["close class 1 with a ball of radius 1 mm"]
    assert int(post(seg, (1.0, 1.0, 1.0)).sum()) == 80 and int(post(seg, (3.0, 1.0, 1.0)).sum()) == 64
    assert seen == [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0)]


# --- files -------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path):
    rng = np.random.default_rng(2)
    choice = choose_postprocessing([_case_spurious(rng) for _ in range(2)], labels=[1])
    path = tmp_path / "sub" / "postprocessing.json"
    save_postprocessing(choice, path)
    loaded = load_postprocessing(path)
    assert loaded == choice and isinstance(loaded.steps[0], PostprocessingStep)
    assert Postprocessing.load(path) == loaded
    assert json.loads(path.read_text()) == choice.to_dict()
    assert not list(path.parent.glob(".*"))  # no temporary files left behind
    seg = _case_spurious(rng)[1]
    assert np.array_equal(apply_postprocessing(seg, loaded), apply_postprocessing(seg, choice))


V1_FILE = {  # as automedseg wrote version 1 before the dataclass: steps with "min_voxels": null, provenance last
    "format": "automedseg-postprocessing", "version": 1, "connectivity": "full", "labels": [1, 2],
    "keep_largest_foreground": False, "keep_largest_labels": [1], "min_voxels": {"2": 12}, "n_cases": 4,
    "tolerance": 1e-06, "dice_before": {"1": 0.9, "2": 0.8, "mean": 0.85},
    "dice_after": {"1": 0.95, "2": 0.85, "mean": None},
    "steps": [
        {"step": "keep_largest_foreground", "adopted": False, "reason": "class(es) [2] would get worse",
         "dice_before": {"1": 0.9, "2": 0.8, "mean": 0.85}, "dice_after": {"1": 0.95, "2": 0.7, "mean": 0.825}},
        {"step": "keep_largest", "label": 1, "adopted": True, "dice_before": 0.9, "dice_after": 0.95},
        {"step": "keep_largest", "label": 2, "adopted": False, "dice_before": 0.8, "dice_after": 0.7},
        {"step": "remove_small", "label": 2, "adopted": True, "min_voxels": 12, "dice_before": 0.8,
         "dice_after": 0.85, "candidates": {"3": 0.81, "12": 0.85}},
        {"step": "remove_small", "label": 3, "adopted": False, "min_voxels": None, "dice_before": 1,
         "dice_after": 1, "candidates": {"2": 1}},
    ],
    "configuration": "2d+3d_fullres", "members": ["2d", "3d_fullres"], "cases": ["a", "b", "c", "d"], "missing": [],
}


@pytest.mark.parametrize("data, operations", [
    (V1_FILE, ["keep the largest component of class(es) 1", "remove components of class 2 smaller than 12 voxels"]),
    # written by hand: no format, version or figures; a note the format does not know is ignored
    ({"keep_largest_foreground": True, "keep_largest_labels": [], "min_voxels": {}, "note": "by hand"},
     ["keep the largest foreground component"]),
    (no_postprocessing([1, 2]).to_dict(), []),
])
def test_old_and_hand_written_files_still_load(tmp_path: Path, data: dict, operations: list[str]):
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps(data))
    choice = load_postprocessing(path)
    assert choice.operations() == operations
    assert choice.format == "automedseg-postprocessing" and choice.version == 1
    save_postprocessing(choice, path)
    assert load_postprocessing(path) == choice  # and it survives a rewrite


def test_old_file_fields_are_typed(tmp_path: Path):
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps(V1_FILE))
    choice = load_postprocessing(path)
    assert choice.members == ("2d", "3d_fullres") and choice.configuration == "2d+3d_fullres"
    assert choice.dice_after["mean"] is None and choice.steps[1].label == 1 and choice.steps[1].dice_after == 0.95
    assert choice.steps[4].min_voxels is None and choice.steps[4].dice_before == 1.0
    assert choice.min_voxels_by_label == {2: 12}


@pytest.mark.parametrize("extra, version, operations", [
    ({}, 1, ["remove components of class 2 smaller than 12 voxels"]),
    # version 1 ignored keys it did not know: a version-2 key in a version-1 file changes nothing
    ({"fill_holes": {"2": "3d"}}, 1, ["remove components of class 2 smaller than 12 voxels"]),
    # without a version, the lowest that holds the file
    ({"version": None, "fill_holes": {"2": "3d"}}, 2,
     ["remove components of class 2 smaller than 12 voxels", "fill the holes of class 2 (in 3D)"]),
])
def test_version_1_files_mean_what_they_meant(tmp_path: Path, extra: dict, version: int, operations: list[str]):
    data = {**V1_FILE, "keep_largest_labels": [], **extra}
    if extra.get("version", 1) is None:
        del data["version"]
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps(data))
    choice = load_postprocessing(path)
    assert choice.version == version and choice.operations() == operations
    assert choice.min_voxels_by_label == {2: 12}
    seg = _blobs()
    assert int((apply_postprocessing(seg, choice) == 2).sum()) == 0  # 8 and 4 voxels, both under 12
    save_postprocessing(choice, path)
    written = json.loads(path.read_text())
    assert written["version"] == version and ("fill_holes" in written) == (version == 2)
    assert load_postprocessing(path) == choice


def test_version_2_round_trip(tmp_path: Path):
    choice = choose_postprocessing([_planted_channel(), _planted_cavity()[:2] + ((1.0, 1.0, 1.0),)], labels=[1])
    choice = choice.with_provenance(configuration="3d_fullres", members=["3d_fullres"], cases=["a", "b"], missing=[])
    assert choice.version == 2 and choice.fill_holes
    path = tmp_path / "postprocessing.json"
    save_postprocessing(choice, path)
    written = json.loads(path.read_text())
    assert written["format"] == "automedseg-postprocessing" and written["version"] == 2
    assert set(written) >= {"min_voxels", "min_size_mm3", "opening_radius_mm", "closing_radius_mm", "fill_holes"}
    assert all("mode" not in step and "radius_mm" not in step for step in written["steps"] if not step["adopted"])
    loaded = load_postprocessing(path)
    assert loaded == choice and loaded.to_dict() == written
    seg = _planted_channel()[1]
    assert np.array_equal(apply_postprocessing(seg, loaded, spacing_mm=(1.0, 1.0, 1.0)),
                          apply_postprocessing(seg, choice, spacing_mm=(1.0, 1.0, 1.0)))


def test_apply_neutral_choice_returns_a_copy():
    seg = _blobs()
    out = apply_postprocessing(seg, no_postprocessing([1, 2]))
    assert np.array_equal(out, seg) and out is not seg


_REQUIRED = '"keep_largest_foreground": false, "keep_largest_labels": [], "min_voxels": {}'


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"keep_largest_foreground": true, "keep_largest_labels": []}', "missing field 'min_voxels'"),
    ('{"keep_largest_foreground": "yes", "keep_largest_labels": [], "min_voxels": {}}',
     r"\.keep_largest_foreground: expected true or false"),
    ('{"keep_largest_foreground": false, "keep_largest_labels": [0], "min_voxels": {}}',
     "keep_largest_labels: must be positive class numbers"),
    ('{"keep_largest_foreground": false, "keep_largest_labels": "1", "min_voxels": {}}',
     r"\.keep_largest_labels: expected a list"),
    ('{"keep_largest_foreground": false, "keep_largest_labels": [], "min_voxels": {"a": 3}}',
     "min_voxels: key 'a'"),
    ('{"keep_largest_foreground": false, "keep_largest_labels": [], "min_voxels": {"1": 2.5}}',
     r"\.min_voxels\.1: expected an integer"),
    ('{"keep_largest_foreground": false, "keep_largest_labels": [], "min_voxels": {"1": -2}}',
     r"min_voxels\.1: must be a non-negative integer"),
    ('{"format": "other", ' + _REQUIRED + "}", "format 'other' is not supported"),
    ('{"version": 3, ' + _REQUIRED + "}", "version 3 is not supported"),
    ('{"version": 1, "closing_radius_mm": {"1": 0}, ' + _REQUIRED + "}", None),  # version 1 ignores it
    ('{"closing_radius_mm": {"1": 0}, ' + _REQUIRED + "}", r"closing_radius_mm\.1: must be a positive number"),
    ('{"fill_holes": {"1": "4d"}, ' + _REQUIRED + "}", r"fill_holes\.1: must be one of"),
    ('{"min_size_mm3": {"x": 2}, ' + _REQUIRED + "}", "min_size_mm3: key 'x'"),
    ('{"connectivity": "face", ' + _REQUIRED + "}", "connectivity: 'face'"),
    ('{"n_cases": "four", ' + _REQUIRED + "}", r"\.n_cases: expected an integer"),
    ('{"steps": [{"step": "keep_largest", "adopted": true, "size": 3}], ' + _REQUIRED + "}",
     r"\.steps\[0\]: unknown field\(s\) \['size'\]"),
])
def test_load_malformed_file_names_the_file_and_field(tmp_path: Path, content: str, message: str | None):
    path = tmp_path / "postprocessing.json"
    path.write_text(content)
    if message is None:
        assert load_postprocessing(path).operations() == []
        return
    with pytest.raises(PostprocessingError, match=message) as info:
        load_postprocessing(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path: Path):
    with pytest.raises(PostprocessingError, match="missing"):
        load_postprocessing(tmp_path / "nope.json")


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_largest_labels": (-1,)}, "keep_largest_labels"),
    ({"min_voxels": {"0": 3}}, "min_voxels: key '0'"),
    ({"labels": (0, 1)}, "labels"),
    ({"opening_radius_mm": {"1": -1.0}}, "opening_radius_mm.1"),
    ({"min_size_mm3": {"1": float("inf")}}, "min_size_mm3.1"),
    ({"version": 1, "fill_holes": {"1": "3d"}}, "version: 1 cannot hold fill_holes"),
])
def test_invalid_choice_cannot_be_built(kwargs: dict, message: str):
    fields = {"keep_largest_foreground": False, "keep_largest_labels": (), "min_voxels": {}} | kwargs
    with pytest.raises(ValueError, match=message):
        Postprocessing(**fields)


# --- work folder -------------------------------------------------------------------------------------


def _plans(names: list[str], labels: dict[str, int]) -> Plans:
    net = NetworkPlan("plain_unet", (8, 16), ((3, 3, 3), (3, 3, 3)), ((1, 1, 1), (2, 2, 2)), (1, 1), (1,))
    configs = {n: ConfigurationPlan(
        name=n, data_identifier="data_3d", dims=3, spacing_mm=SPACING, patch_size=(8, 16, 16), batch_size=2,
        median_shape=(12, 20, 20), normalization=(ChannelNormalization("zscore"),), image_order=3,
        label_order=1,
        separate_z=False, out_of_plane_order=0, network=net, augmentation=AugmentationPlan(),
        training=TrainingPlan(epochs=1, iterations_per_epoch=1)) for n in names}
    device = DeviceProfile("cpu", "test", 1, 1.0, ((8, 1.0),))
    return Plans("Test", ("T2",), labels, (0, 1, 2), SPACING, (12, 20, 20), device, configs)


def _work_with_spurious_blobs(tmp_path: Path) -> Workspace:
    """One configuration, two folds of two cases; predictions carry a far-away false blob."""
    ws = Workspace(tmp_path / "work")
    _plans(["3d_fullres"], {"background": 0, "organ": 1}).save(ws.plans_path)
    geom = Geometry(size=(20, 20, 12), spacing=tuple(reversed(SPACING)), origin=(0.0, 0.0, 0.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(3)
    for i in range(4):
        case = f"case_{i}"
        ref, pred, _ = _case_spurious(rng)
        label_file = tmp_path / "raw" / f"{case}.nii.gz"
        write_segmentation(ref, geom, label_file)
        cache = ws.preprocessed_dir("data_3d")
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{case}.json").write_text(json.dumps({"label_file": str(label_file)}))
        vdir = ws.fold_dir("3d_fullres", i // 2) / "validation"
        write_segmentation(pred, geom, vdir / f"{case}.nii.gz")
        probs = np.stack([pred == 0, pred == 1]).astype(np.float16)
        np.savez_compressed(vdir / f"{case}.npz", probabilities=probs)
    for fold in (0, 1):
        (ws.fold_dir("3d_fullres", fold) / "validation" / "summary.json").write_text(
            json.dumps({"cases": [f"case_{2 * fold}", f"case_{2 * fold + 1}"]}))
    return ws


def test_determine_postprocessing_writes_the_choice(tmp_path: Path):
    ws = _work_with_spurious_blobs(tmp_path)
    choice = determine_postprocessing(ws, "3d_fullres")
    assert choice.keep_largest_foreground is True
    assert choice.cases == tuple(f"case_{i}" for i in range(4)) and choice.missing == ()
    assert choice.configuration == "3d_fullres" and choice.members == ("3d_fullres",)
    assert load_postprocessing(ws.postprocessing_path("3d_fullres")) == choice


def test_determine_postprocessing_ensemble_path_and_missing_folds(tmp_path: Path):
    ws = _work_with_spurious_blobs(tmp_path)
    assert postprocessing_path(ws, "a+b") == ws.root / "postprocessing_a+b.json"
    choice = determine_postprocessing(ws, "3d_fullres", folds=[0, 3])
    assert choice.cases == ("case_0", "case_1")
    assert any("fold(s) 3" in line for line in choice.missing)


def test_determine_postprocessing_without_outputs_says_why(tmp_path: Path):
    ws = _work_with_spurious_blobs(tmp_path)
    with pytest.raises(ValueError, match="no validation outputs"):
        determine_postprocessing(ws, "3d_fullres", folds=[4])
