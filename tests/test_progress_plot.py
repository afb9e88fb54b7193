"""progress.png tests: the title (dataset, configuration, fold), the EMA legend and caption, the best epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from automedseg.progress_plot import (
    EMA_LABEL,
    PSEUDO_DICE_CAPTION,
    best_ema_epoch,
    plot_progress,
    progress_figure,
    progress_title,
)
from automedseg.training_log import EMA_DECAY


def _history(ema: list[float | None]) -> list[dict[str, Any]]:
    return [{"epoch": i, "train_loss": 1.0 - 0.1 * i, "val_loss": 0.9, "mean_pseudo_dice": v,
             "ema_pseudo_dice": v, "mean_patch_pseudo_dice": 0.5, "lr": 0.01, "epoch_seconds": 2.0}
            for i, v in enumerate(ema)]


@pytest.mark.parametrize("dataset, configuration, fold, expected", [
    ("Dataset001_Demo", "3d_fullres", 0, "Dataset001_Demo: 3d_fullres, fold 0"),
    ("Hippo", "2d_searched", "all", "Hippo: 2d_searched, fold all"),
])
def test_progress_title(dataset: str, configuration: str, fold: int | str, expected: str) -> None:
    assert progress_title(dataset=dataset, configuration=configuration, fold=fold) == expected


@pytest.mark.parametrize("ema, best", [
    ([0.2, 0.5, 0.4], 2),
    ([None, 0.3, 0.3], 2),  # the first highest: checkpoint_best.pt is saved on a strict improvement
    ([None, None], None),
    ([], None),
])
def test_best_ema_epoch(ema: list[float | None], best: int | None) -> None:
    assert best_ema_epoch(_history(ema)) == best


def test_progress_figure_has_title_legend_and_caption() -> None:
    fig = progress_figure(_history([0.2, None, 0.6, 0.5]), title="Demo: 2d, fold 1")
    assert fig._suptitle is not None and fig._suptitle.get_text() == "Demo: 2d, fold 1"
    dice_legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert EMA_LABEL in dice_legend and "best EMA: epoch 3" in dice_legend
    assert PSEUDO_DICE_CAPTION in [t.get_text() for t in fig.texts]
    assert f"weighted {1 - EMA_DECAY:g}" in PSEUDO_DICE_CAPTION and "checkpoint_best.pt" in PSEUDO_DICE_CAPTION


def test_plot_progress_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "progress.png"
    plot_progress(_history([0.1, 0.3]), path, title="Demo: 3d_fullres, fold 0")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (640, 944)
