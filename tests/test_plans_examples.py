"""The checked-in example plans are what the planner makes today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from automedseg.plans import Plans

PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"


def _regenerate_module():
    spec = importlib.util.spec_from_file_location("regenerate", PLANS_DIR / "regenerate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_plan_reproduces_checked_in_file() -> None:
    expected = (PLANS_DIR / "demo_cpu.json").read_text()
    assert _regenerate_module().demo_plan() == expected, "run `python plans/regenerate.py` and commit the result"


@pytest.mark.parametrize("name", sorted(p.name for p in PLANS_DIR.glob("*.json")))
def test_example_plans_load_and_round_trip(name: str) -> None:
    text = (PLANS_DIR / name).read_text()
    assert Plans.from_json(text).to_json() == text
