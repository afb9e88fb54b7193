"""Tests of automedseg.best_choice: find_best.json read and written typed, old files, errors naming the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from automedseg.best_choice import (
    BestChoice,
    Candidate,
    CandidateScore,
    ChosenPostprocessing,
    FindBest,
    read_find_best,
    write_find_best,
)
from automedseg.errors import InputError
from automedseg.postprocessing import no_postprocessing
from automedseg.serialize import to_jsonable

PP_SUMMARY = {"file": "/w/postprocessing_2d+3d_fullres.json", "keep_largest_foreground": True,
              "keep_largest_labels": [2], "min_voxels": {"1": 12}, "dice_before": {"1": 0.8, "mean": 0.8},
              "dice_after": {"1": 0.82, "mean": 0.82}}
BEST = {"configuration": "2d+3d_fullres", "members": ["2d", "3d_fullres"], "mean_dice": 0.8,
        "dice_per_class": {"1": 0.8}, "n_cases": 4, "complete": True, "postprocessing": PP_SUMMARY,
        "predict_command": "automedseg predict ...", "mean_dice_postprocessed": 0.82}
CANDIDATE = {"name": "2d+3d_fullres", "members": ["2d", "3d_fullres"], "n_cases": 4, "mean_dice": 0.8,
             "dice_per_class": {"1": 0.8}, "complete": True, "missing": [], "rank": 1}
COMMON = {**CANDIDATE, "name": "2d", "members": ["2d"], "rank": 2, "dice_per_class_common_cases": {"1": 0.7},
          "mean_dice_common_cases": 0.7}
RESULT = {"best": BEST, "ranking_basis": "mean Dice", "candidates": [CANDIDATE, COMMON], "not_evaluated": {},
          "configurations": {"2d": {"folds": ["0"]}}, "folds": "all", "missing": [], "complete": True}


def test_round_trip_keeps_the_json_as_written(tmp_path: Path) -> None:
    """The file written by find_best before the candidates were typed reads back and rewrites identically."""
    path = tmp_path / "find_best.json"
    written = write_find_best(path, RESULT)
    assert isinstance(written, FindBest) and isinstance(written.candidates[0], CandidateScore)
    assert json.loads(path.read_text()) == RESULT
    back = read_find_best(path)
    assert back == written
    assert back.best.candidate == Candidate(("2d", "3d_fullres")) and back.best.candidate.is_ensemble
    assert back.candidates[1].mean_dice_common_cases == 0.7 and back.candidates[0].mean_dice_common_cases is None
    assert write_find_best(path, back) == back


@pytest.mark.parametrize("summary, chosen, operations", [
    (PP_SUMMARY, True, ["keep the largest foreground component", "keep the largest component of class(es) 2",
                        "remove components of class 1 smaller than 12 voxels"]),
    ({"error": "no validation outputs"}, False, []),
    (None, None, None),
    ({**PP_SUMMARY, "min_voxels": {}, "min_size_mm3": {"1": 35.5}, "closing_radius_mm": {"2": 1.5},
      "fill_holes": {"1": "2d"}}, True,  # version-2 operations, written only when adopted
     ["keep the largest foreground component", "keep the largest component of class(es) 2",
      "remove components of class 1 smaller than 35.5 mm^3", "close class 2 with a ball of radius 1.5 mm",
      "fill the holes of class 1 (per slice along z)"]),
])
def test_postprocessing_summary(tmp_path: Path, summary: dict | None, chosen: bool | None,
                                operations: list[str] | None) -> None:
    path = tmp_path / "find_best.json"
    path.write_text(json.dumps({**RESULT, "best": {**BEST, "postprocessing": summary}}))
    pp = read_find_best(path).best.postprocessing
    if summary is None:
        assert pp is None
        return
    assert pp.chosen is chosen and pp.as_postprocessing().operations() == operations
    write_find_best(path, read_find_best(path))
    rewritten = json.loads(path.read_text())["best"]["postprocessing"]
    assert rewritten.items() >= summary.items()  # an error entry stays an error (with the operations' defaults)
    assert read_find_best(path).best.postprocessing == pp


def test_summary_of_a_choice() -> None:
    choice = no_postprocessing([1])
    summary = ChosenPostprocessing.of(choice, Path("/w/2d/postprocessing.json"))
    assert summary.chosen and summary.file == "/w/2d/postprocessing.json"
    assert summary.as_postprocessing().operations() == choice.operations() == []
    assert summary.fill_holes is None and "fill_holes" not in to_jsonable(summary)  # nothing adopted: not written
    holes = dataclasses.replace(choice, version=0, fill_holes={"1": "3d"})
    summary = ChosenPostprocessing.of(holes, Path("/w/2d/postprocessing.json"))
    assert summary.fill_holes == {"1": "3d"} and summary.as_postprocessing().operations() == holes.operations()


def test_typed_result_written_as_is(tmp_path: Path) -> None:
    path = tmp_path / "find_best.json"
    result = FindBest(BestChoice("2d", members=("2d",), postprocessing=ChosenPostprocessing(error="x")),
                      candidates=(CandidateScore("2d", members=("2d",), rank=1),), folds=("0",))
    written = write_find_best(path, result)
    assert written == read_find_best(path) and written.folds == ["0"]  # normalised as read back


@pytest.mark.parametrize("change, field", [
    ({"best": {**BEST, "n_cases": "four"}}, r"best\.n_cases"),
    ({"best": {**BEST, "postprocessing": {**PP_SUMMARY, "keep_largest_foreground": "yes"}}},
     r"best\.postprocessing\.keep_largest_foreground"),
    ({"candidates": [{**CANDIDATE, "mean_dice": "high"}]}, r"candidates\[0\]\.mean_dice"),
    ({"candidates": [{**CANDIDATE, "score": 1}]}, r"candidates\[0\]: unknown field"),
])
def test_malformed_find_best_names_file_and_field(tmp_path: Path, change: dict, field: str) -> None:
    path = tmp_path / "find_best.json"
    path.write_text(json.dumps({**RESULT, **change}))
    with pytest.raises(InputError, match=r"find_best\.json\." + field.removeprefix(r"\.")):
        read_find_best(path)


def test_unreadable_or_missing_find_best(tmp_path: Path) -> None:
    path = tmp_path / "find_best.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="find_best.json: not valid JSON"):
        read_find_best(path)
    with pytest.raises(FileNotFoundError):
        read_find_best(tmp_path / "absent.json")



def test_summary_names_the_winner_and_its_postprocessing_with_before_and_after() -> None:
    pp = ChosenPostprocessing(**{**PP_SUMMARY, "keep_largest_labels": (2,)})
    ops = ("keep the largest foreground component; keep the largest component of class(es) 2; "
           "remove components of class 1 smaller than 12 voxels")
    assert pp.describe() == f"{ops}: mean Dice 0.8000 -> 0.8200"
    result = FindBest(BestChoice("2d+3d_fullres", mean_dice=0.8, n_cases=4, postprocessing=pp),
                      ranking_basis="mean Dice over all 4 cross-validation cases")
    assert result.summary() == [
        "best: 2d+3d_fullres (CV mean Dice 0.8000 on 4 cases; ranked by mean Dice over all 4 cross-validation cases)",
        f"post-processing: {ops}: mean Dice 0.8000 -> 0.8200 (/w/postprocessing_2d+3d_fullres.json)"]
    none = ChosenPostprocessing(file="/w/p.json", dice_before={"1": 0.9, "mean": 0.9},
                                dice_after={"1": 0.9, "mean": 0.9})
    assert none.describe() == "none adopted: no operation raised the mean Dice (0.9000)"
    failed = ChosenPostprocessing(error="no validation outputs")
    assert FindBest(BestChoice("2d", postprocessing=failed)).summary() == [
        "best: 2d (no CV Dice on 0 cases)", "post-processing: none chosen: no validation outputs"]
    assert FindBest(BestChoice("2d", mean_dice=0.5, n_cases=1)).summary()[1] == "post-processing: not chosen"
