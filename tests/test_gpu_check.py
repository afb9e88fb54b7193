"""benchmarks/gpu_check.py without a GPU: a clear message and exit code 2; its report renders partial figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_says_so_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device is available here" in proc.stderr


def test_the_report_renders_what_a_failed_run_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    md = gpu_check.render({"data": "/d/msd_hippocampus", "status": "FAIL", "error": "plan failed (exit 1)",
                           "steps": {"plan": {"seconds": 3.0, "returncode": 1}}, "folds": {}, "gpu": {},
                           "machine": {}})
    assert "# GPU check (msd_hippocampus, 3d_fullres)" in md and "**FAIL**" in md and "plan failed" in md
