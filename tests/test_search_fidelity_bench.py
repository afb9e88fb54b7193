"""benchmarks/search_fidelity.py: seeded configurations, rank correlations, scores, dry run, the Markdown summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("search_fidelity")


def _base(ws: Any) -> tuple[Any, Any]:
    from automedseg.plans import Plans

    plans = Plans.load(ws.plans_path)
    return plans, plans.configuration("3d_fullres")


# --- configurations --------------------------------------------------------------------------------------


def test_configurations_are_seeded_distinct_feasible_and_start_with_the_rule_plan(bench, search_planned) -> None:
    from automedseg.search import apply_params, default_params

    plans, base = _base(search_planned[1])
    configs = bench.sample_configs(plans, base, 6, seed=7)
    assert len(configs) == 6 and configs[0] == default_params(base)
    assert configs == bench.sample_configs(plans, base, 6, seed=7)
    assert bench.sample_configs(plans, base, 6, seed=8)[1:] != configs[1:]
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 6
    for c in configs:
        apply_params(plans, base, c)  # feasible: does not raise
    assert bench.describe(configs[0], default_params(base)) == "rule plan"
    assert "=" in bench.describe(configs[1], default_params(base))


def test_runs_use_the_search_trial_schedules(bench, search_planned, tmp_path: Path) -> None:
    from automedseg.search import TRAIN_SHARE, TRIAL_EPOCHS

    plans, base = _base(search_planned[1])
    configs = bench.sample_configs(plans, base, 2)
    runs = bench.make_runs(plans, base, configs, full="30s", rungs=["10s"], root=tmp_path)
    assert [(r["config"], bench.run_key(r["kind"], r["budget"])) for r in runs] == [
        (0, "short_10s"), (0, "continuation_10s"), (0, "full"), (1, "short_10s"), (1, "continuation_10s"),
        (1, "full")]
    short, cont, full = (r["variant"].training for r in runs[:3])
    assert short.fixed_epochs and short.epochs == TRIAL_EPOCHS and short.time_budget_s == pytest.approx(
        TRAIN_SHARE * 10)
    assert cont.fixed_epochs and cont.time_budget_s < short.time_budget_s  # the discarded cool-downs
    assert not full.fixed_epochs and full.time_budget_s == pytest.approx(30.0)
    assert runs[0]["dir"] == tmp_path / "c0" / "short_10s"
    (runs[0]["dir"]).mkdir(parents=True)
    assert bench._reusable(runs[0]) is None
    (runs[0]["dir"] / bench.RESULT_FILE).write_text(json.dumps({"plan_sha1": runs[0]["plan_sha1"]}))
    assert bench._reusable(runs[0]) == {"plan_sha1": runs[0]["plan_sha1"]}
    (runs[0]["dir"] / bench.RESULT_FILE).write_text(json.dumps({"plan_sha1": "another plan"}))
    assert bench._reusable(runs[0]) is None


# --- rank correlation ------------------------------------------------------------------------------------


def test_rank_correlations_against_known_answers(bench) -> None:
    r = bench.rank_correlations([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert r["n"] == 5 and r["spearman"] == pytest.approx(0.8207826816681233)
    assert r["kendall"] == pytest.approx(0.7378647873726218) and 0 < r["spearman_p"] < 1
    assert bench.rank_correlations([1, 2, 3, 4], [10, 20, 30, 40])["spearman"] == pytest.approx(1.0)
    assert bench.rank_correlations([1, 2, 3, 4], [4, 3, 2, 1])["kendall"] == pytest.approx(-1.0)
    skipped = bench.rank_correlations([0.8, None, 0.7, 0.6, 0.5], [0.4, 0.9, None, 0.2, 0.1])
    assert skipped["n"] == 3 and skipped["spearman"] == pytest.approx(1.0)
    for truth, scores in (([1, 2], [1, 2]), ([1, 2, 3], [0.5, 0.5, 0.5]), ([1, 2, 3], [1, math.nan, None])):
        assert bench.rank_correlations(truth, scores)["spearman"] is None


def test_the_rank_fallbacks_match_scipy(bench) -> None:
    from scipy import stats

    assert bench.average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = [float(v) for v in rng.integers(0, 5, 9)]  # with ties
        y = [float(v) for v in rng.integers(0, 5, 9)]
        assert bench.spearman_by_ranks(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
        assert bench.kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y)[0])
    assert bench.spearman_by_ranks([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)


# --- scores and the summary ------------------------------------------------------------------------------


def _curve(n: int, top: float, rate: float) -> list[tuple[int, int, float, float | None]]:
    return [(e, 4 * (e + 1), 10.0 * (e + 1), None if e == 2 else top - 0.6 * math.exp(-(e + 1) / rate))
            for e in range(n)]


def test_short_scores(bench) -> None:
    curve = _curve(20, 0.8, 4.0)
    mini = bench.short_scores("short", curve, {"validation_mean_dice": 0.7, "wall_s": 260.0}, ends=[5, 15, 20],
                              final_iterations=320)
    assert mini["@5"][0] == pytest.approx(np.mean([curve[e][3] for e in (1, 3, 4)]))  # epoch 2 scored nothing
    assert mini["@5"][1] == 50.0 and mini["validation"] == (0.7, 260.0)
    assert mini["@20"][0] == pytest.approx(np.mean([curve[e][3] for e in (17, 18, 19)]))
    assert mini["extrapolated@20"][0] == pytest.approx(0.8, abs=0.01)
    result = {"rungs": [{"epoch": 5, "score": 0.31, "seconds": 70.0}], "validation_mean_dice": None}
    cont = bench.short_scores("continuation", curve, result, ends=[5, 15, 20], final_iterations=320)
    assert cont["@5"] == (0.31, 70.0) and "@15" not in cont and cont["validation"] == (None, None)
    assert 0.0 <= cont["extrapolated@5"][0] <= 1.0  # epochs 0-3: before the cool-down of rung 5


def _canned(bench, n: int = 6) -> dict[str, Any]:
    results, curves = {}, {}
    truth = [0.80, 0.75, 0.85, 0.60, 0.70, 0.78][:n]
    for k in range(n):
        results[k, "full"] = {"validation_mean_dice": truth[k], "wall_s": 1200.0}
        curves[k, "full"] = []
        for kind in ("short", "continuation"):
            results[k, f"{kind}_5m"] = {"validation_mean_dice": truth[k] - 0.1, "wall_s": 300.0, "rungs": [
                {"epoch": e, "score": truth[k] * e / 20, "seconds": 15.0 * e} for e in (5, 15, 20)]}
            curves[k, f"{kind}_5m"] = _curve(20, truth[k] if k != 3 else 0.9, 3.0)
    full, designs = bench.design_table(results, curves, n=n, rungs=["5m"], final_iterations=[320] * n)
    return {"full": full, "designs": designs}


def test_design_table_and_summary(bench) -> None:
    canned = _canned(bench)
    names = [d["design"] for d in canned["designs"]]
    assert names[:4] == ["miniature 5m", "miniature 5m, validation", "short 5m @ epoch 5", "short 5m @ epoch 15"]
    assert "continuation 5m @ epoch 5" in names and "extrapolated continuation 5m @ epoch 20" in names
    by_name = {d["design"]: d for d in canned["designs"]}
    assert by_name["continuation 5m @ epoch 15"]["spearman"] == pytest.approx(1.0)
    assert by_name["continuation 5m @ epoch 15"]["minutes"] == pytest.approx(3.75)
    assert by_name["miniature 5m"]["spearman"] < 1.0  # c3's short curve leads, its full run is last
    best = bench.best_design(canned["designs"])
    assert best["spearman"] == pytest.approx(1.0) and best["family"] in ("a", "b")
    machine = {"cpu_model": "Test CPU", "cpu_count_logical": 2, "memory_total_gib": 8, "python": "3.11",
               "torch": "2", "automedseg": "0.1"}
    figures = {"dataset_name": "Demo", "configuration": "3d_fullres", "seed": 1, "full": "20m", "rungs": ["5m"],
               "trial_epochs": 20, "threads": 2, "partial": True, "wall_s": 7300.0, "runs_wall_s": 7200.0,
               "command": "python x", "runs": {"c5/full": {"failed": "c5 full failed (rc=1)"}},
               "full_dice": canned["full"][:5] + [None], "designs": canned["designs"], "machine": machine,
               "configs": [{"index": k, "describe": "rule plan" if k == 0 else f"lr_factor={k}",
                            "full_plan": "plain_unet"} for k in range(6)]}
    md = bench.build_summary(figures)
    assert "**Partial**: 5 of 6 configurations" in md and f"Best design: **{best['design']}**" in md
    assert "| c0 | rule plan | plain_unet |" in md and "| **full 20m** (validation Dice) | 0.800 |" in md
    assert "Test CPU" in md and "total wall time of the runs 2.00 h" in md and md.count("\n|---") == 3
    assert "Failed runs (their scores are missing): c5/full." in md


# --- dry run ---------------------------------------------------------------------------------------------


def test_dry_run_trains_nothing(bench, search_planned, search_ws, capsys: pytest.CaptureFixture[str]) -> None:
    dataset, root = search_planned[0], search_ws.root.parent  # the benchmark's folder holds the work folder "work"
    results = root / "results"
    rc = bench.main(["--dataset", str(dataset), "--work-dir", str(root), "--results-dir", str(results), "-n", "6",
                     "--full", "30s", "--rung", "10s", "--keep", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "estimate: 6 configurations x (30s full + 2 designs x 10s)" in out and "still to train: 18 runs" in out
    assert "c0: rule plan" in out and "c5: " in out and out.count("train: c") == 18
    assert "--worker" in out and "re-plan" not in out
    assert not results.exists() and not (root / "runs").exists()
