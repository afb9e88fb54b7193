"""Tests for automedseg.configuration_fit: width, patch and batch of one configuration for the machine and budget.

Most of the fitting is tested through :func:`automedseg.planning.plan_dataset` in ``test_planning.py`` (budgets,
schedules, recipes) and ``test_cost_model.py`` (data-bound widening); the architecture variants in
``test_network_blocks.py``.
"""

from __future__ import annotations

import dataclasses

from automedseg import configuration_fit as F
from automedseg.planning import NOMINAL_PROFILES, plan_dataset

CPU = NOMINAL_PROFILES["reference-cpu-2core"]
GPU = NOMINAL_PROFILES["reference-gpu-24g"]


def _fp(make, spacing, shape, n=3, **kw):
    return make([spacing] * n, [shape] * n, **kw)


def test_tight_budget_terminates(synthetic_fingerprint, monkeypatch):
    calls = {"n": 0}
    original = F.network_for

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3000:
            raise RuntimeError("planner did not terminate")
        return original(*args, **kwargs)

    # Regression: the patch-shrink loop used to spin forever when the axis it picked was already at its
    # minimum while other axes could still shrink.
    monkeypatch.setattr(F, "network_for", counting)
    plans = plan_dataset(_fp(synthetic_fingerprint, (5.0, 0.7, 0.7), (40, 512, 512)), device=CPU,
                         time_budget_s=60)
    assert all(c.training.estimated_fold_seconds <= 60 for c in plans.configurations.values())
    assert calls["n"] > 0  # the loop looked the network up where it is fitted


def test_training_budget_asks_for_what_short_steps_would_give(synthetic_fingerprint):
    ctx = F.FitContext(fingerprint=_fp(synthetic_fingerprint, (1.0, 1.0, 1.0), (32, 32, 32)), device=GPU,
                       time_budget_s=None, seed=0, in_channels=1, num_classes=2, normalization=(), total_voxels=1.0,
                       architecture="plain_unet")
    assert F.training_budget(ctx) == (None, F.MIN_ITERATIONS)  # a GPU without a budget: nnU-Net's schedule
    assert F.training_budget(dataclasses.replace(ctx, device=CPU)) == (F.DEFAULT_CPU_BUDGET_S, F.MIN_ITERATIONS)
    assert F.training_budget(dataclasses.replace(ctx, device=CPU, time_budget_s=60.0)) == (60.0, 600)
    assert F.training_budget(dataclasses.replace(ctx, device=CPU, time_budget_s=1.0)) == (1.0, 50)
