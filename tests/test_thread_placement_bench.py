"""benchmarks/thread_placement.py: the alternating order, the rule's choice per row, the summary, the child's
measurement (the step timing faked) and the dry run (nothing is timed)."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from automedseg.calibration_step import StepTiming


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("thread_placement")


def test_doctests(bench) -> None:
    assert doctest.testmod(bench).failed == 0


def test_measure_alternates_the_placements_and_takes_medians(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    import automedseg.calibration_step as S

    calls = []
    seconds = {"shared": [0.30, 0.32, 0.31], "own_core": [0.27, 0.28, 0.26]}

    def fake(**kw: object) -> tuple[StepTiming, ...]:
        calls.append(kw)
        placement = str(kw["placement"])
        s = seconds[placement][sum(c["placement"] == placement for c in calls) - 1]
        return tuple(StepTiming(w, 1e9, s * w / 8, 5, placement) for w in kw["widths"])  # type: ignore[attr-defined]

    monkeypatch.setattr(S, "time_training_steps", fake)
    rows = bench.measure(dims=[3], widths=[8, 16], window_s=0.5, repeats=3, log=lambda s: None)
    assert [c["placement"] for c in calls] == ["shared", "own_core", "own_core", "shared", "shared", "own_core"]
    assert all(c["threads"] == len(bench.usable_cpus()) and c["max_steps"] == bench.MAX_STEPS for c in calls)
    by = {(r["width"], r["placement"]): r for r in rows}
    assert by[(8, "shared")]["seconds"] == [0.30, 0.32, 0.31] and by[(8, "shared")]["median_s"] == 0.31
    assert by[(16, "own_core")]["median_s"] == 0.54 and len(by[(16, "own_core")]["foreign_cores"]) == 3
    (c8, c16) = bench.choices(rows)
    assert (c8["width"], c8["shared_s"], c8["own_core_s"], c8["choice"]) == (8, 0.31, 0.27, "own_core")
    assert c16["saving"] == pytest.approx(1 - 0.54 / 0.62, abs=1e-4)


def test_an_own_core_that_ran_shared_is_not_compared(bench) -> None:
    rows = [{"dims": 3, "width": 16, "placement": "shared", "applied": "shared", "median_s": 0.3},
            {"dims": 3, "width": 16, "placement": "own_core", "applied": "shared", "median_s": 0.2}]
    (choice,) = bench.choices(rows)
    assert choice["own_core_s"] is None and choice["saving"] is None and choice["choice"] == "shared"


def test_summary(bench) -> None:
    rows = [{"dims": 3, "width": 16, "placement": p, "applied": p, "median_s": s, "foreign_cores": [0.01, f]}
            for p, s, f in (("shared", 0.3, 0.02), ("own_core", 0.29, 0.05))]
    figures = {"command": "python benchmarks/thread_placement.py", "settings": {"repeats": 2, "window_s": 3.0},
               "machine": {"cpu_model": "AMD EPYC", "cpu_count_usable": 2, "torch": "2.13.0"},
               "runs": [{"cores": 2, "cpus": [0, 1], "rows": rows, "choices": bench.choices(rows), "note": ""}]}
    text = bench.build_summary(figures)
    assert "## 2 cores (0,1)" in text and "AMD EPYC, 2 usable cores" in text
    assert "| 3D | 16 | 0.300 | 0.290 | +3.3 % | shared | 0.05 |" in text


def test_dry_run_times_nothing(bench, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "run_cores", lambda *a, **k: pytest.fail("a measurement was run"))
    assert bench.main(["--dry-run", "--cores", "1,4096", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4096 cores (skipped: only" in out and "estimated time: ~" in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--dims", "4"], ["--widths", "0"], ["--repeats", "0"], ["--cores", "0"],
                                  ["--window-s", "-1"]])
def test_options_are_checked(bench, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", *argv])


def test_the_child_environment(bench) -> None:
    env = bench.child_env(4)
    assert env["OMP_NUM_THREADS"] == "4" and env["OPENBLAS_NUM_THREADS"] == "4"
    assert "OMP_WAIT_POLICY" in env and str(bench.REPO_ROOT) in env["PYTHONPATH"]
