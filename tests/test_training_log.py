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


@pytest.mark.parametrize(("line", "patch", "images", "seconds"), [
    # written before whole images were scored: pseudo_dice was the patch figure, the new fields are absent
    ('{"epoch": 0, "pseudo_dice": [0.7], "mean_pseudo_dice": 0.7, "ema_pseudo_dice": 0.7, "epoch_seconds": 2.0}',
     (), None, None),
    # whole images scored, the patch figure beside them
    ('{"epoch": 3, "pseudo_dice": [0.4], "mean_pseudo_dice": 0.4, "ema_pseudo_dice": 0.45, "patch_pseudo_dice": '
     '[0.7], "mean_patch_pseudo_dice": 0.7, "pseudo_dice_images": 6, "pseudo_dice_seconds": 0.3, '
     '"epoch_seconds": 2.0}', (0.7,), 6, 0.3),
    # an epoch that scored no whole image (a large one is paid for over several epochs)
    ('{"epoch": 4, "pseudo_dice": [], "mean_pseudo_dice": null, "ema_pseudo_dice": 0.45, "patch_pseudo_dice": '
     '[0.7], "pseudo_dice_images": 0, "pseudo_dice_seconds": 0.0, "epoch_seconds": 2.0}', (0.7,), 0, 0.0),
])
def test_patch_and_whole_image_fields_are_read_from_old_and_new_logs(tmp_path: Path, line: str, patch: tuple,
                                                                     images: int | None,
                                                                     seconds: float | None) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(line + "\n")
    (record,) = read_training_log(path)  # strict: no field is unknown or mistyped
    assert (record.patch_pseudo_dice, record.pseudo_dice_images, record.pseudo_dice_seconds) == (patch, images,
                                                                                                  seconds)
    write_training_log(path, [record])
    assert read_training_log(path) == [record]


@pytest.mark.parametrize(("line", "planned"), [
    ('{"epoch": 0, "epoch_seconds": 1.0, "seconds_per_iteration": 0.4}', None),  # a log from before the field
    ('{"epoch": 0, "epoch_seconds": 1.0, "seconds_per_iteration": 0.4, "planned_seconds_per_iteration": 0.3}', 0.3),
])
def test_planned_step_beside_the_measured_one(tmp_path: Path, line: str, planned: float | None) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(line + "\n")
    (record,) = read_training_log(path)
    assert record.planned_seconds_per_iteration == planned and record.seconds_per_iteration == 0.4
