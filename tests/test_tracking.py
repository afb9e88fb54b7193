"""Experiment tracking: the tracker set, TensorBoard event files read back with TensorBoard's own reader, MLflow
runs in a local file store, and one CLI training reported to all of them."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from automedseg import tracking
from automedseg.cli import main
from automedseg.errors import InputError
from automedseg.plans import Plans
from automedseg.tracking import RunInfo, TrackerSet, mlflow_tracker, open_trackers, tensorboard_tracker
from automedseg.training_log import EpochRecord

PLAN = Path(__file__).resolve().parent.parent / "plans" / "demo_cpu.json"  # labels: outer 1, core 2


def _run(fold_dir: Path, log: list[str] | None = None) -> RunInfo:
    plans = Plans.load(PLAN)
    fold_dir.mkdir(parents=True, exist_ok=True)
    return RunInfo(plans=plans, config=plans.configuration("3d_fullres"), fold=0, fold_dir=fold_dir,
                   log=(log.append if log is not None else lambda m: None))


def _records(epochs: range, *, planned: int = 3) -> list[EpochRecord]:
    return [EpochRecord(epoch=e, train_loss=1.0 - 0.1 * e, val_loss=0.5, pseudo_dice=(0.2 + 0.1 * e, None),
                        mean_pseudo_dice=0.2 + 0.1 * e, ema_pseudo_dice=0.2, mean_patch_pseudo_dice=0.6,
                        lr=0.01 / (e + 1), epoch_seconds=2.0 + e, seconds_per_iteration=0.1, data_wait_fraction=0.05,
                        planned_epochs=planned, time=1_700_000_000.0 + 10 * e) for e in epochs]


class _Recorder:
    def __init__(self, calls: list[tuple], fail_on: str | None = None) -> None:
        self.calls, self.fail_on = calls, fail_on

    def on_epoch(self, record: EpochRecord) -> None:
        if self.fail_on == "epoch":
            raise RuntimeError("disk full")
        self.calls.append(("epoch", record.epoch))

    def on_stage(self, stage: str, status: str, **info: Any) -> None:
        self.calls.append((stage, status, *sorted(info)))

    def close(self) -> None:
        self.calls.append(("close",))


def test_tracker_set_reports_stages_drops_a_failing_tracker_and_notes_failures(tmp_path: Path) -> None:
    calls: list[tuple] = []
    log: list[str] = []
    run = _run(tmp_path / "fold_0", log)
    good, bad = _Recorder(calls), _Recorder([], fail_on="epoch")
    assert isinstance(good, tracking.Tracker)
    with pytest.raises(KeyError):
        with open_trackers([lambda r: good, lambda r: bad, lambda r: None], run) as trackers:
            assert len(trackers.trackers) == 2  # a factory returning None adds nothing
            with trackers.stage("training", epochs_done=0, epochs=2):
                trackers.on_epoch({"epoch": 0, "train_loss": 1.0, "pseudo_dice": [0.5, float("nan")]})
                trackers.on_epoch(_records(range(1, 2))[0])
            with trackers.stage("validation"):
                raise KeyError("case_003")
    assert calls == [("training", "start", "epochs", "epochs_done"), ("epoch", 0), ("epoch", 1), ("training", "end"),
                     ("validation", "start"), ("validation", "failed", "error"), ("close",)]
    assert len(log) == 1 and "_Recorder failed (RuntimeError: disk full)" in log[0]
    assert open_trackers([lambda r: good], run, active=False).trackers == []  # rank > 0 tracks nothing


def test_run_info_names_classes_and_flattens_the_plan(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert run.class_names == ("outer", "core")
    assert run.per_class([0.5, None]) == {"outer": 0.5, "core": None}
    assert run.per_class({"2": 0.9}) == {"core": 0.9}
    params = run.params()
    assert params["configuration"] == "3d_fullres" and params["dataset"] == "Demo"
    assert params["patch_size"] == "x".join(str(s) for s in run.config.patch_size)
    assert params["width"] == str(run.config.network.features_per_stage[0])
    assert list(json.loads(run.plan_json())["configurations"]) == ["3d_fullres"]


def _scalars(folder: Path) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc, {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_events_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run = _run(tmp_path / "fold_0")
    tracker = tensorboard_tracker(run)
    assert tracker is not None
    with TrackerSet([tracker]) as trackers:
        with trackers.stage("training", epochs_done=0, epochs=3):
            for r in _records(range(3)):
                trackers.on_epoch(r)
        with trackers.stage("validation") as end:
            end.update(mean_dice=0.8, dice_per_class={"1": 0.9, "2": 0.7})
    acc, scalars = _scalars(run.fold_dir)
    assert [s for s, _ in scalars["loss/train"]] == [0, 1, 2]
    assert scalars["loss/train"][2][1] == pytest.approx(0.8)
    assert [v for _, v in scalars["pseudo_dice/outer"]] == pytest.approx([0.2, 0.3, 0.4])
    assert "pseudo_dice/core" not in scalars  # never scored (None)
    assert scalars["learning_rate"][1][1] == pytest.approx(0.005)
    assert scalars["time/epoch_seconds"][0][1] == pytest.approx(2.0)
    assert scalars["validation/dice/core"] == [(2, pytest.approx(0.7))]
    assert scalars["validation/mean_dice"] == [(2, pytest.approx(0.8))]
    plan_text = acc.Tensors("plan/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"dataset_name": "Demo"' in plan_text and '"3d_fullres"' in plan_text


def test_tensorboard_resume_hides_what_a_crashed_run_wrote_after_its_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run = _run(tmp_path / "fold_0")
    with TrackerSet([tensorboard_tracker(run)]) as trackers:  # crashed after epoch 2, checkpoint of epoch 1
        trackers.on_stage("training", "start", epochs_done=0, epochs=4)
        for r in _records(range(3), planned=4):
            trackers.on_epoch(r)
    with TrackerSet([tensorboard_tracker(run)]) as trackers:  # resumed at epoch 2
        trackers.on_stage("training", "start", epochs_done=2, epochs=4)
        for r in _records(range(2, 4), planned=4):
            trackers.on_epoch(EpochRecord(**{**r.__dict__, "train_loss": 5.0}))
    _, scalars = _scalars(run.fold_dir)
    assert scalars["loss/train"] == [(0, pytest.approx(1.0)), (1, pytest.approx(0.9)), (2, 5.0), (3, 5.0)]


def test_without_tensorboard_nothing_is_written_and_one_line_said(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.setattr(tracking, "_told_no_tensorboard", False)
    log: list[str] = []
    run = _run(tmp_path / "fold_0", log)
    with open_trackers(None, run) as trackers:
        trackers.on_stage("training", "start", epochs_done=0, epochs=1)
        trackers.on_epoch(_records(range(1))[0])
    assert tensorboard_tracker(run) is None
    assert list(run.fold_dir.iterdir()) == []
    assert len(log) == 1 and "tensorboard is not installed" in log[0]


def _mlflow_client(uri: str, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def test_mlflow_run_in_a_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    run = _run(tmp_path / "fold_0")
    run.plans.save(run.fold_dir / "plans.json")
    with TrackerSet([mlflow_tracker(uri)(run)]) as trackers:
        with trackers.stage("training", epochs_done=0, epochs=3):
            for r in _records(range(3)):
                trackers.on_epoch(r)
        with trackers.stage("validation") as end:
            end.update(mean_dice=0.8, dice_per_class={"1": 0.9, "2": 0.7})
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the opt-in for a named folder does not outlive the calls
    client = _mlflow_client(uri, monkeypatch)
    (found,) = client.search_runs([client.get_experiment_by_name("Demo").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "3d_fullres fold 0"
    assert found.data.params["configuration"] == "3d_fullres" and found.data.params["batch_size"] == str(
        run.config.batch_size)
    assert {"patch_size", "width", "epochs", "iterations_per_epoch", "optimizer"} <= set(found.data.params)
    history = client.get_metric_history(found.info.run_id, "train_loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 1.0), (1, 0.9), (2, 0.8)]
    assert [m.value for m in client.get_metric_history(found.info.run_id, "pseudo_dice/outer")] == pytest.approx(
        [0.2, 0.3, 0.4])
    assert found.data.metrics["validation_mean_dice"] == pytest.approx(0.8)
    assert found.data.metrics["validation_dice/core"] == pytest.approx(0.7)
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["plans.json"]


def test_mlflow_run_of_a_failed_training_is_marked_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(RuntimeError):
        with TrackerSet([mlflow_tracker(uri, experiment="crashes")(_run(tmp_path / "fold_0"))]) as trackers:
            with trackers.stage("training", epochs_done=0, epochs=3):
                raise RuntimeError("out of memory")
    client = _mlflow_client(uri, monkeypatch)
    (found,) = client.search_runs([client.get_experiment_by_name("crashes").experiment_id])
    assert found.info.status == "FAILED"


def test_missing_mlflow_is_a_clear_error_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(InputError, match=r"automedseg\[mlflow\]"):
        mlflow_tracker("file:///tmp/mlruns")
    dataset, work = tmp_path / "Dataset_X", tmp_path / "work"
    dataset.mkdir()
    work.mkdir()
    shutil.copy(PLAN, work / "plans.json")
    r = CliRunner().invoke(main, ["train", str(dataset), "--work-dir", str(work), "--mlflow", "file:///tmp/mlruns"])
    assert r.exit_code == 2, r.output
    assert "MLflow is not installed" in r.stderr and "automedseg[mlflow]" in r.stderr


@pytest.fixture(scope="module")
def cli_training(trained_demo_validated: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Any, Path, str]:
    """Fold 1 of the demo trained for 2 one-iteration epochs through the CLI with ``--progress json`` (and
    ``--mlflow`` into a file store when MLflow is installed): (result, fold folder, MLflow URI)."""
    dataset, validated = trained_demo_validated
    root = tmp_path_factory.mktemp("tracked")
    work = Path(shutil.copytree(validated, root / "work"))
    uri = (root / "mlruns").as_uri()
    mlflow = ["--mlflow", uri] if tracking._installed("mlflow") else []
    r = CliRunner().invoke(main, ["train", str(dataset), "--work-dir", str(work), "-f", "1", "--epochs", "2",
                                  "--iterations-per-epoch", "1", "--workers", "0", "--threads", "1", "--device", "cpu",
                                  "--progress", "json", *mlflow])
    assert r.exit_code == 0, r.output
    return r, work / "3d_fullres" / "fold_1", uri


def test_cli_progress_json_is_one_event_a_line_on_stdout(cli_training: tuple[Any, Path, str]) -> None:
    result, _, _ = cli_training
    events = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON on stdout
    flow = [(e["event"], e.get("stage"), e.get("status")) for e in events]
    assert flow == [("stage", "train", "start"), ("stage", "training", "start"), ("epoch", None, None),
                    ("epoch", None, None), ("stage", "training", "end"), ("stage", "validation", "start"),
                    ("stage", "validation", "end"), ("stage", "train", "end")]
    first, second = events[2], events[3]
    assert (first["epoch"], first["epochs"], second["epoch"]) == (1, 2, 2)
    assert first["configuration"] == "3d_fullres" and first["fold"] == 1
    assert first["eta_seconds"] > 0 and second["eta_seconds"] == 0
    assert set(first["pseudo_dice_per_class"]) <= {"outer", "core"} and isinstance(first["train_loss"], float)
    assert set(events[6]["dice_per_class"]) == {"outer", "core"} and 0 <= events[6]["mean_dice"] <= 1
    assert "epoch 2/2" in result.stderr and "validation mean Dice" in result.stderr  # messages on stderr


def test_cli_training_writes_tensorboard_events_in_the_fold_folder(cli_training: tuple[Any, Path, str]) -> None:
    pytest.importorskip("tensorboard")
    _, fold_dir, _ = cli_training
    assert list(fold_dir.glob("events.out.tfevents.*"))
    _, scalars = _scalars(fold_dir)
    assert [s for s, _ in scalars["loss/train"]] == [0, 1]
    assert {"learning_rate", "time/epoch_seconds", "pseudo_dice/ema", "validation/mean_dice"} <= set(scalars)


def test_cli_training_with_mlflow(cli_training: tuple[Any, Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    _, fold_dir, uri = cli_training
    client = _mlflow_client(uri, monkeypatch)
    (found,) = client.search_runs([client.get_experiment_by_name("Demo").experiment_id])
    assert found.info.status == "FINISHED" and found.data.params["fold"] == "1"
    assert len(client.get_metric_history(found.info.run_id, "train_loss")) == 2
    assert "validation_mean_dice" in found.data.metrics
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["plans.json"]
    assert found.data.tags["automedseg.fold_dir"] == str(fold_dir)
