"""The --progress json stream: epoch events with ETA, stage events, and a stdout that holds nothing else.

A whole CLI training with ``--progress json`` is parsed line by line in ``test_tracking.py`` (it shares that
training with the TensorBoard and MLflow checks)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from automedseg.cli import main
from automedseg.plans import Plans
from automedseg.progress_events import JsonProgressTracker, ProgressEvents, eta_seconds, json_session
from automedseg.tracking import RunInfo, TrackerSet
from automedseg.training_log import EpochRecord

PLAN = Path(__file__).resolve().parent.parent / "plans" / "demo_cpu.json"  # labels: outer 1, core 2


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_epoch_and_stage_events_with_eta(tmp_path: Path) -> None:
    plans = Plans.load(PLAN)
    run = RunInfo(plans=plans, config=plans.configuration("2d"), fold="all", fold_dir=tmp_path)
    out = io.StringIO()
    clock = iter([100.0])
    tracker = JsonProgressTracker(ProgressEvents(out), run, clock=lambda: next(clock))
    with TrackerSet([tracker]) as trackers:
        with trackers.stage("training", epochs_done=0, epochs=5):  # starts at t=100
            for epoch, end in enumerate([110.0, 114.0, 120.0]):
                trackers.on_epoch(EpochRecord(epoch=epoch, train_loss=0.5, pseudo_dice=(0.25, float("nan")),
                                              mean_pseudo_dice=0.25, epoch_seconds=3.0, planned_epochs=5, time=end))
        with trackers.stage("validation") as result:
            result.update(mean_dice=0.75, dice_per_class={"1": 0.5, "2": 1.0})
    events = _lines(out.getvalue())
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [(e["epoch"], e["epochs"]) for e in epochs] == [(1, 5), (2, 5), (3, 5)]
    # walls 10, 4, 6 s: 4 epochs left x 10, then 3 x 7, then 2 x mean(10, 4, 6)
    assert [e["eta_seconds"] for e in epochs] == pytest.approx([40.0, 21.0, 2 * 20 / 3])
    assert epochs[0]["pseudo_dice_per_class"] == {"outer": 0.25, "core": None}  # NaN -> null
    assert epochs[0]["configuration"] == "2d" and epochs[0]["fold"] == "all"
    validation = events[-1]
    assert validation["stage"] == "validation" and validation["status"] == "end"
    assert validation["dice_per_class"] == {"outer": 0.5, "core": 1.0}


def test_eta_needs_an_epoch_and_is_never_negative() -> None:
    assert eta_seconds([], done=0, planned=10) is None
    assert eta_seconds([5.0], done=12, planned=10) == 0


def test_json_session_sends_everything_else_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    with json_session("plan", stream=stream) as events:
        print("a log line")
        events.note(plans="plans.json")
    assert _lines(stream.getvalue()) == [{"event": "stage", "stage": "plan", "status": "start"},
                                         {"event": "stage", "stage": "plan", "status": "end", "plans": "plans.json"}]
    assert capsys.readouterr().err == "a log line\n"
    assert sys.stdout is not sys.stderr


@pytest.mark.parametrize(("exc", "status", "field"), [
    (SystemExit(2), "failed", {"exit_code": 2}),
    (SystemExit(0), "end", {}),
    (ValueError("bad spacing"), "failed", {"error": "ValueError: bad spacing"}),
])
def test_json_session_reports_how_the_command_ended(exc: BaseException, status: str, field: dict) -> None:
    stream = io.StringIO()
    with pytest.raises(type(exc)):
        with json_session("train", stream=stream):
            raise exc
    assert _lines(stream.getvalue())[-1] == {"event": "stage", "stage": "train", "status": status, **field}


def test_cli_plan_and_predict_stream_their_stage(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--progress", "json"])
    assert r.exit_code == 2
    assert _lines(r.stdout) == [{"event": "stage", "stage": "predict", "status": "start"},
                                {"event": "stage", "stage": "predict", "status": "failed", "exit_code": 2}]
    assert "name the model" in r.stderr
    r = runner.invoke(main, ["plan", str(tmp_path / "missing"), "--progress", "json"])
    assert r.exit_code == 2
    events = _lines(r.stdout)
    assert events[0] == {"event": "stage", "stage": "plan", "status": "start"}
    assert events[-1]["status"] == "failed" and r.stderr.strip()


def test_text_progress_writes_no_json(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.stdout == ""
