"""Successive halving with continuation: the ``continuation`` fidelity of :mod:`automedseg.search`.

A short trial with the poly schedule of its own length is judged at its rungs while its learning rate is still
high, and its schedule depends on how long it will train. Here the learning rate does not depend on the final
length: it stays at the plan's rate and cools down (linearly, over :func:`cooldown_epochs`) before each rung
end, where the trial is judged on the cooled-down network (the pseudo-Dice of the rung's last epoch). A trial the
pruner promotes *resumes* from its checkpoint taken before that cool-down and trains on at the constant rate to
the next rung, where it cools down again; the cool-down epochs of the rungs it passed are discarded (the fold's
log keeps the epochs it continued from). Only the last rung's cool-down stays, and the trial ends with the
fold-0 validation as any other.

Rungs (:func:`rung_ends`): the pruner's, ``first x 3^k`` epochs with ``first`` a quarter of the trial's epochs
(at least 2), then the trial's last epoch. The pruner is given the same first rung.

Example:
    >>> rung_ends(20), [cooldown_epochs(e) for e in rung_ends(20)]
    ([5, 15, 20], [1, 2, 2])
    >>> [round(continuation_lr(e, 5, 1e-3), 6) for e in range(5)]
    [0.001, 0.001, 0.001, 0.001, 0.0005]
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from automedseg.plans import Plans
from automedseg.training_log import read_training_log
from automedseg.training_options import FoldResult, TrainOptions
from automedseg.workspace import Workspace

Log = Callable[[str], None]

COOLDOWN_FRACTION = 0.1  # of the epochs up to a rung end: the cool-down before it
REDUCTION_FACTOR = 3  # the pruners' (automedseg.search_study.make_pruner)
PRE_COOLDOWN = "checkpoint_pre_cooldown.pt"


def rung_ends(trial_epochs: int, *, reduction_factor: int = REDUCTION_FACTOR) -> list[int]:
    """The epochs at which a trial of ``trial_epochs`` epochs is judged, the last one included."""
    ends, r = [], first_rung(trial_epochs)
    while r < trial_epochs:
        ends.append(r)
        r *= reduction_factor
    return [*ends, int(trial_epochs)]


def first_rung(trial_epochs: int) -> int:
    """A quarter of the trial's epochs, at least 2 (a rung needs an epoch before its cool-down)."""
    return max(2, int(trial_epochs) // 4)


def cooldown_epochs(rung_end: int) -> int:
    """Epochs of the cool-down before a rung end: :data:`COOLDOWN_FRACTION` of it, at least 1, leaving 1 before."""
    return max(1, min(int(rung_end) - 1, round(COOLDOWN_FRACTION * rung_end)))


def continuation_lr(epoch: int, planned_epochs: int, initial_lr: float) -> float:
    """The learning rate of ``epoch`` in a run planned to end at the rung ``planned_epochs``: constant, then a
    linear cool-down over the rung's last :func:`cooldown_epochs` epochs (a :class:`TrainOptions` ``lr_schedule``).
    """
    c = cooldown_epochs(planned_epochs)
    if epoch < planned_epochs - c:
        return float(initial_lr)
    return float(initial_lr) * (planned_epochs - epoch) / (c + 1)


def extra_epochs(trial_epochs: int) -> int:
    """Epochs a trial that passes every rung trains besides its own: the discarded cool-downs."""
    return sum(cooldown_epochs(e) for e in rung_ends(trial_epochs)[:-1])


def _last_pseudo_dice(fold_dir: Path) -> float:
    history = read_training_log(fold_dir / "log.jsonl", problems=[])
    value = history[-1].mean_pseudo_dice if history else None
    return float(value) if value is not None and math.isfinite(value) else 0.0


def train_with_continuation(ws: Workspace, name: str, *, plans: Plans, options: TrainOptions, epochs: int,
                            report: Callable[[float, int], None], log: Log) -> FoldResult:
    """Train fold 0 of a trial rung by rung, resuming a promoted trial from before its last cool-down.

    Args:
        ws: Work folder.
        name: The trial's configuration in ``plans``.
        plans: The plan with the trial's configuration.
        options: The trial's options (``output_dir`` set); ``epochs``, ``restart``, ``validate`` and
            ``lr_schedule`` are set here per rung.
        epochs: The trial's epochs (the last rung end).
        report: ``report(score, rung_end)`` after each rung; raises (``optuna.TrialPruned``) to stop the trial.
        log: Where messages go.

    Returns:
        The last rung's fold result (with the fold-0 validation).
    """
    from automedseg import training

    out = Path(options.output_dir)
    ends = rung_ends(epochs)
    result: FoldResult | None = None
    for k, end in enumerate(ends):
        last = k == len(ends) - 1
        keep_after = end - cooldown_epochs(end) - 1  # the epoch whose checkpoint a promoted trial resumes from

        def keep(epoch: int, ema: float, keep_after: int = keep_after, last: bool = last) -> bool:
            if epoch == keep_after and not last:
                shutil.copyfile(out / "checkpoint_latest.pt", out / PRE_COOLDOWN)
            return False

        if k > 0:  # promoted: continue from before the cool-down, not from its end and not from scratch
            os.replace(out / PRE_COOLDOWN, out / "checkpoint_latest.pt")
            (out / "checkpoint_final.pt").unlink(missing_ok=True)
            log(f"promoted past epoch {ends[k - 1]}: continuing to epoch {end}")
        opts = dataclasses.replace(options, epochs=end, restart=k == 0, validate=last and options.validate,
                                   lr_schedule=continuation_lr)
        result = training.train_fold(ws, name, 0, plans=plans, options=opts, log=log, epoch_callback=keep)
        report(_last_pseudo_dice(out), end)
    assert result is not None
    return result


def continuation_attrs(epochs: int) -> dict[str, Any]:
    """What a trial records about its rungs (``rungs``, ``cooldowns``)."""
    ends = rung_ends(epochs)
    return {"rungs": ends, "cooldowns": [cooldown_epochs(e) for e in ends]}
