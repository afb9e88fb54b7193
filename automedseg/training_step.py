"""One optimisation step as training takes it: the optimizer of a plan and :func:`train_step`.

Shared by the trainer (:mod:`automedseg.training`, which re-exports :func:`train_step`) and the calibration's
timing of a real training step (:mod:`automedseg.calibration_step`), so the planner's step figure is measured
on the very code that trains.

Example:
    >>> import torch
    >>> from automedseg.plans import TrainingPlan
    >>> model = torch.nn.Linear(2, 2)
    >>> type(make_optimizer(model.parameters(), TrainingPlan(epochs=1, iterations_per_epoch=1,
    ...                                                      optimizer="adamw"))).__name__
    'AdamW'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from automedseg.device import autocast_context, memory_format
from automedseg.losses import DeepSupervisionLoss
from automedseg.plans import TrainingPlan


def step_kernels() -> str:
    """What the CPU training step runs on besides PyTorch's own operators, e.g. ``fused norm, retained memory,
    one-pass labels``.

    The calibration stores it with its timed steps (:attr:`automedseg.calibration_cache.Calibration.step_kernels`)
    and times them again when it changes: the fused norm (:mod:`automedseg.fused_norm`, where a C compiler
    builds it) and the retained allocator (:mod:`automedseg.allocator`, glibc) each make the step faster, and the
    augmentation worker that shares the cores with it resamples labels in one pass
    (:mod:`automedseg.label_resampling`; always: it names the worker the steps were timed with).
    """
    from automedseg.allocator import can_retain
    from automedseg.fused_norm import fused_available

    norm = "fused norm" if fused_available() else "pytorch norm"
    memory = "retained memory" if can_retain() else "system allocator"
    return f"{norm}, {memory}, one-pass labels"


def make_optimizer(parameters: Iterable[torch.nn.Parameter], training: TrainingPlan) -> torch.optim.Optimizer:
    """The plan's optimizer: SGD with Nesterov momentum (``sgd``) or AdamW (``adamw``), at its initial rate."""
    if training.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=training.initial_lr, momentum=training.momentum, nesterov=True,
                               weight_decay=training.weight_decay)
    return torch.optim.AdamW(parameters, lr=training.initial_lr, weight_decay=training.weight_decay)


def on_device(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch array (numpy from the CPU workers, or a tensor already augmented on the device) on ``device``."""
    return (a if isinstance(a, torch.Tensor) else torch.from_numpy(a)).to(device, non_blocking=True)


def train_step(model: torch.nn.Module, batch: dict[str, Any], *, optimizer: torch.optim.Optimizer,
               loss_fn: DeepSupervisionLoss, device: torch.device, scaler: torch.amp.GradScaler | None = None,
               amp: bool = True, grad_clip_norm: float = 12.0) -> float:
    """One optimisation step on a batch from the training loader; returns the loss.

    Mixed precision as :func:`~automedseg.device.precision_for` decides (a ``scaler`` for fp16 only),
    channels-last inputs on CPU, gradient-norm clipping.
    """
    mf = memory_format(batch["data"].ndim - 2) if device.type == "cpu" else torch.contiguous_format
    x = on_device(batch["data"], device).contiguous(memory_format=mf)
    targets = [on_device(t, device) for t in batch["target"]]
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, amp):
        outputs = model(x)
    loss = loss_fn(outputs, targets)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
    return float(loss.detach())
