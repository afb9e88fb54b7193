"""The training schedule rule shared by the planner, ``train --time-budget``, the trainer's refit after every
epoch and the search: how many epochs, iterations and validation batches fit a time budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from automedseg.class_sampling import MIN_CLASS_WEIGHT

# --- the schedule: one rule for the planner, `train --time-budget`, the trainer's refit and the search ---------


TRAIN_FRACTION = 0.92  # of a budget: training steps; the rest per-epoch validation and the final validation
END_WINDOW = 0.05  # a budgeted run ends in the last 5 % of its budget (validation included): see budget_epochs
MAX_VAL_ITERATIONS = 50
ITERATIONS_PER_EPOCH_MAX = 250


class Schedule(NamedTuple):
    """Epochs, training iterations per epoch and validation batches per epoch."""

    epochs: int
    iterations_per_epoch: int
    val_iterations: int


def validation_batches(ipe: int, *, fixed: bool, most: int = MAX_VAL_ITERATIONS) -> int:
    """Validation batches per epoch of ``ipe`` training iterations (trial epochs: a quarter of them)."""
    if fixed:  # short trial epochs: a quarter of the training iterations, at least 2
        return max(2, min(most, math.ceil(ipe / 4)))
    return max(5, min(most, ipe // 5))


def schedule_for_budget(step_s: float, budget_s: float, *, fixed_epochs: int | None = None,
                        max_val_iterations: int = MAX_VAL_ITERATIONS) -> Schedule:
    """The schedule that fills ``budget_s`` with training steps of ``step_s`` seconds.

    :data:`TRAIN_FRACTION` of the budget is training; the rest is left for per-epoch validation batches and
    the final sliding-window validation. This one rule schedules the planner's folds, ``train --time-budget``
    (:func:`~automedseg.training.apply_overrides`) and the search's trials and searched plan; the trainer
    then corrects the number of epochs with measured epoch times (:func:`budget_epochs`).

    Args:
        step_s: Seconds per training iteration (the cost model's estimate).
        budget_s: Training wall time.
        fixed_epochs: Train exactly this many epochs (search trials: the pruner's steps); the iterations per
            epoch fill the budget. ``None``: a full fold, 20 to 250 iterations per epoch, so about 20 epochs
            (checkpoints) or more.
        max_val_iterations: At most this many validation batches per epoch.

    Example:
        >>> schedule_for_budget(0.25, 1200.0)
        Schedule(epochs=20, iterations_per_epoch=220, val_iterations=44)
        >>> schedule_for_budget(0.25, 100.0, fixed_epochs=20)
        Schedule(epochs=20, iterations_per_epoch=18, val_iterations=5)
    """
    total = int(budget_s * TRAIN_FRACTION / step_s)
    if fixed_epochs is not None:
        epochs = max(1, int(fixed_epochs))
        ipe = max(2, total // epochs)
        return Schedule(epochs, ipe, validation_batches(ipe, fixed=True, most=max_val_iterations))
    total = max(20, total)
    ipe = int(min(ITERATIONS_PER_EPOCH_MAX, max(20, total // 20)))
    return Schedule(max(1, total // ipe), ipe, validation_batches(ipe, fixed=False, most=max_val_iterations))


def budget_epochs(*, done: int, ceiling: int, epoch_seconds: Sequence[float], budget_s: float, spent_s: float,
                  fixed_epochs: bool = False, reserve_s: float = 0.0) -> int:
    """Epochs to train in all so that the run ends in the last :data:`END_WINDOW` of its time budget.

    The trainer's refit of :func:`schedule_for_budget` after every epoch, with measured times: the mean of the
    last three epochs predicts the next ones; ``reserve_s`` (the final validation's estimated time) is kept
    back, and the schedule aims at the middle of the last :data:`END_WINDOW` of the budget. A slow first epoch
    (start-up, a busy moment on the machine) shortens the schedule only until faster epochs give the time back,
    and a plan that over-estimated the step is extended past its planned epochs (``ceiling``) instead of
    leaving the budget unused (the learning-rate schedule follows the new length). A schedule with
    ``fixed_epochs`` (a search trial, whose epochs are the pruner's steps) keeps its ``ceiling``.

    Args:
        done: Epochs finished.
        ceiling: The planned epochs (kept when ``fixed_epochs``).
        epoch_seconds: Measured epoch times so far.
        budget_s: The run's wall-time budget.
        spent_s: Wall time spent so far (start-up included).
        fixed_epochs: Keep ``ceiling`` whatever the times.
        reserve_s: Time kept back for what follows the last epoch (the final validation).

    Example:
        >>> budget_epochs(done=1, ceiling=20, epoch_seconds=[16.4], budget_s=255.0, spent_s=16.4)
        15
        >>> budget_epochs(done=3, ceiling=10, epoch_seconds=[5.0, 5.0, 5.0], budget_s=200.0, spent_s=15.0,
        ...               reserve_s=20.0)
        35
    """
    if fixed_epochs:
        return max(int(done), int(ceiling))
    mean_epoch = max(1e-9, float(np.mean(list(epoch_seconds)[-3:])))
    target_end = budget_s * (1.0 - END_WINDOW / 2) - reserve_s
    return max(int(done), int(done) + int(round((target_end - spent_s) / mean_epoch)))


def last_epoch_iterations(*, iterations_per_epoch: int, seconds_per_iteration: float, epoch_wall_s: float,
                          left_s: float) -> int:
    """Iterations of the last epoch so that it ends ``left_s`` from now, between 1 and twice the usual.

    ``epoch_wall_s`` is a whole epoch's wall time; what is not training steps (validation batches, checkpoint,
    plot) is kept as a fixed cost. Refines :func:`budget_epochs`, whose whole epochs alone would miss the
    target by up to half an epoch.

    Example:
        >>> last_epoch_iterations(iterations_per_epoch=100, seconds_per_iteration=0.1, epoch_wall_s=12.0,
        ...                       left_s=7.0)
        50
    """
    fixed = max(0.0, epoch_wall_s - iterations_per_epoch * seconds_per_iteration)
    n = (left_s - fixed) / max(seconds_per_iteration, 1e-9)
    return int(min(2 * iterations_per_epoch, max(1, round(n))))


# --- the optimisation recipe for the number of iterations a schedule allows ------------------------------------

# nnU-Net's recipe (SGD, Nesterov momentum 0.99, lr 1e-2, poly) is tuned for 250,000 iterations. With the few
# thousand a CPU budget buys it leaves small structures unlearned. Measured (AMD EPYC Zen 4, 2 threads, the same
# plan and 15 min, openkbp_hn_ct fold 0: 3d_fullres, width 16, batch 2, patch 32x32x40, ~3,900 iterations): SGD
# 1e-2 mean Dice 0.055 (six of seven organs 0 in every epoch), AdamW 1e-3 mean Dice 0.705 (every organ learned,
# from epoch 3). See benchmarks/results/shared_datasets.md for the other datasets under this rule.
SHORT_SCHEDULE_ITERATIONS = 25_000


class Recipe(NamedTuple):
    """Optimizer, its peak learning rate and weight decay, and why they were chosen."""

    optimizer: str
    initial_lr: float
    weight_decay: float
    reason: str


def recipe_for(iterations: int | None) -> Recipe:
    """The optimizer and learning rate for a fold of ``iterations`` training steps (``None``: no budget).

    Schedules shorter than :data:`SHORT_SCHEDULE_ITERATIONS` (a tenth of nnU-Net's 250,000 steps) train with
    AdamW at 1e-3, longer ones with nnU-Net's SGD at 1e-2; both decay with the poly schedule.

    Example:
        >>> recipe_for(4000).optimizer, recipe_for(4000).initial_lr
        ('adamw', 0.001)
        >>> recipe_for(250_000).optimizer, recipe_for(None).optimizer
        ('sgd', 'sgd')
    """
    if iterations is not None and iterations < SHORT_SCHEDULE_ITERATIONS:
        return Recipe("adamw", 1e-3, 3e-5,
                      f"short schedule ({iterations} < {SHORT_SCHEDULE_ITERATIONS} iterations): AdamW lr 1e-3, "
                      "which learns small structures within a few thousand steps where nnU-Net's SGD 1e-2 does not")
    return Recipe("sgd", 1e-2, 3e-5, "long schedule: nnU-Net's SGD (Nesterov, momentum 0.99) at lr 1e-2")


class ClassSampling(NamedTuple):
    """How the forced-foreground samples pick their class (``TrainingPlan.class_sampling``), and why."""

    mode: str
    reason: str


def class_sampling_for(foreground_classes: int) -> ClassSampling:
    """``difficulty`` for two or more foreground classes, ``uniform`` (nothing to weigh) for one.

    Uniform class-first sampling left the esophagus of ``openkbp_hn_ct`` fold 3 at Dice 0 for all 28 epochs of a
    20-minute fold while the six other organs reached 0.69-0.85 (AMD EPYC, 2 threads;
    ``benchmarks/results/openkbp_cv.md``); weighing the draw by each class's training soft Dice
    (:mod:`automedseg.class_sampling`) puts the classes not yet learned in front of the network more often.

    Example:
        >>> class_sampling_for(7).mode, class_sampling_for(1).mode
        ('difficulty', 'uniform')
    """
    if foreground_classes < 2:
        return ClassSampling("uniform", "")
    return ClassSampling(
        "difficulty",
        f"{foreground_classes} foreground classes: the forced-foreground samples draw a class weighted by "
        f"1 - its training soft Dice (at least {MIN_CLASS_WEIGHT}), so classes not yet learned come up more often")
