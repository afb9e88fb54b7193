"""Tests of automedseg.losses: soft Dice + cross-entropy with deep supervision, per-class tracking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automedseg.losses import DeepSupervisionLoss, soft_dice_loss


def _logits(target: torch.Tensor, *, num_classes: int, correct: bool) -> torch.Tensor:
    """Confident logits: the target class (or class 0 everywhere when not ``correct``)."""
    labels = target[:, 0] if correct else torch.zeros_like(target[:, 0])
    return 20 * torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


@pytest.fixture
def target() -> torch.Tensor:
    t = torch.zeros((2, 1, 4, 8, 8), dtype=torch.int8)
    t[:, :, 1:3, 1:4, 1:4] = 1
    t[:, :, 1:3, 5:7, 5:7] = 2
    return t


@pytest.mark.parametrize(("correct", "expected"), [(True, 0.0), (False, 1.0)])
def test_soft_dice_loss(target: torch.Tensor, correct: bool, expected: float) -> None:
    assert float(soft_dice_loss(_logits(target, num_classes=3, correct=correct), target)) == pytest.approx(
        expected, abs=1e-4)


def test_class_dice_tracked_over_calls_on_the_top_output(target: torch.Tensor) -> None:
    loss = DeepSupervisionLoss(2, track_classes=True)
    good = _logits(target, num_classes=3, correct=True)
    blind_to_2 = _logits(torch.where(target == 2, 0, target), num_classes=3, correct=True)  # 2 -> background
    half = torch.nn.functional.interpolate(good, scale_factor=0.5)
    assert loss.take_class_dice() is None
    loss([good, half], [target, target[:, :, ::2, ::2, ::2]])
    loss([blind_to_2, half], [target, target[:, :, ::2, ::2, ::2]])
    dice = loss.take_class_dice()
    assert dice is not None
    np.testing.assert_allclose(dice, [1.0, 2 * 72 / (72 + 144)], atol=1e-3)  # class 2: half of its calls right
    assert loss.take_class_dice() is None  # reset by taking
    untracked = DeepSupervisionLoss(2)
    untracked([good, half], [target, target[:, :, ::2, ::2, ::2]])
    assert untracked.take_class_dice() is None


def test_tracking_does_not_change_the_loss(target: torch.Tensor) -> None:
    logits = [torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
              torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))]
    targets = [target, target[:, :, ::2, ::2, ::2]]
    assert float(DeepSupervisionLoss(2, track_classes=True)(logits, targets)) == float(
        DeepSupervisionLoss(2)(logits, targets))
