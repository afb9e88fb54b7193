"""What a training run is given besides the plan (:class:`TrainOptions`, and the schedule overrides they make,
:func:`apply_overrides`) and what it reports (:class:`FoldResult`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automedseg.planning import schedule_for_budget
from automedseg.plans import ConfigurationPlan

if TYPE_CHECKING:
    from automedseg.tracking import TrackerFactory


@dataclass(frozen=True)
class TrainOptions:
    """Run-time choices that are not part of the plan (overrides are recorded in the fold's plan copy).

    Attributes:
        device: ``cpu``, ``cuda``, ``mps`` or ``None`` (what exists).
        epochs: Override the plan's number of epochs.
        iterations_per_epoch: Override the plan's iterations per epoch.
        time_budget_s: Wall-clock training budget; the number of epochs is refitted to it after every epoch
            (:func:`~automedseg.planning.budget_epochs`: shortened or extended so that the run, start-up and
            final validation included, ends in the last 5 % of the budget).
        restart: Ignore an existing checkpoint and start again.
        pretrained: Checkpoint to initialise from (matching layers only).
        early_stopping_patience: Stop after this many epochs without a new best EMA pseudo-Dice.
        threads: Torch CPU threads (default: the plan's device profile); with the plan's ``worker_placement``
            ``own_core`` on a CPU, the cores spent: ``threads - 1`` training threads beside the worker's own core
            (:mod:`automedseg.thread_placement`).
        num_workers: Override augmentation worker processes (0: in-process).
        amp: Mixed precision as :func:`~automedseg.device.precision_for` decides (bf16 on CPUs with native
            bf16 and on CUDA GPUs of compute capability 8.0 or newer, fp16 with a gradient scaler on older
            GPUs, fp32 elsewhere); ``False``: fp32. The choice is recorded in the fold's plan copy.
        validate: Run the final sliding-window validation of the held-out cases.
        progress: Show a progress bar.
        output_dir: Write the fold here instead of ``<work>/<configuration>/fold_K`` (search trials).
        distributed: Join the process group set up by ``torchrun`` (DistributedDataParallel; gloo on CPU,
            NCCL on CUDA). The global batch is split over the ranks; only rank 0 writes files.
        augment_on_device: Augment batched on the training device, the CPU workers only reading windows
            (:mod:`automedseg.device_batches`); ``None``: the plan's ``augment_on_device``, else on CUDA only.
        lr_schedule: ``lr_schedule(epoch, planned_epochs, initial_lr)`` -> the epoch's learning rate instead of
            the poly decay (search trials with continuation, :mod:`automedseg.search_rungs`).
        epoch_hook: ``epoch_hook(epoch, planned_epochs, network)``, called at the start of every epoch before its
            learning rate is set, with the bare network: e.g. freezes or unfreezes parameters (``requires_grad``;
            :mod:`automedseg.adapt` freezes the encoder for the first part of a fine-tune).
        trackers: What the run reports epochs and stages to (:mod:`automedseg.tracking`): factories called with
            the fold's :class:`~automedseg.tracking.RunInfo`; ``None``: the defaults (TensorBoard event files
            when ``tensorboard`` is installed); ``()``: none.
    """

    device: str | None = None
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_s: float | None = None
    restart: bool = False
    pretrained: Path | None = None
    early_stopping_patience: int | None = None
    threads: int | None = None
    num_workers: int | None = None
    amp: bool = True
    validate: bool = True
    progress: bool = True
    output_dir: Path | None = None
    distributed: bool = False
    augment_on_device: bool | None = None
    lr_schedule: Callable[[int, int, float], float] | None = None
    epoch_hook: Callable[[int, int, Any], None] | None = None
    trackers: tuple[TrackerFactory, ...] | None = None


@dataclass
class FoldResult:
    """What a finished (or resumed-and-finished) fold reports."""

    fold_dir: Path
    epochs_run: int
    best_ema_dice: float
    train_seconds: float
    validation: dict[str, Any] | None


def apply_overrides(config: ConfigurationPlan, options: TrainOptions) -> ConfigurationPlan:
    """The configuration with the CLI's schedule overrides applied.

    An explicit ``epochs`` or ``iterations_per_epoch`` without an explicit budget drops the plan's budget,
    so the schedule is trained as given. A budget alone refits the schedule to it with the plan's step estimate
    by the planner's rule (:func:`~automedseg.planning.schedule_for_budget`), keeping the epochs of a plan
    with ``fixed_epochs`` (a search trial).
    """
    tr = config.training
    changes: dict[str, Any] = {}
    if options.epochs is not None:
        changes["epochs"] = int(options.epochs)
    if options.iterations_per_epoch is not None:
        changes["iterations_per_epoch"] = int(options.iterations_per_epoch)
    if options.time_budget_s is not None:
        changes["time_budget_s"] = float(options.time_budget_s)
        step_s = tr.estimated_seconds_per_iteration
        if options.iterations_per_epoch is None and options.epochs is None and step_s:
            # Another budget than the plan's: refit the schedule with the plan's step estimate (the trainer
            # then corrects it with measured epoch times).
            sched = schedule_for_budget(step_s, options.time_budget_s,
                                        fixed_epochs=tr.epochs if tr.fixed_epochs else None)
            changes.update(epochs=sched.epochs, iterations_per_epoch=sched.iterations_per_epoch,
                           val_iterations=sched.val_iterations)
    elif options.epochs is not None or options.iterations_per_epoch is not None:
        changes["time_budget_s"] = None  # an explicit schedule is trained as given, not cut to the plan's budget
    if options.num_workers is not None:
        changes["num_workers"] = int(options.num_workers)
    if not changes:
        return config
    return dataclasses.replace(config, training=dataclasses.replace(tr, **changes))
