"""Tests of automedseg.splits: splits.json made once, written and read only through its owner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automedseg.errors import InputError
from automedseg.splits import FoldSplit, load_or_create_splits, read_splits, write_splits
from automedseg.workspace import Workspace

CASES = [f"c{i}" for i in range(10)]


def test_made_once_then_read_back(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    splits = load_or_create_splits(ws, CASES)
    assert len(splits) == 5 and sorted(c for s in splits for c in s.val) == CASES
    assert all(isinstance(s, FoldSplit) and isinstance(s.train, tuple) for s in splits)
    assert load_or_create_splits(ws, CASES) == splits == read_splits(ws.splits_path)


def test_write_splits_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    splits = (FoldSplit(train=("a", "b"), val=("c",)), FoldSplit(train=("c",), val=("a", "b")))
    write_splits(path, splits)
    assert read_splits(path) == splits
    assert not list(tmp_path.glob(".*"))  # atomic: no temporary file left


def test_the_file_format_is_a_list_of_train_val_objects(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    write_splits(path, [FoldSplit(train=("a", "b"), val=("c",)), FoldSplit(train=("c",), val=("a", "b"))])
    expected = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["c"], "val": ["a", "b"]}]
    assert path.read_text() == json.dumps(expected, indent=2) + "\n"


def test_a_hand_edited_file_with_extra_keys_is_read(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{"train": ["a"], "val": ["b"], "note": "x"}, {"train": ["b"], "val": ["a"]}]))
    assert read_splits(path) == (FoldSplit(("a",), ("b",)), FoldSplit(("b",), ("a",)))


@pytest.mark.parametrize("splits", [
    [FoldSplit(train=("a",), val=("b",))],  # one fold
    [{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}],  # not typed
    [FoldSplit(train=("a",), val=(1,)), FoldSplit(train=("b",), val=("a",))],  # not a case id
])
def test_write_splits_refuses_a_bad_shape(tmp_path: Path, splits: list) -> None:
    path = tmp_path / "splits.json"
    with pytest.raises(InputError, match="splits.json: expected a list of at least 2"):
        write_splits(path, splits)
    assert not path.exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"train": []}), "expected a list"),
])
def test_read_splits_names_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "splits.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_splits(path)


@pytest.mark.parametrize("cases, message", [
    (CASES[:9], "not in the preprocessed dataset"),
    (CASES + ["c10"], "are in no fold"),
])
def test_split_for_another_case_list_is_refused(tmp_path: Path, cases: list[str], message: str) -> None:
    ws = Workspace(tmp_path)
    load_or_create_splits(ws, CASES)
    with pytest.raises(InputError, match=message):
        load_or_create_splits(ws, cases)
