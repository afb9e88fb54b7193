"""The training loss: soft Dice + cross-entropy, with deep supervision (nnU-Net's weighting)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def soft_dice_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per foreground class, over the whole batch: ``sum(p * onehot)`` and ``sum(p) + sum(onehot)``."""
    probs = torch.softmax(logits.float(), 1)
    onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
    axes = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)[1:]
    denom = probs.sum(axes)[1:] + onehot.sum(axes)[1:]
    return inter, denom


def _dice_loss(inter: torch.Tensor, denom: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    return 1 - ((2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes, computed over the whole batch (batch Dice)."""
    return _dice_loss(*soft_dice_terms(logits, target), smooth)


@dataclass
class DeepSupervisionLoss:
    """Soft Dice + cross-entropy at every output, weighted 1, 1/2, 1/4 ... (lowest level dropped), normalised.

    With ``track_classes`` the soft-Dice terms of the highest-resolution output are summed over the calls (no
    extra cost: the loss computes them); :meth:`take_class_dice` returns the soft Dice per foreground class
    since its last call (what :mod:`automedseg.class_sampling` weighs the class draw with).
    """

    n_outputs: int
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    track_classes: bool = False

    def __post_init__(self) -> None:
        w = np.array([1 / 2**i for i in range(self.n_outputs)])
        if self.n_outputs > 1:
            w[-1] = 0
        self.weights = (w / w.sum()).tolist()
        self._sums: tuple[torch.Tensor, torch.Tensor] | None = None

    def take_class_dice(self) -> np.ndarray | None:
        """Soft Dice per foreground class over the batches since the last call (``None``: none tracked)."""
        if self._sums is None:
            return None
        inter, denom = (t.double().cpu().numpy() for t in self._sums)
        self._sums = None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * inter / denom, np.nan)

    def __call__(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for i, (w, out, tgt) in enumerate(zip(self.weights, outputs, targets)):
            if w == 0:
                continue
            inter, denom = soft_dice_terms(out, tgt)
            if i == 0 and self.track_classes:
                terms = (inter.detach(), denom.detach())
                self._sums = terms if self._sums is None else (self._sums[0] + terms[0], self._sums[1] + terms[1])
            loss = self.dice_weight * _dice_loss(inter, denom)
            if self.ce_weight:
                loss = loss + self.ce_weight * F.cross_entropy(out.float(), tgt[:, 0].long())
            total = total + w * loss
        return total
