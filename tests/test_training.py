"""Trainer tests on a tiny planned demo dataset: a few iterations each."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from automedseg.demo import make_demo_dataset
from automedseg.device import precision_for
from automedseg.pipeline import run_plan
from automedseg.plans import Plans
from automedseg.splits import FoldSplit, load_or_create_splits
from automedseg.training import (
    DeepSupervisionLoss,
    TrainOptions,
    _rng_state,
    _set_rng_state,
    soft_dice_loss,
    train_fold,
)
from automedseg.workspace import Workspace

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Workspace]:
    root = tmp_path_factory.mktemp("train")
    dataset = make_demo_dataset(root / "Dataset_Demo", n_cases=10, n_test=1, seed=3)
    ws = Workspace.for_dataset(dataset)
    run_plan(dataset, ws, configurations=["2d", "3d_fullres"], jobs=1, device="reference-cpu-2core",
             time_budget_s=60.0)
    return dataset, ws


def _fast(**kw) -> TrainOptions:
    base = dict(epochs=2, iterations_per_epoch=4, num_workers=0, threads=1, progress=False, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _history(fold_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (fold_dir / "log.jsonl").read_text().splitlines()]


def test_soft_dice_perfect_prediction_is_zero() -> None:
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1
    logits = torch.where(torch.arange(2).view(1, 2, 1, 1) == target, 20.0, -20.0).float()
    assert soft_dice_loss(logits, target) < 1e-4


def test_deep_supervision_weights_drop_the_lowest_level() -> None:
    loss = DeepSupervisionLoss(3)
    assert loss.weights[-1] == 0
    assert abs(sum(loss.weights) - 1) < 1e-9
    assert loss.weights[0] > loss.weights[1]


def test_rng_state_round_trip() -> None:
    _ = np.random.rand(3)
    state = _rng_state()
    a = (np.random.rand(2), torch.rand(2))
    _set_rng_state(state)
    b = (np.random.rand(2), torch.rand(2))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_splits_are_made_once_and_reused(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ids = [f"c{i}" for i in range(10)]
    first = load_or_create_splits(ws, ids)
    assert len(first) == 5 and sorted(c for s in first for c in s.val) == ids
    edited = [{"train": ids[2:], "val": ids[:2]}] * 5
    ws.splits_path.write_text(json.dumps(edited))
    assert load_or_create_splits(ws, ids) == (FoldSplit(train=tuple(ids[2:]), val=tuple(ids[:2])),) * 5


def test_loss_decreases_on_the_demo(planned: tuple[Path, Workspace]) -> None:
    _, ws = planned
    res = train_fold(ws, "3d_fullres", 0, options=_fast(epochs=4, iterations_per_epoch=8, validate=False,
                                                        restart=True), log=lambda s: None)
    hist = _history(res.fold_dir)
    assert len(hist) == 4
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_train_2d_and_3d_validate_and_record_overrides(planned: tuple[Path, Workspace], configuration: str) -> None:
    _, ws = planned
    lines: list[str] = []
    res = train_fold(ws, configuration, 1, options=_fast(restart=True), log=lines.append)
    fold_dir = res.fold_dir
    planned_s = Plans.load(fold_dir / "plans.json").configuration(configuration).training \
        .estimated_seconds_per_iteration
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert planned_s and f"planned {planned_s:.3f} s/it (measured " in epochs[0]  # the first epoch: both steps
    assert "planned" not in epochs[1]
    assert [h["planned_seconds_per_iteration"] for h in _history(fold_dir)] == [planned_s] * 2
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "log.jsonl",
                 "progress.png", "plans.json"):
        assert (fold_dir / name).is_file(), name
    copy = Plans.load(fold_dir / "plans.json")
    assert list(copy.configurations) == [configuration]
    assert copy.configurations[configuration].training.epochs == 2
    assert copy.configurations[configuration].training.iterations_per_epoch == 4
    assert copy.configurations[configuration].training.precision == precision_for(torch.device("cpu"))
    assert copy.configurations[configuration].training.augment_on_device is False  # CPU: the workers augment
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert summary["mean_dice"] is not None and 0.0 <= summary["mean_dice"] <= 1.0
    assert summary["mirror_axes"] in ([], list(copy.configurations[configuration].augmentation.mirror_axes))
    val_ids = summary["cases"]
    assert all((fold_dir / "validation" / f"{c}.npz").is_file() for c in val_ids)
    ckpt = torch.load(fold_dir / "checkpoint_latest.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    _check_pseudo_dice_log(fold_dir, n_foreground=copy.num_classes - 1)


def _check_pseudo_dice_log(fold_dir: Path, *, n_foreground: int) -> None:
    """The log holds the whole-image pseudo-Dice (which the EMA and checkpoint_best follow) and the patch one."""
    from automedseg.training_log import read_training_log

    records = read_training_log(fold_dir / "log.jsonl")  # strict: every field typed
    assert records[0].pseudo_dice_images >= 1  # the first epoch always scores a whole image
    for r in records:
        assert len(r.patch_pseudo_dice) == n_foreground and r.mean_patch_pseudo_dice is not None
        assert len(r.pseudo_dice) == (n_foreground if r.pseudo_dice_images else 0)
        assert 0.0 <= r.pseudo_dice_seconds < r.epoch_seconds
    first = next(r for r in records if r.mean_pseudo_dice is not None)
    assert first.ema_pseudo_dice == first.mean_pseudo_dice  # the EMA starts from whole images, not patches
    best = torch.load(fold_dir / "checkpoint_best.pt", weights_only=True)
    assert best["ema_pseudo_dice"] == max(r.ema_pseudo_dice for r in records if r.ema_pseudo_dice is not None)


def test_resume_continues_from_the_checkpoint(planned: tuple[Path, Workspace]) -> None:
    _, ws = planned
    first = train_fold(ws, "3d_fullres", 2, options=_fast(epochs=1, restart=True, validate=False),
                       log=lambda s: None)
    before = _history(first.fold_dir)
    messages: list[str] = []
    train_fold(ws, "3d_fullres", 2, options=_fast(epochs=3, validate=False), log=messages.append)
    after = _history(first.fold_dir)
    assert any("resuming" in m and "epoch 1" in m for m in messages)
    assert len(after) == 3
    assert after[0] == before[0]
    assert Plans.load(first.fold_dir / "plans.json").configurations["3d_fullres"].training.epochs == 3
    # Running it again finds the fold finished and does not train.
    msgs2: list[str] = []
    train_fold(ws, "3d_fullres", 2, options=_fast(epochs=3, validate=False), log=msgs2.append)
    assert any("already trained" in m for m in msgs2)
    assert len(_history(first.fold_dir)) == 3


def test_resume_with_rng_states_moved_by_map_location(planned: tuple[Path, Workspace], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, moved) -> None:
    """On CUDA the checkpoint is loaded with ``map_location`` = the GPU, which moved the RNG states there and
    broke resuming (``RNG state must be a torch.ByteTensor``); resuming from moved states now trains exactly as
    resuming from CPU states."""
    import automedseg.training as training

    _, ws = planned
    a, b = tmp_path / "a", tmp_path / "b"
    train_fold(ws, "3d_fullres", 0, options=_fast(epochs=1, restart=True, validate=False, output_dir=a),
               log=lambda s: None)
    shutil.copytree(a, b)
    train_fold(ws, "3d_fullres", 0, options=_fast(epochs=2, validate=False, output_dir=a), log=lambda s: None)
    real = training.load_checkpoint
    calls: list[Path] = []

    def load_moved(path: Path, device: torch.device | str = "cpu") -> dict:
        calls.append(Path(path))
        return moved(real(path, device))

    monkeypatch.setattr(training, "load_checkpoint", load_moved)
    messages: list[str] = []
    train_fold(ws, "3d_fullres", 0, options=_fast(epochs=2, validate=False, output_dir=b), log=messages.append)
    assert b / "checkpoint_latest.pt" in calls and any("resuming" in m for m in messages)
    state = torch.get_rng_state()
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    ha, hb = _history(a), _history(b)
    assert len(ha) == len(hb) == 2
    assert ha[1]["train_loss"] == hb[1]["train_loss"]
    wa = torch.load(a / "checkpoint_final.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint_final.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_training_with_augmentation_on_the_device_forced_on(planned: tuple[Path, Workspace], tmp_path: Path,
                                                            configuration: str) -> None:
    """The CUDA path (workers read windows, the batch is augmented where the network runs), here on the CPU."""
    _, ws = planned
    res = train_fold(ws, configuration, 0, options=_fast(epochs=1, num_workers=1, validate=False,
                                                         augment_on_device=True, output_dir=tmp_path / "fold"),
                     log=lambda s: None)
    (entry,) = _history(res.fold_dir)
    assert np.isfinite(entry["train_loss"]) and 0.0 <= entry["data_wait_fraction"] <= 1.0
    assert Plans.load(res.fold_dir / "plans.json").configurations[configuration].training.augment_on_device is True
    assert (res.fold_dir / "checkpoint_final.pt").is_file()


def test_fold_all_trains_on_every_case(planned: tuple[Path, Workspace]) -> None:
    _, ws = planned
    res = train_fold(ws, "3d_fullres", "all", options=_fast(epochs=1, restart=True), log=lambda s: None)
    assert res.fold_dir.name == "fold_all"
    assert (res.fold_dir / "checkpoint_final.pt").is_file()


def test_pretrained_loads_matching_layers(planned: tuple[Path, Workspace]) -> None:
    _, ws = planned
    src = train_fold(ws, "3d_fullres", 3, options=_fast(epochs=1, restart=True, validate=False),
                     log=lambda s: None)
    messages: list[str] = []
    train_fold(ws, "3d_fullres", 4, options=_fast(epochs=1, restart=True, validate=False,
                                                  pretrained=src.fold_dir / "checkpoint_final.pt"),
               log=messages.append)
    assert any("pretrained:" in m and "0 left" in m for m in messages)


def test_sigkill_mid_epoch_then_resume(planned: tuple[Path, Workspace]) -> None:
    """Kill the CLI with SIGKILL while an epoch runs; the re-run resumes and loses at most that epoch."""
    dataset, ws = planned
    cmd = [sys.executable, "-m", "automedseg.cli", "train", str(dataset), "--work-dir", str(ws.root),
           "-c", "3d_fullres", "-f", "0", "--epochs", "3", "--iterations-per-epoch", "6", "--workers", "1",
           "--threads", "1", "--device", "cpu", "--no-validate", "--restart"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fold_dir = ws.fold_dir("3d_fullres", 0)
    shutil.rmtree(fold_dir, ignore_errors=True)  # wait for this run's first epoch, not an earlier test's log
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    log_path = fold_dir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log_path.is_file() and len(log_path.read_text().splitlines()) >= 1:
            break
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stdout.read().decode() if proc.stdout else ''}")
        time.sleep(0.05)
    time.sleep(0.3)  # inside epoch 2
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the trainer only, as the kernel's OOM killer would
    proc.wait()
    try:
        if sys.platform.startswith("linux"):  # its augmentation workers follow it (PR_SET_PDEATHSIG)
            assert workers, "no augmentation worker found"
            deadline = time.time() + 15
            while time.time() < deadline and any(_alive(pid) for pid in workers):
                time.sleep(0.1)
            assert not [pid for pid in workers if _alive(pid)], "orphaned augmentation workers"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = len(_history(fold_dir))
    assert 1 <= done_before < 3
    resumed = subprocess.run([c for c in cmd if c != "--restart"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {fold_dir} at epoch {done_before}" in resumed.stdout
    hist = _history(fold_dir)
    assert [h["epoch"] for h in hist] == list(range(3))
    ckpt = torch.load(fold_dir / "checkpoint_final.pt", weights_only=True)
    assert ckpt["epoch"] == 2


def test_sparse_label_values_end_to_end(tmp_path: Path, write_nnunet_dataset) -> None:
    """Labels {0, 1, 200}: 3 output classes; validation and predicted masks hold the declared values, 200 too."""
    from automedseg.inference import load_fold, predict_folder
    from automedseg.io import read_label
    from automedseg.model_selection import determine_postprocessing
    from automedseg.postprocessing import apply_postprocessing

    ds = write_nnunet_dataset(tmp_path / "Dataset040_Sparse", n_cases=5, n_test=1, shape=(10, 32, 32),
                              spacing_zyx=(1.0, 1.0, 1.0), oblique_every=0, label_values=(1, 200))
    assert ds.labels == {"background": 0, "outer": 1, "inner": 200}
    ws = Workspace.for_dataset(ds.root)
    run_plan(ds.root, ws, configurations=["3d_fullres"], jobs=1, device="reference-cpu-2core",
             time_budget_s=60.0, log=lambda s: None)
    plans = Plans.load(ws.plans_path)
    assert plans.num_classes == 3 and plans.label_values == (0, 1, 200)
    res = train_fold(ws, "3d_fullres", 0, options=_fast(epochs=2, iterations_per_epoch=5), log=lambda s: None)
    fold = load_fold(res.fold_dir, device=torch.device("cpu"))
    patch = fold.config.patch_size
    with torch.no_grad():
        assert fold.model(torch.zeros(1, 1, *patch)).shape[1] == 3  # one output per declared value
    summary = json.loads((res.fold_dir / "validation" / "summary.json").read_text())
    assert set(summary["dice_per_class"]) == {"1", "200"}  # scored against the raw labels in declared values
    assert summary["dice_per_class"]["200"] > 0.5
    for case in summary["cases"]:
        seg, _ = read_label(res.fold_dir / "validation" / f"{case}.nii.gz")
        assert set(np.unique(seg).tolist()) == {0, 1, 200}
        with np.load(res.fold_dir / "validation" / f"{case}.npz") as npz:
            assert npz["probabilities"].shape[0] == 3  # index order: channel 2 is value 200
    choice = determine_postprocessing(ws, "3d_fullres", folds=[0])
    assert choice.labels == (1, 200)
    out = tmp_path / "pred"
    report = predict_folder(ds.root / "imagesTs", out, [[res.fold_dir]], device="cpu", mirror=False,
                            postprocessing=lambda seg, spacing: apply_postprocessing(seg, choice, spacing_mm=spacing),
                            log=lambda s: None)
    assert report.written == ds.test_ids
    for case in ds.test_ids:
        pred, _ = read_label(out / f"{case}{ds.ending}")
        assert set(np.unique(pred).tolist()) == {0, 1, 200}


@pytest.mark.parametrize(("done", "epoch_seconds", "spent_s", "expected"), [
    (1, [16.4], 16.4, 15),  # a slow first epoch shortens the schedule ...
    (5, [16.4, 14.7, 12.7, 11.9, 13.0], 68.7, 19),  # ... until faster epochs give the time back
    (3, [1.0, 1.0, 1.0], 3.0, 249),  # faster than planned: extended to fill the budget
    (4, [80.0, 80.0, 80.0, 80.0], 320.0, 4),  # over budget: stop after what is done
])
def test_budget_epochs_refits_both_ways(done: int, epoch_seconds: list[float], spent_s: float, expected: int) -> None:
    from automedseg.training import budget_epochs

    got = budget_epochs(done=done, ceiling=20, epoch_seconds=epoch_seconds, budget_s=255.0, spent_s=spent_s)
    assert got == expected


@pytest.mark.parametrize(("fixed", "budget_s"), [(False, 30.0), (False, 600.0), (True, 30.0), (True, 600.0)])
def test_time_budget_override_uses_the_planner_schedule(planned: tuple[Path, Workspace], fixed: bool,
                                                        budget_s: float) -> None:
    """``train --time-budget`` refits with the planner's rule; a plan with fixed epochs (a trial) keeps them."""
    import dataclasses

    from automedseg.planning import schedule_for_budget
    from automedseg.training import apply_overrides

    _, ws = planned
    config = Plans.load(ws.plans_path).configuration("3d_fullres")
    config = dataclasses.replace(config, training=dataclasses.replace(config.training, epochs=7, fixed_epochs=fixed))
    got = apply_overrides(config, TrainOptions(time_budget_s=budget_s)).training
    want = schedule_for_budget(config.training.estimated_seconds_per_iteration, budget_s,
                               fixed_epochs=7 if fixed else None)
    assert (got.epochs, got.iterations_per_epoch, got.val_iterations) == tuple(want)
    if fixed:
        assert got.epochs == 7
    assert got.time_budget_s == budget_s


