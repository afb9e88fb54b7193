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


def test_the_variants(bench) -> None:
    off = {"AUTOMEDSEG_FUSED_NORM": "0", "AUTOMEDSEG_RETAIN_MEMORY": "0"}
    assert bench.VARIANTS == (("pytorch", off, 0), ("fused", {}, 0), ("pytorch, seed + 1", off, 1))


def _run(variant: str, step: float, losses: list[float]) -> dict:
    return {"variant": variant, "environment": {}, "measured_s": step, "seconds_per_iteration_per_epoch": [step] * 3,
            "train_loss_per_epoch": losses, "train_wall_s": 90.0, "foreign_cores": 0.01, "log": "x.log"}


@pytest.mark.parametrize(("after_losses", "gap", "within"),
                         [([1.0, 0.8], 0.0, True), ([1.01, 0.8], 0.01, True), ([1.0, 0.72], 0.1, False)])
def test_compare(bench, after_losses: list[float], gap: float, within: bool) -> None:
    runs = [_run("pytorch", 0.3, [1.0, 0.8]), _run("fused", 0.2, after_losses),
            _run("pytorch, seed + 1", 0.3, [1.02, 0.84])]
    cmp_ = bench.compare(runs)
    assert cmp_["speedup"] == 1.5 and cmp_["loss_gap"] == pytest.approx(gap)
    assert cmp_["loss_gap_other_seed"] == pytest.approx(0.05) and cmp_["within_noise"] is within


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
    runs = [_run("pytorch", 0.3, [1.0, 0.8]), _run("fused", 0.2, [1.0, 0.81]),
            _run("pytorch, seed + 1", 0.3, [1.1, 0.8])]
    figures = {"machine": {"cpu_model": "Xeon", "cpu_count_logical": 2, "memory_total_gib": 23.5, "python": "3.11",
                           "torch": "2.13.0"}, "threads": 2, "epochs": 3,
               "cases": [{"dataset": "msd_hippocampus", "configuration": "3d_fullres", "batch_size": 2,
                          "patch_size": [40, 56, 40], "features_per_stage": [12, 24], "runs": runs,
                          "comparison": bench.compare(runs)}]}
    text = bench.build_summary(figures)
    row = "| msd_hippocampus | 3d_fullres | 2 x [40, 56, 40] | 12 | 0.300 | 0.200 | 1.50x | 0.0125 | 0.1000 | yes |"
    assert row in text


def test_dry_run_runs_nothing(bench, capsys) -> None:
    assert bench.main(["--dry-run"]) == 0
    assert "2 configurations x 3 variants" in capsys.readouterr().out


def test_the_seed_yardstick_is_planned_in_its_own_folder(bench, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_cli(args: list, *, logs: Path, label: str, env: dict[str, str]) -> dict:
        args = [str(a) for a in args]
        calls.append(args)
        work = Path(args[args.index("--work-dir") + 1])
        if args[0] == "train":
            fold = work / "3d_fullres" / "fold_0"
            fold.mkdir(parents=True, exist_ok=True)
            rows = [{"epoch": i, "train_loss": 1.0 - 0.1 * i, "epoch_seconds": 5.0, "seconds_per_iteration": 0.2}
                    for i in range(3)]
            (fold / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"wall_s": 9.0, "foreign_cores": 0.0, "foreign_cpu_s": 0.0, "log": "l", "calibration_lines": []}

    plans = {"predicted_s": 0.2, "features_per_stage": [8], "patch_size": [8, 8, 8], "batch_size": 2}
    monkeypatch.setattr(bench, "_run_cli", fake_cli)
    monkeypatch.setattr(bench, "read_plan", lambda work, configuration: plans if (work / "planned").exists()
                        or calls and calls[-1][0] == "plan" else (_ for _ in ()).throw(OSError("no plan")))
    (tmp_path / "data" / "ds").mkdir(parents=True)
    (tmp_path / "work" / "ds").mkdir(parents=True)
    (tmp_path / "work" / "ds" / "planned").touch()  # the main folder is planned already
    assert bench.main(["--cases", "ds:3d_fullres", "--data-root", str(tmp_path / "data"), "--work-root",
                       str(tmp_path / "work"), "--results-dir", str(tmp_path / "res")]) == 0
    plan_calls = [c for c in calls if c[0] == "plan"]
    assert len(plan_calls) == 1 and plan_calls[0][plan_calls[0].index("--seed") + 1] == "12346"
    assert plan_calls[0][plan_calls[0].index("--work-dir") + 1].endswith("ds-seed12346")
    trained = [c[c.index("--work-dir") + 1] for c in calls if c[0] == "train"]
    assert [Path(w).name for w in trained] == ["ds", "ds", "ds-seed12346"]
