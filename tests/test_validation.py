"""Tests of automedseg.validation: the final validation's test-time mirroring rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from automedseg.validation import VALIDATION_MIRROR_MAX_SHARE, final_validation_axes, validation_mirror_axes


@pytest.mark.parametrize(("axes", "single_s", "allowed_s", "expected"), [
    ((0, 1, 2), 4.0, 120.0, (0, 1, 2)),  # 8 passes, 32 s of 120 s
    ((0, 1, 2), 20.0, 120.0, ()),  # 8 passes, 160 s: too slow
    ((0,), 60.0, 120.0, (0,)),  # 2 passes fit exactly
    ((0,), 61.0, 120.0, ()),
    ((), 1.0, 120.0, ()),  # nothing to mirror
    ((0, 1), None, 120.0, ()),  # unknown time under a limit: no mirroring
    ((0, 1), None, None, (0, 1)),  # no limit: the plan's axes
    ((0, 1), 1e6, None, (0, 1)),
])
def test_validation_mirror_axes(axes: tuple[int, ...], single_s: float | None, allowed_s: float | None,
                                expected: tuple[int, ...]) -> None:
    assert validation_mirror_axes(axes, single_pass_s=single_s, allowed_s=allowed_s) == expected


def _config(configuration_plan: Callable[..., Any], *, axes: tuple[int, ...], budget_s: float | None) -> Any:
    plan = configuration_plan((8, 8, 8))
    return dataclasses.replace(plan, augmentation=dataclasses.replace(plan.augmentation, mirror_axes=axes),
                               training=dataclasses.replace(plan.training, time_budget_s=budget_s))


@pytest.mark.parametrize(("budget_s", "train_s", "single_s", "expected"), [
    (1200.0, 0.0, 10.0, (0, 1)),  # 40 s of the budget's 120 s share
    (1200.0, 0.0, 40.0, ()),  # 160 s > 120 s
    (None, 1000.0, 20.0, (0, 1)),  # no budget: a share of the training time (80 s <= 100 s)
    (None, 100.0, 20.0, ()),
])
def test_final_validation_axes_share_of_budget_or_training_time(
        configuration_plan: Callable[..., Any], budget_s: float | None, train_s: float, single_s: float,
        expected: tuple[int, ...]) -> None:
    config = _config(configuration_plan, axes=(0, 1), budget_s=budget_s)
    assert VALIDATION_MIRROR_MAX_SHARE == pytest.approx(0.1)
    got = final_validation_axes(config, single_pass_s=single_s, history=[], train_seconds=train_s, n_val=4)
    assert got == expected


def test_final_validation_axes_falls_back_on_the_whole_image_scoring_time(
        configuration_plan: Callable[..., Any]) -> None:
    """A run resumed after its last epoch has no estimate of its own: the log's whole-image timing gives one."""
    config = _config(configuration_plan, axes=(0,), budget_s=600.0)
    fast = [{"pseudo_dice_images": 2, "pseudo_dice_seconds": 1.0}]  # 0.5 s/image x 4 x 1.5 = 3 s, x2 passes
    slow = [{"pseudo_dice_images": 1, "pseudo_dice_seconds": 20.0}]  # 120 s x 2 passes > 60 s
    kw = dict(single_pass_s=None, train_seconds=0.0, n_val=4)
    assert final_validation_axes(config, history=fast, **kw) == (0,)
    assert final_validation_axes(config, history=slow, **kw) == ()
    assert final_validation_axes(config, history=[{"pseudo_dice_images": 0}], **kw) == ()
