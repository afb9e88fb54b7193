"""The fold's log.jsonl: typed records, written by the trainer, read strictly or tolerantly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from automedseg.errors import InputError
from automedseg.training_log import EpochRecord, read_training_log, write_training_log


def test_round_trip_with_mappings_and_non_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    write_training_log(path, [{"epoch": 0, "train_loss": 1.5, "pseudo_dice": [0.5, math.nan], "epoch_seconds": 2.0},
                              EpochRecord(epoch=1, mean_pseudo_dice=math.inf, epoch_seconds=1.0)])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]  # strict JSON: NaN/inf written as null
    records = read_training_log(path)
    assert records[0].pseudo_dice == (0.5, None) and records[1].mean_pseudo_dice is None


@pytest.mark.parametrize(("line", "needle"), [
    ("{not json", "line 2 is not JSON"),
    ('{"epoch": "one"}', "epoch"),
    ('{"epoch": 1, "surprise": 2}', "surprise"),
])
def test_bad_lines_raise_or_are_skipped(tmp_path: Path, line: str, needle: str) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"epoch": 0, "epoch_seconds": 1.0}\n' + line + "\n")
    with pytest.raises(InputError, match=needle):
        read_training_log(path)
    problems: list[str] = []
    assert [r.epoch for r in read_training_log(path, problems=problems)] == [0]
    assert len(problems) == 1 and needle in problems[0]


def test_missing_log_is_empty(tmp_path: Path) -> None:
    assert read_training_log(tmp_path / "nope.jsonl") == []
