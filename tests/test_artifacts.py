"""The typed work-folder files: each read through its owner, malformed files named with the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automedseg.errors import InputError
from automedseg.fingerprint import FINGERPRINT_VERSION, load_fingerprint
from automedseg.model_selection import Candidate, FindBest, read_find_best, write_find_best
from automedseg.preprocessing import read_case_meta
from automedseg.validation_summary import read_validation_summary, write_validation_summary

BEST = {"configuration": "2d+3d_fullres", "members": ["2d", "3d_fullres"], "mean_dice": 0.8,
        "dice_per_class": {"1": 0.8}, "n_cases": 4, "complete": True, "postprocessing": None,
        "predict_command": "automedseg predict ..."}


def test_find_best_round_trip_keeps_the_json_readable(tmp_path: Path) -> None:
    path = tmp_path / "find_best.json"
    result = {"best": BEST, "ranking_basis": "mean Dice", "candidates": [{"name": "2d", "rank": 1}],
              "not_evaluated": {}, "configurations": {}, "folds": "all", "missing": [], "complete": True}
    written = write_find_best(path, result)
    assert isinstance(written, FindBest)
    assert json.loads(path.read_text()) == result
    back = read_find_best(path)
    assert back == written
    assert back.best.candidate == Candidate(("2d", "3d_fullres")) and back.best.candidate.is_ensemble


def test_malformed_find_best_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "find_best.json"
    path.write_text(json.dumps({"best": {**BEST, "n_cases": "four"}}))
    with pytest.raises(InputError, match=r"find_best\.json\.best\.n_cases"):
        read_find_best(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="find_best.json: not valid JSON"):
        read_find_best(path)
    with pytest.raises(FileNotFoundError):
        read_find_best(tmp_path / "absent.json")


def test_validation_summary_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    data = {"configuration": "2d", "fold": "fold_0", "cases": ["a", "b"], "mean_dice": float("nan"),
            "dice_per_class": {"1": 0.5}, "summary": {"per_label": {}}, "per_case": [], "seconds": 2.0}
    write_validation_summary(path, data)
    assert json.loads(path.read_text())["mean_dice"] is None  # non-finite numbers become null
    summary = read_validation_summary(path)
    assert summary.cases == ("a", "b") and summary.mean_dice is None
    path.write_text(json.dumps({"cases": "a"}))
    with pytest.raises(InputError, match=r"summary\.json\.cases"):
        read_validation_summary(path)


def test_case_meta_reader(tmp_path: Path) -> None:
    (tmp_path / "c1.json").write_text(json.dumps({"label_file": "/x/c1.nii.gz"}))
    meta = read_case_meta(tmp_path, "c1")
    assert meta.label_file == "/x/c1.nii.gz" and meta.properties is None and meta.image_files == ()
    (tmp_path / "c2.json").write_text(json.dumps({"label_file": 3}))
    with pytest.raises(InputError, match=r"c2\.json: label_file"):
        read_case_meta(tmp_path, "c2")


def test_load_fingerprint_only_when_reusable(tmp_path: Path) -> None:
    path = tmp_path / "fingerprint.json"
    assert load_fingerprint(path, signature="s") is None
    path.write_text(json.dumps({"fingerprint_version": FINGERPRINT_VERSION, "files_signature": "s"}))
    assert load_fingerprint(path, signature="s") is not None
    assert load_fingerprint(path, signature="other") is None
    path.write_text(json.dumps({"fingerprint_version": FINGERPRINT_VERSION - 1, "files_signature": "s"}))
    assert load_fingerprint(path, signature="s") is None
    path.write_text("{broken")
    assert load_fingerprint(path, signature="s") is None