def test_fixed_epochs_are_not_refitted_to_the_budget() -> None:
    from automedseg.training import budget_epochs

    kw = dict(done=1, ceiling=20, epoch_seconds=[80.0], budget_s=100.0, spent_s=80.0)
    assert budget_epochs(**kw) == 1
    assert budget_epochs(**kw, fixed_epochs=True) == 20


def test_a_budgeted_run_ends_in_the_last_5_percent_of_its_budget(planned: tuple[Path, Workspace]) -> None:
    """A plan that over- or under-estimates the step is refitted (extended or shortened) to fill its budget."""
    _, ws = planned
    budget_s = 30.0
    plans = Plans.load(ws.plans_path)
    config = plans.configuration("3d_fullres")
    # a plan that under-estimates what fits: 3 epochs (the run takes about 1.5 s an epoch here), so that the refit
    # is certain whatever this machine's speed against the plan's calibration
    short = dataclasses.replace(config, training=dataclasses.replace(config.training, epochs=3))
    t0 = time.perf_counter()
    result = train_fold(ws, "3d_fullres", 1, plans=plans.with_configuration(short), options=TrainOptions(
        time_budget_s=budget_s, iterations_per_epoch=4, num_workers=0, threads=1, progress=False, device="cpu",
        restart=True), log=print)
    wall = time.perf_counter() - t0
    assert result.validation is not None and result.validation["mean_dice"] is not None
    assert result.epochs_run > 3  # refitted (extended) to the measured epochs
    assert 0.95 * budget_s <= wall <= 1.02 * budget_s, (wall, result.epochs_run)


