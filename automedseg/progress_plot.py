"""A fold's ``progress.png``: its training curves (loss, pseudo-Dice, learning rate, epoch time) with a title
naming the dataset, configuration and fold, and a caption explaining the pseudo-Dice lines.

Written by the trainer (:mod:`automedseg.training`) after every epoch; drawn on a bare matplotlib
:class:`~matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no GUI toolkit).

Example:
    >>> progress_title(dataset="Dataset001_Demo", configuration="3d_fullres", fold=0)
    'Dataset001_Demo: 3d_fullres, fold 0'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from automedseg.training_log import EMA_DECAY

EMA_LABEL = "EMA (picks checkpoint_best.pt)"
PSEUDO_DICE_CAPTION = (
    "Pseudo-Dice: mean foreground Dice of whole validation images predicted each epoch (dots; no mirroring; "
    "none in epochs that scored no image). "
    f"EMA: its exponential moving average (each scored epoch weighted {1 - EMA_DECAY:g}); checkpoint_best.pt is "
    "saved whenever it reaches a new high (star), and early stopping waits for one. "
    "Patches: Dice on sampled validation patches (foreground oversampled, so it flatters)."
)


def progress_title(*, dataset: str, configuration: str, fold: int | str) -> str:
    """The title of a fold's ``progress.png``: ``"<dataset>: <configuration>, fold <fold>"``."""
    return f"{dataset}: {configuration}, fold {fold}"


def _values(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """``key`` of each epoch as floats (``nan`` where missing or ``None``)."""
    out = []
    for h in history:
        v = h.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan)
    return out


def best_ema_epoch(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The 1-based epoch whose EMA pseudo-Dice was the first highest (where checkpoint_best.pt was last saved)."""
    ema = _values(history, "ema_pseudo_dice")
    best: int | None = None
    for i, v in enumerate(ema):
        if math.isfinite(v) and (best is None or v > ema[best]):
            best = i
    return None if best is None else int(history[best]["epoch"]) + 1


def progress_figure(history: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """The training curves of ``history`` (the trainer's per-epoch dicts, :class:`~automedseg.training_log.EpochRecord`
    fields) as a matplotlib Figure, titled ``title`` and captioned with :data:`PSEUDO_DICE_CAPTION`."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 11.8))
    axes = fig.subplots(4, 1, sharex=True)
    ep = [int(h["epoch"]) + 1 for h in history]
    axes[0].plot(ep, _values(history, "train_loss"), label="train loss")
    axes[0].plot(ep, _values(history, "val_loss"), label="validation cross-entropy (patches)")
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("loss")
    ema = _values(history, "ema_pseudo_dice")
    axes[1].plot(ep, _values(history, "mean_pseudo_dice"), ".", label="pseudo-Dice (whole images)")
    axes[1].plot(ep, ema, label=EMA_LABEL)
    axes[1].plot(ep, _values(history, "mean_patch_pseudo_dice"), alpha=0.5, label="pseudo-Dice (patches)")
    best = best_ema_epoch(history)
    if best is not None:
        axes[1].plot([best], [ema[ep.index(best)]], "*", color="black", markersize=11,
                     label=f"best EMA: epoch {best}")
    axes[1].set_ylabel("Dice")
    axes[1].legend(fontsize=8)
    axes[2].plot(ep, _values(history, "lr"))
    axes[2].set_ylabel("learning rate")
    axes[3].plot(ep, _values(history, "epoch_seconds"))
    axes[3].set_ylabel("epoch time (s)")
    axes[3].set_xlabel("epoch")
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.text(0.02, 0.005, PSEUDO_DICE_CAPTION, fontsize=8, wrap=True, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_progress(history: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> None:
    """Write :func:`progress_figure` as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from automedseg.atomic import atomic_write

    fig = progress_figure(history, title=title)
    FigureCanvasAgg(fig)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=80))
