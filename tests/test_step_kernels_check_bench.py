"""benchmarks/step_kernels_check.py: the variants' environments, the comparison of their runs, the summary, and
the run of a configuration with a stand-in for the CLI (no training is run)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("step_kernels_check")


def test_doctests(bench) -> None:
    assert doctest.testmod(bench).failed == 0


@pytest.mark.parametrize("text", ["msd_hippocampus", ":2d", "drive:"])
def test_bad_case_is_refused(bench, text: str) -> None:
    with pytest.raises(Exception, match="DATASET:CONFIGURATION"):
        bench.parse_case(text)


def test_the_first_variant_switches_both_kernels_off(bench) -> None:
    names = [name for name, _ in bench.VARIANTS]
    assert names[0] == "pytorch" and bench.VARIANTS[0][1] == {"AUTOMEDSEG_FUSED_NORM": "0",
                                                              "AUTOMEDSEG_RETAIN_MEMORY": "0"}
    assert all(env == {} for _, env in bench.VARIANTS[1:])


def _run(variant: str, step: float, losses: list[float]) -> dict:
    return {"variant": variant, "environment": {}, "measured_s": step, "seconds_per_iteration_per_epoch": [step] * 3,
            "train_loss_per_epoch": losses, "train_wall_s": 90.0, "foreign_cores": 0.01, "log": "x.log"}


@pytest.mark.parametrize(("after_losses", "gap"), [([1.0, 0.8], 0.0), ([1.01, 0.8], 0.01), ([1.0, 0.72], 0.1)])
def test_compare(bench, after_losses: list[float], gap: float) -> None:
    runs = [_run("pytorch", 0.3, [1.0, 0.8]), _run("fused", 0.2, after_losses), _run("fused again", 0.2, after_losses)]
    cmp_ = bench.compare(runs)
    assert cmp_["speedup"] == 1.5 and cmp_["loss_gap"] == pytest.approx(gap) and cmp_["loss_gap_same_code"] == 0.0


def test_train_variant_reads_the_log_and_passes_the_environment(bench, tmp_path: Path, monkeypatch) -> None:
    seen = []

    def fake_cli(args: list, *, logs: Path, label: str, env: dict[str, str]) -> dict:
        seen.append(env)
        fold = tmp_path / "2d" / "fold_0"
        fold.mkdir(parents=True)
        rows = [{"epoch": i, "train_loss": 1.0 - 0.1 * i, "epoch_seconds": 5.0, "seconds_per_iteration": s}
                for i, s in enumerate([0.5, 0.2, 0.22])]
        (fold / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"wall_s": 9.0, "foreign_cores": 0.0, "foreign_cpu_s": 0.0, "log": "l", "calibration_lines": []}

    monkeypatch.setattr(bench, "_run_cli", fake_cli)
    run = bench.train_variant(tmp_path / "data", tmp_path, "2d", name="pytorch",
                              env_changes={"AUTOMEDSEG_FUSED_NORM": "0"}, epochs=3, iterations=10, logs=tmp_path,
                              env={"A": "1"})
    assert seen == [{"A": "1", "AUTOMEDSEG_FUSED_NORM": "0"}]
    assert run["measured_s"] == pytest.approx(0.21) and run["train_loss_per_epoch"] == pytest.approx([1.0, 0.9, 0.8])


def test_summary(bench) -> None:
    runs = [_run("pytorch", 0.3, [1.0, 0.8]), _run("fused", 0.2, [1.0, 0.81]), _run("fused again", 0.2, [1.0, 0.8])]
    figures = {"machine": {"cpu_model": "Xeon", "cpu_count_logical": 2, "memory_total_gib": 23.5, "python": "3.11",
                           "torch": "2.13.0"}, "threads": 2, "epochs": 3,
               "cases": [{"dataset": "msd_hippocampus", "configuration": "3d_fullres", "batch_size": 2,
                          "patch_size": [40, 56, 40], "features_per_stage": [12, 24], "runs": runs,
                          "comparison": bench.compare(runs)}]}
    text = bench.build_summary(figures)
    assert "| msd_hippocampus | 3d_fullres | 2 x [40, 56, 40] | 12 | 0.300 | 0.200 | 1.50x | 0.0125 | 0.0123 |" in text


def test_dry_run_runs_nothing(bench, capsys) -> None:
    assert bench.main(["--dry-run"]) == 0
    assert "2 configurations x 3 variants" in capsys.readouterr().out