def test_own_core_placement_is_applied_during_the_epochs_and_restored(
        planned: tuple[Path, Workspace], tmp_path: Path, allowed_cpus: Callable[[int], set[int]]) -> None:
    _, ws = planned
    plans = Plans.load(ws.plans_path)
    config = plans.configuration("3d_fullres")
    own = dataclasses.replace(config, training=dataclasses.replace(config.training, worker_placement="own_core"))
    cpus, threads_before = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    seen: list[tuple[set[int], int, list[set[int]]]] = []

    def during(epoch: int, ema: float) -> bool:  # after each epoch, the loaders still open
        seen.append((allowed_cpus(os.getpid()), torch.get_num_threads(),
                     [allowed_cpus(pid) for pid in _children(os.getpid())]))
        return False

    lines: list[str] = []
    train_fold(ws, "3d_fullres", 0, plans=plans.with_configuration(own), log=lines.append, epoch_callback=during,
               options=_fast(epochs=1, iterations_per_epoch=2, threads=2, num_workers=1, validate=False,
                             output_dir=tmp_path / "fold"))
    # --threads 2 with own_core: one training thread on the first core, the worker on the second
    assert any(line.startswith("thread placement own_core: 1 training thread(s)") for line in lines)
    (affinity, threads, workers), = seen
    assert affinity == {cpus[0]} and threads == 1 and {cpus[1]} in workers
    assert set(os.sched_getaffinity(0)) == set(cpus) and torch.get_num_threads() == threads_before
    assert all(allowed_cpus(int(t.name)) == set(cpus) for t in Path("/proc/self/task").iterdir())
    assert Plans.load(tmp_path / "fold" / "plans.json").configuration("3d_fullres").training.worker_placement \
        == "own_core"


