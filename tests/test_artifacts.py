"""The typed work-folder files: each read through its owner, malformed files named with the field.

find_best.json: tests/test_best_choice.py; postprocessing.json: tests/test_postprocessing.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automedseg.errors import InputError
from automedseg.fingerprint import FINGERPRINT_VERSION, load_fingerprint
from automedseg.preprocessing import read_case_meta
from automedseg.validation_summary import read_validation_summary, write_validation_summary


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
    valid = json.loads((Path(__file__).parent / "data" / "fingerprint_v3.json").read_text())
    path.write_text(json.dumps({**valid, "files_signature": "s"}))
    assert load_fingerprint(path, signature="s") is not None
    assert load_fingerprint(path, signature="other") is None
    path.write_text(json.dumps({**valid, "fingerprint_version": FINGERPRINT_VERSION - 1, "files_signature": "s"}))
    assert load_fingerprint(path, signature="s") is None
    path.write_text(json.dumps({"fingerprint_version": FINGERPRINT_VERSION, "files_signature": "s"}))  # no fields
    assert load_fingerprint(path, signature="s") is None
    path.write_text("{broken")
    assert load_fingerprint(path, signature="s") is None
