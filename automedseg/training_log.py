"""A fold's ``log.jsonl``: one :class:`EpochRecord` per finished epoch, written by the trainer.

The trainer is the owner; the report, the search's pruner and the benchmarks read it through
:func:`read_training_log`, which checks every field's type and either raises (naming the file, line and field)
or, given a ``problems`` list, skips a bad line and notes it there (the report tolerates broken folders).

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "log.jsonl"
    >>> write_training_log(path, [EpochRecord(epoch=0, train_loss=1.2, mean_pseudo_dice=0.5, epoch_seconds=3.0)])
    >>> read_training_log(path)[0].train_loss
    1.2
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automedseg.atomic import atomic_write_text, jsonable
from automedseg.errors import InputError
from automedseg.serialize import PlanError, from_jsonable, to_jsonable

EMA_DECAY = 0.9
"""``ema_pseudo_dice`` after an epoch that scored images: ``EMA_DECAY * previous + (1 - EMA_DECAY) * mean``."""


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch of training did.

    Attributes:
        epoch: 0-based epoch index.
        train_loss: Mean training loss.
        val_loss: Cross-entropy on the validation patches.
        pseudo_dice: Dice per foreground class on the whole validation images scored this epoch
            (:mod:`automedseg.full_image_dice`; ``None``: class neither there nor predicted; empty: no image was
            scored this epoch). Logs written before whole images were scored hold the patch figure here.
        mean_pseudo_dice: Their mean (``None``: nothing scored this epoch).
        ema_pseudo_dice: Exponential moving average of the mean over the epochs that scored images
            (:data:`EMA_DECAY`; what checkpoint_best and early stopping follow).
        patch_pseudo_dice: Dice per foreground class on the sampled validation patches (foreground oversampled,
            so it flatters: kept for comparison; empty in older logs).
        mean_patch_pseudo_dice: Their mean.
        pseudo_dice_images: Whole images scored this epoch (``None`` in older logs).
        pseudo_dice_seconds: Wall time of scoring them.
        lr: Learning rate of the epoch.
        epoch_seconds: Wall time of training, validation batches and whole-image scoring.
        seconds_per_iteration: Training step time.
        data_wait_fraction: Share of the training time spent waiting for batches.
        iterations: Training iterations run.
        planned_epochs: The schedule's epochs after this epoch's refit.
        time: Unix time at the end of the epoch.
        train_soft_dice: Soft Dice per foreground class over the epoch's training batches (highest-resolution
            output; empty in older logs).
        class_weights: Weights per class index (background first) the forced-foreground samples were drawn with
            after this epoch (``class_sampling: difficulty``; empty otherwise).
        planned_seconds_per_iteration: The plan's cost-model step (``training.estimated_seconds_per_iteration``),
            beside the measured ``seconds_per_iteration`` (absent in logs of older runs).
    """

    epoch: int
    train_loss: float | None = None
    val_loss: float | None = None
    pseudo_dice: tuple[float | None, ...] = ()
    mean_pseudo_dice: float | None = None
    ema_pseudo_dice: float | None = None
    patch_pseudo_dice: tuple[float | None, ...] = ()
    mean_patch_pseudo_dice: float | None = None
    pseudo_dice_images: int | None = None
    pseudo_dice_seconds: float | None = None
    lr: float | None = None
    epoch_seconds: float = 0.0
    seconds_per_iteration: float | None = None
    data_wait_fraction: float | None = None
    iterations: int | None = None
    planned_epochs: int | None = None
    time: float | None = None
    planned_seconds_per_iteration: float | None = None
    train_soft_dice: tuple[float | None, ...] = ()
    class_weights: tuple[float, ...] = ()


def write_training_log(path: Path, records: Sequence[EpochRecord | Mapping[str, Any]]) -> None:
    """Write the whole log atomically, one JSON object a line (non-finite numbers as ``null``).

    Records may be given as mappings of the same fields (the trainer's history); they are checked first.
    """
    typed = [r if isinstance(r, EpochRecord) else from_jsonable(EpochRecord, jsonable(dict(r)), f"{path}: epoch")
             for r in records]
    text = "".join(json.dumps(jsonable(to_jsonable(r)), allow_nan=False) + "\n" for r in typed)
    atomic_write_text(Path(path), text)


def read_training_log(path: Path, *, problems: list[str] | None = None) -> list[EpochRecord]:
    """The epochs of a fold's ``log.jsonl`` (empty when the file is missing).

    Args:
        path: The log file.
        problems: Where to note lines that cannot be read (they are skipped); ``None``: raise instead.

    Raises:
        InputError: A line is not JSON or a field has the wrong type (only when ``problems`` is ``None``).
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        if problems is None:
            raise InputError(f"{path}: unreadable ({e})") from None
        problems.append(f"{path}: unreadable ({e})")
        return []
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(from_jsonable(EpochRecord, _parse(line), f"{path}: line {n}"))
        except (ValueError, PlanError) as e:
            message = str(e) if isinstance(e, PlanError) else f"{path}: line {n} is not JSON"
            if problems is None:
                raise InputError(message) from None
            problems.append(f"{message} (skipped)")
    return out


def _parse(line: str) -> Any:
    data = json.loads(line)  # json accepts NaN and Infinity as older logs wrote them
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()} \
        if isinstance(data, dict) else data