def test_shared_placement_restores_the_threads(planned: tuple[Path, Workspace], tmp_path: Path) -> None:
    _, ws = planned
    threads_before = torch.get_num_threads()
    lines: list[str] = []
    train_fold(ws, "3d_fullres", 0, log=lines.append, options=_fast(
        epochs=1, iterations_per_epoch=1, threads=threads_before + 1, validate=False, output_dir=tmp_path / "f"))
    assert torch.get_num_threads() == threads_before
    assert not any(line.startswith("thread placement") for line in lines)  # the default is not logged


def test_the_final_validation_estimate_counts_what_a_case_costs_besides_the_network(
        planned: tuple[Path, Workspace]) -> None:
    from automedseg.validation import ValidationEstimate, time_case_finish, validation_tiles

    _, ws = planned
    plans = Plans.load(ws.plans_path)
    config = plans.configuration("3d_fullres")
    cache = ws.preprocessed_dir(config.data_identifier)
    case = sorted(p.name.removesuffix("_seg.npy") for p in cache.glob("*_seg.npy"))[0]
    finish_s = time_case_finish(cache, plans, config, case)
    assert 0 < finish_s < 30 and not list(Path(tempfile.gettempdir()).glob(".automedseg-val-probe-*"))
    tiles = validation_tiles(cache, [case], config.patch_size)
    est = ValidationEstimate(tiles=tiles, cases=1, finish_s_per_case=finish_s)
    assert est.seconds() is None  # nothing measured yet
    est.observe_patches(0.1)
    est.observe_whole_images(0.0, 0)  # an epoch that scored no whole image changes nothing
    assert est.seconds() == pytest.approx(tiles * 0.1 + finish_s)
    est.observe_whole_images(0.02 * tiles, tiles)
    est.observe_patches(0.5)  # once whole images are timed, the patches no longer count
    assert est.seconds(mirrors=2) == pytest.approx(tiles * 0.04 + finish_s)
