"""Bad input through the CLI: one line naming the file or option, exit 2, no traceback, nothing changed.

One small trained work folder is made per module; each case copies it, plants one fault, runs one command
through ``CliRunner`` and checks the status, the message and that no file anywhere in the copy changed
(hashes before and after; lock files excepted). Slower end-to-end guarantees (kill -9 during ``plan``,
two trainers on one fold) run real processes at the end.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from automedseg.cli import main
from automedseg.demo import make_demo_dataset
from automedseg.locks import folder_lock
from automedseg.splits import read_splits

torch.set_num_threads(1)
GARBAGE = b"\x00\x13\x37 this is not an image \xff\xfe" * 20


@dataclass
class Env:
    """Paths of one copy of the trained work folder."""

    root: Path
    dataset: Path
    work: Path
    images_ts: Path
    labels_ts: Path
    out: Path

    @property
    def fold(self) -> Path:
        return self.work / "3d_fullres" / "fold_0"

    def image(self, i: int = 0) -> Path:
        return sorted((self.dataset / "imagesTr").glob("*_0000.nii.gz"))[i]

    def label(self, i: int = 0) -> Path:
        return sorted((self.dataset / "labelsTr").glob("*.nii.gz"))[i]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, trained_demo) -> Path:
    """Demo dataset (6 cases), planned for 3d_fullres and fold 0 trained for 1 epoch of 2 iterations."""
    root = tmp_path_factory.mktemp("robust")
    trained_demo(root, validate=False)
    return root


@pytest.fixture
def env(trained: Path, tmp_path: Path) -> Env:
    shutil.copytree(trained, tmp_path / "c", symlinks=True)
    root = tmp_path / "c"
    ds = root / "Dataset_Demo"
    return Env(root, ds, root / "work", ds / "imagesTs", ds / "labelsTs", root / "out")


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (lock files excepted: they record who holds them)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


# --- fault planters -------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _set_voxels(path: Path, fn: Callable[[np.ndarray], np.ndarray], dtype: type = np.float32) -> None:
    img = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img).astype(dtype)))
    new.CopyInformation(img)
    sitk.WriteImage(new, str(path))


def _inflate_header(path: Path) -> None:
    """Claim 1000 x 1000 x 500 voxels in the NIfTI header of a small file."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    dims = np.frombuffer(bytes(raw[40:56]), dtype="<i2").copy()
    dims[1:4] = (1000, 1000, 500)
    raw[40:56] = dims.astype("<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def _edit_json(path: Path, fn: Callable[[object], object]) -> None:
    data = json.loads(path.read_text())
    out = fn(data)
    path.write_text(json.dumps(data if out is None else out))


def _edit_plan(path: Path, fn: Callable[[dict], None]) -> None:
    def edit(plans: object) -> None:
        assert isinstance(plans, dict)
        fn(plans["configurations"]["3d_fullres"])

    _edit_json(path, edit)


def _hold_lock(folder: Path, name: str = ".automedseg.lock") -> Callable[[], object]:
    """A planter that returns a context manager: the lock held by this process while the command runs."""
    return lambda: folder_lock(folder, purpose="a test holding the lock", name=name)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 24), dtype=np.uint8)), str(path))


def _only_one_case(e: Env) -> None:
    for p in sorted((e.dataset / "imagesTr").glob("*"))[1:]:
        p.unlink()
    for p in sorted((e.dataset / "labelsTr").glob("*"))[1:]:
        p.unlink()
    _edit_json(e.dataset / "dataset.json", lambda d: d.update(numTraining=1))


def _no_foreground(e: Env) -> None:
    for p in (e.dataset / "labelsTr").glob("*.nii.gz"):
        _set_voxels(p, np.zeros_like, np.uint8)


# --- the table ------------------------------------------------------------------------------------------

TRAIN = ["train", "{dataset}", "--work-dir", "{work}", "-f", "0", "--workers", "0", "--threads", "1", "--device",
         "cpu", "--no-validate", "--epochs", "2", "--iterations-per-epoch", "1"]
