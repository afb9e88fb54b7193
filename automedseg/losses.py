"""The training loss: soft Dice + cross-entropy, with deep supervision (nnU-Net's weighting)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes, computed over the whole batch (batch Dice)."""
    probs = torch.softmax(logits.float(), 1)
    onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
    axes = (0, *range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)[1:]
    denom = probs.sum(axes)[1:] + onehot.sum(axes)[1:]
    dice = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    return 1 - dice.mean()


@dataclass
class DeepSupervisionLoss:
    """Soft Dice + cross-entropy at every output, weighted 1, 1/2, 1/4 ... (lowest level dropped), normalised."""

    n_outputs: int
    dice_weight: float = 1.0
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        w = np.array([1 / 2**i for i in range(self.n_outputs)])
        if self.n_outputs > 1:
            w[-1] = 0
        self.weights = (w / w.sum()).tolist()

    def __call__(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out, tgt in zip(self.weights, outputs, targets):
            if w == 0:
                continue
            loss = self.dice_weight * soft_dice_loss(out, tgt)
            if self.ce_weight:
                loss = loss + self.ce_weight * F.cross_entropy(out.float(), tgt[:, 0].long())
            total = total + w * loss
        return total
