"""benchmarks/search_quality.py: the confirmation's verdict read back and the Markdown summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def bench(benchmark_module):
    return benchmark_module("search_quality")


def _write_confirmation(work: Path, *, rule: float, candidate: float) -> None:
    from automedseg.artifacts import write_artifact
    from automedseg.search_confirm import Confirmation, ConfirmRun, confirmation_path, verdict
    from automedseg.workspace import Workspace

    runs = (ConfirmRun("rule", None, {}, "a", str(work / "r"), "done", rule, "trial"),
            ConfirmRun("trial_3", 3, {"lr_factor": 2.0}, "b", str(work / "t"), "done", candidate, "trial"))
    path = confirmation_path(Workspace(work), "S")
    path.parent.mkdir(parents=True)
    write_artifact(path, verdict(Confirmation("S", "2d", runs)))


def _figures(conf: dict[str, Any]) -> dict[str, Any]:
    machine = {"cpu_model": "CPU", "cpu_count_logical": 2, "memory_total_gib": 8, "python": "3.11",
               "torch": "2", "automedseg": "0"}
    study = {"study": "S", "fidelity": "continuation", "fidelity_note": "as asked", "trial_budget_s": 60,
             "total_budget_s": 600, "states": {"complete": 2}, "wall_s": 300, "best_trial": 3, "best_value": 0.7,
             "rule_defaults": {"lr_factor": 1.0},
             "trials": [{"number": 3, "state": "complete", "value": 0.7, "epochs": 20, "seconds": 60.0,
                         "retry_of": None, "params": {"lr_factor": 2.0}}]}
    return {"dataset_name": "toy", "configuration": "2d", "budget": "5m", "wall_s": 900.0, "command": "cmd",
            "study": study, "confirmation": conf, "machine": machine}


@pytest.mark.parametrize(("rule", "candidate", "adopted", "text"), [
    (0.80, 0.82, True, "**adopted**"),
    (0.80, 0.79, False, "**not adopted**"),
    (0.80, 0.80, False, "**not adopted**"),  # a tie keeps the rule plan
])
def test_verdict_is_read_back_and_summarised(bench, tmp_path: Path, rule: float, candidate: float,
                                              adopted: bool, text: str) -> None:
    _write_confirmation(tmp_path, rule=rule, candidate=candidate)
    conf = bench.confirmation_figures(tmp_path, "S")
    assert conf["adopted"] is adopted
    assert conf["margin"] == pytest.approx(candidate - rule)
    assert [r["key"] for r in conf["runs"]] == ["rule", "trial_3"]
    md = bench.build_summary(_figures(conf))
    assert text in md
    assert "| trial_3 | 3 |" in md and "lr_factor=2.000" in md


def test_differences_name_only_what_differs(bench) -> None:
    assert bench.differences({"a": 1, "b": 0.5}, {"a": 1, "b": 0.25}) == "b=0.500"
    assert bench.differences({"a": 1}, {"a": 1}) == "rule plan"
