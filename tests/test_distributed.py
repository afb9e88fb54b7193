"""DistributedDataParallel training launched by torchrun: 2 CPU ranks with gloo on a tiny dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from automedseg.demo import make_demo_dataset
from automedseg.pipeline import run_plan
from automedseg.workspace import Workspace


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Workspace]:
    root = tmp_path_factory.mktemp("ddp")
    dataset = make_demo_dataset(root / "Dataset_Demo", n_cases=6, n_test=0, seed=5)
    ws = Workspace.for_dataset(dataset)
    run_plan(dataset, ws, configurations=["3d_fullres"], jobs=1, device="reference-cpu-2core", time_budget_s=60.0)
    return dataset, ws


def _train_args(dataset: Path, ws: Workspace, epochs: int) -> list[str]:
    return ["train", str(dataset), "--work-dir", str(ws.root), "-c", "3d_fullres", "-f", "0",
            "--epochs", str(epochs), "--iterations-per-epoch", "3", "--workers", "0", "--threads", "1",
            "--device", "cpu", "--no-validate"]


def test_two_rank_gloo_training_keeps_weights_identical_and_resumes_single_process(
        planned: tuple[Path, Workspace]) -> None:
    dataset, ws = planned
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "automedseg", *_train_args(dataset, ws, 2)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert out.count("DistributedDataParallel on cpu") == 2, out
    assert out.count("weights identical across 2 ranks") == 2, out
    fold_dir = ws.fold_dir("3d_fullres", 0)
    assert (fold_dir / "checkpoint_final.pt").is_file()
    assert len((fold_dir / "log.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote the log
    # The DDP checkpoint resumes in an ordinary single-process run.
    single = subprocess.run([sys.executable, "-m", "automedseg", *_train_args(dataset, ws, 3)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    assert f"resuming {fold_dir} at epoch 2" in single.stdout
    assert len((fold_dir / "log.jsonl").read_text().splitlines()) == 3