PREDICT = ["predict", "-i", "{images_ts}", "-o", "{out}", "-d", "{work}", "-c", "3d_fullres", "--no-mirror",
           "--threads", "1", "--device", "cpu"]
PLAN = ["plan", "{dataset}", "--work-dir", "{work}", "-c", "3d_fullres", "-j", "1", "--device",
        "reference-cpu-2core", "--no-preprocess"]
CHECK = ["check", "{dataset}", "-j", "1"]
EVALUATE = ["evaluate", "{labels_ts}", "{out}"]


def _with(base: list[str], *extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    args = list(base)
    for opt in drop:
        i = args.index(opt)
        del args[i: i + 2]
    return args + list(extra)


def _predicted(e: Env) -> None:
    r = CliRunner().invoke(main, [a.format(**vars(e)) for a in PREDICT])
    assert r.exit_code == 0, r.output


# id, arguments, planter (may return a context manager to hold while the command runs), needle, exit code
CASES: list[tuple[str, list[str], Callable[[Env], object] | None, str, int]] = [
    # check
    ("check-missing-folder", ["check", "{root}/nope"], None, "nope", 2),
    ("check-dataset-json-not-json", CHECK, lambda e: _write(e.dataset / "dataset.json", b"{oops"), "dataset.json", 2),
    ("check-numtraining-not-int", CHECK, lambda e: _edit_json(e.dataset / "dataset.json",
                                                              lambda d: d.update(numTraining="six")),
     "numTraining", 2),
    ("check-truncated-image", CHECK, lambda e: _truncate(e.image(1)), "demo_001_0000.nii.gz", 2),
    ("check-header-inflated", CHECK, lambda e: _inflate_header(e.image(2)), "demo_002_0000.nii.gz", 2),
    ("check-nan-image", CHECK, lambda e: _set_voxels(e.image(1), lambda a: np.where(a > 0, np.nan, a)),
     "demo_001_0000.nii.gz", 2),
    ("check-inf-image", CHECK, lambda e: _set_voxels(e.image(1), lambda a: np.where(a > 0, np.inf, a)),
     "demo_001_0000.nii.gz", 2),
    ("check-zero-byte-image", CHECK, lambda e: _write(e.image(3), b""), "demo_003_0000.nii.gz", 2),
    ("check-garbage-label", CHECK, lambda e: _write(e.label(0), GARBAGE), "demo_000.nii.gz", 2),
    ("check-undeclared-label", CHECK, lambda e: _set_voxels(e.label(1), lambda a: np.where(a > 0, 7, a), np.uint8),
     "demo_001.nii.gz", 2),
    ("check-missing-label", CHECK, lambda e: e.label(2).unlink(), "demo_002", 2),
    ("check-too-few-cases", CHECK, _only_one_case, "5-fold", 2),
    ("check-no-foreground", CHECK, _no_foreground, "foreground", 2),
    # plan
    ("plan-missing-folder", ["plan", "{root}/nope"], None, "nope", 2),
    ("plan-truncated-image", PLAN, lambda e: _truncate(e.image(1), 0.3), "demo_001_0000.nii.gz", 2),
    ("plan-too-few-cases", PLAN, _only_one_case, "5-fold", 2),
    ("plan-budget-zero", _with(PLAN, "--time-budget", "0"), None, "--time-budget", 2),
    ("plan-budget-text", _with(PLAN, "--time-budget", "soon"), None, "--time-budget", 2),
    ("plan-bad-device", _with(PLAN, drop=("--device",)) + ["--device", "abacus"], None, "abacus", 2),
    ("plan-jobs-zero", _with(PLAN, drop=("-j",)) + ["-j", "0"], None, "--jobs", 2),
    ("plan-locked", PLAN, lambda e: _hold_lock(e.work, ".automedseg-plan.lock")(), "in use by process", 2),
    # train
    ("train-no-plan", TRAIN, lambda e: (e.work / "plans.json").unlink(), "plans.json", 2),
    ("train-fold-7", _with(TRAIN, drop=("-f",)) + ["-f", "7"], None, "'7'", 2),
    ("train-fold-text", _with(TRAIN, drop=("-f",)) + ["-f", "x"], None, "'x'", 2),
    ("train-unknown-configuration", _with(TRAIN, "-c", "4d"), None, "'4d'", 2),
    ("train-plans-not-json", TRAIN, lambda e: _write(e.work / "plans.json", b"{not json"), "plans.json", 2),
    ("train-plans-spacing-zero", TRAIN, lambda e: _edit_plan(e.work / "plans.json",
                                                             lambda c: c.update(spacing_mm=[0, 1, 1])),
     "spacing_mm", 2),
    ("train-plans-image-order-99", TRAIN, lambda e: _edit_plan(e.work / "plans.json",
                                                               lambda c: c.update(image_order=99)),
     "image_order", 2),
    ("train-fold-plan-hand-edited", TRAIN, lambda e: _edit_plan(e.fold / "plans.json",
                                                                lambda c: c.update(batch_size="two")),
     "batch_size", 2),
    ("train-splits-not-json", TRAIN, lambda e: _write(e.work / "splits.json", b"[{"), "splits.json", 2),
    ("train-splits-wrong-shape", TRAIN, lambda e: _write(e.work / "splits.json", b'{"train": []}'),
     "splits.json", 2),
    ("train-splits-unknown-case", TRAIN, lambda e: _edit_json(
        e.work / "splits.json", lambda s: s[0]["val"].append("ghost")), "splits.json", 2),
    ("train-splits-stale", TRAIN, lambda e: _edit_json(
        e.work / "splits.json", lambda s: [{"train": f["train"][:1], "val": f["val"][:1]} for f in s]),
     "splits.json", 2),
    ("train-cache-incomplete", TRAIN, lambda e: (e.work / "preprocessed" / "fullres" / "cache_complete.json").unlink(),
     "incomplete", 2),
    ("train-cache-case-missing", TRAIN, lambda e: (e.work / "preprocessed" / "fullres" / "demo_001_seg.npy").unlink(),
     "demo_001", 2),
    ("train-checkpoint-truncated", TRAIN, lambda e: _truncate(e.fold / "checkpoint_latest.pt"),
     "checkpoint_latest.pt", 2),
    ("train-checkpoint-zero-bytes", TRAIN, lambda e: _write(e.fold / "checkpoint_latest.pt", b""),
     "checkpoint_latest.pt", 2),
    ("train-epochs-zero", _with(TRAIN, drop=("--epochs",)) + ["--epochs", "0"], None, "--epochs", 2),
    ("train-threads-zero", _with(TRAIN, drop=("--threads",)) + ["--threads", "0"], None, "--threads", 2),
    ("train-fold-locked", TRAIN, lambda e: _hold_lock(e.fold)(), "in use by process", 2),
    ("train-missing-dataset", ["train", "{root}/nope"], None, "nope", 2),
    # predict
    ("predict-into-input", _with(PREDICT, drop=("-o",)) + ["-o", "{images_ts}", "--overwrite"], None,
     "input folder", 2),
    ("predict-inside-input", _with(PREDICT, drop=("-o",)) + ["-o", "{images_ts}/masks"], None, "input folder", 2),
    ("predict-contains-input", _with(PREDICT, drop=("-o",)) + ["-o", "{dataset}"], None, "input folder", 2),
    ("predict-empty-input", _with(PREDICT, drop=("-i",)) + ["-i", "{root}/empty"],
     lambda e: (e.root / "empty").mkdir(), "empty", 2),
    ("predict-missing-input", _with(PREDICT, drop=("-i",)) + ["-i", "{root}/nope"], None, "nope", 2),
    ("predict-step-zero", _with(PREDICT, "--step", "0"), None, "--step", 2),
    ("predict-step-negative", _with(PREDICT, "--step", "-1"), None, "--step", 2),
    ("predict-step-five", _with(PREDICT, "--step", "5"), None, "--step", 2),
    ("predict-num-parts-zero", _with(PREDICT, "--num-parts", "0"), None, "--num-parts", 2),
    ("predict-part-id-out-of-range", _with(PREDICT, "--num-parts", "2", "--part-id", "3"), None, "--part-id", 2),
    ("predict-extra-channel", PREDICT, lambda e: [shutil.copy(sorted(e.images_ts.iterdir())[0],
                                                              e.images_ts / "demo_006_0001.nii.gz")],
     "demo_006_0001.nii.gz", 2),
    ("predict-2d-into-3d-model", PREDICT, lambda e: [p.unlink() for p in e.images_ts.iterdir()]
     and _png(e.images_ts / "flat_0000.png"), "flat_0000.png", 2),
    ("predict-truncated-image", PREDICT, lambda e: [_truncate(p) for p in e.images_ts.iterdir()],
     "demo_006_0000.nii.gz", 2),
    ("predict-all-checkpoints-damaged", PREDICT, lambda e: [_write(p, GARBAGE) for p in e.fold.glob("*.pt")],
     "checkpoint_final.pt", 2),
    ("predict-no-such-configuration", _with(PREDICT, drop=("-c",)) + ["-c", "2d"], None, "2d", 2),
    ("predict-find-best-damaged", _with(PREDICT, drop=("-c",)), lambda e: _write(e.work / "find_best.json", b"[]"),
     "find_best.json", 2),
    ("predict-no-work-folder", _with(PREDICT, drop=("-d",)) + ["-d", "{root}/nope"], None, "nope", 2),
    ("predict-output-locked", PREDICT, lambda e: _hold_lock(e.out)(), "in use by process", 2),
    # evaluate
    ("evaluate-empty-predictions", EVALUATE, lambda e: e.out.mkdir(), "no prediction", 2),
    ("evaluate-garbage-prediction", EVALUATE, lambda e: [_predicted(e), _write(e.out / "demo_006.nii.gz", GARBAGE)],
     "demo_006.nii.gz", 2),
    ("evaluate-truncated-prediction", EVALUATE, lambda e: [_predicted(e), _truncate(e.out / "demo_007.nii.gz")],
     "demo_007.nii.gz", 2),
    ("evaluate-shape-mismatch", EVALUATE, lambda e: [_predicted(e), _png(e.out / "demo_006.nii.gz")],
     "demo_006.nii.gz", 2),
    ("evaluate-missing-reference-folder", ["evaluate", "{root}/nope", "{images_ts}"], None, "nope", 2),
]


@pytest.mark.parametrize(("args", "plant", "needle", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(env: Env, args: list[str],
                                                      plant: Callable[[Env], object] | None, needle: str,
                                                      code: int) -> None:
    held = plant(env) if plant is not None else None
    before = tree_hashes(env.root)
    argv = [a.format(**vars(env)) for a in args]
    if isinstance(held, contextlib.AbstractContextManager):
        with held:  # type: ignore[union-attr]
            result = CliRunner().invoke(main, argv)
    else:
        result = CliRunner().invoke(main, argv)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    hits = [line for line in errors if needle in line]
    assert hits, f"{needle!r} not named in: {result.output}"
    usage = errors[0].startswith("Usage:")
    if not usage:  # a problem list ends with its count; anything else is exactly one line
        problems = [line for line in errors if not line.endswith("problem(s) found.")]
        assert len(problems) == 1 or all(("/" in p or ":" in p) for p in problems), result.output
    assert tree_hashes(env.root) == before


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1][0] for c in CASES}
    assert commands == {"check", "plan", "train", "predict", "evaluate"}


# --- degraded but working --------------------------------------------------------------------------------


def test_damaged_final_checkpoint_falls_back_with_a_warning(env: Env) -> None:
    shutil.copy(env.fold / "checkpoint_latest.pt", env.fold / "checkpoint_best.pt")
    _truncate(env.fold / "checkpoint_final.pt")
    result = CliRunner().invoke(main, [a.format(**vars(env)) for a in PREDICT])
    assert result.exit_code == 0, result.output
    assert "checkpoint_final.pt: damaged" in result.stderr and "using checkpoint_best.pt" in result.stderr
    assert len(list(env.out.glob("*.nii.gz"))) == 2


def test_evaluate_warns_about_origin_mismatch(env: Env) -> None:
    _predicted(env)
    pred = env.out / "demo_006.nii.gz"
    img = sitk.ReadImage(str(pred))
    img.SetOrigin(tuple(v + 5.0 for v in img.GetOrigin()))
    sitk.WriteImage(img, str(pred))
    result = CliRunner().invoke(main, [a.format(**vars(env)) for a in EVALUATE])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "demo_006.nii.gz" in result.stderr and "origin" in result.stderr


def test_stale_temp_files_are_removed_and_live_ones_kept(env: Env) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = env.fold / f".tmp-{int(dead.stdout)}-abc-checkpoint_latest.pt"
    live = env.fold / f".tmp-{os.getppid()}-abc-checkpoint_latest.pt"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    result = CliRunner().invoke(main, [a.format(**vars(env)) for a in TRAIN])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()


def test_interrupted_overlay_is_redone(env: Env) -> None:
    """The mask is written last, so a kill after the overlay but before the mask redoes the case."""
    args = [a.format(**vars(env)) for a in PREDICT] + ["--overlays"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (env.out / "demo_006.nii.gz").unlink()
    (env.out / "overlays" / "demo_006.png").unlink()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "1 written, 1 kept" in result.output
    assert (env.out / "overlays" / "demo_006.png").is_file()


# --- real processes ---------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "automedseg.cli", *args]


def test_train_refuses_the_cache_of_a_killed_plan(tmp_path: Path) -> None:
    """SIGKILL ``plan`` while it preprocesses: ``train`` refuses the partial cache; a re-run of plan completes it.

    15 cases: the kill comes within a poll (20 ms) of the third cached case, long before the last. The 1 min
    budget makes the plan's epochs small (5 validation batches, not the 50 of an unbudgeted plan), which the
    one-iteration epoch of ``train`` keeps.
    """
    n = 15
    dataset = make_demo_dataset(tmp_path / "Dataset_Demo", n_cases=n, n_test=0, seed=1)
    work = tmp_path / "work"
    plan = _cli("plan", str(dataset), "--work-dir", str(work), "-c", "3d_fullres", "-j", "1", "--device",
                "reference-cpu-2core", "--time-budget", "1m")
    proc = subprocess.Popen(plan, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = work / "preprocessed" / "fullres"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("demo_*.json"))) < 3:
        assert proc.poll() is None, "plan finished before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached = len(list(cache.glob("demo_*.json")))
    assert 3 <= cached < n and not (cache / "cache_complete.json").exists()
    train = _cli("train", str(dataset), "--work-dir", str(work), "-f", "0", "--epochs", "1",
                 "--iterations-per-epoch", "1", "--workers", "0", "--threads", "1", "--device", "cpu", "--no-validate")
    refused = subprocess.run(train, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "incomplete" in refused.stderr and "Traceback" not in refused.stderr
    assert not (work / "splits.json").exists() and not (work / "3d_fullres").exists()
    again = subprocess.run(plan, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((cache / "cache_complete.json").read_text())["cases"] == [f"demo_{i:03d}" for i in range(n)]
    done = subprocess.run(train, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    splits = read_splits(work / "splits.json")
    assert sorted(c for s in splits for c in s.val) == [f"demo_{i:03d}" for i in range(n)]


def test_second_trainer_on_a_fold_is_refused(env: Env) -> None:
    """Two trainers on one fold: the second exits 2 naming the first; the first finishes unharmed.

    The first is stopped (SIGSTOP) while it holds the lock and continued once the second has given up, so it
    need not train long enough to outlive the second's start-up.
    """
    args = [a.format(**vars(env)) for a in TRAIN]
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--iterations-per-epoch") + 1] = "4"
    first = subprocess.Popen(_cli(*args, "--restart"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = env.fold / ".automedseg.lock"
    deadline = time.time() + 120
    while time.time() < deadline and str(first.pid) not in (lock.read_text() if lock.is_file() else ""):
        assert first.poll() is None, first.communicate()
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert str(first.pid) in lock.read_text(), "the first trainer released the lock before it was stopped"
        second = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, out + err
    log = [json.loads(line) for line in (env.fold / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [0, 1, 2]
