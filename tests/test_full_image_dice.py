"""The per-epoch pseudo-Dice on whole validation images: tile counts, the rotation, the scoring, ranks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from automedseg.augmentation import make_validation_loader
from automedseg.distributed import Dist
from automedseg.full_image_dice import (
    ImageDice,
    ImageRotation,
    WholeImage,
    confusion_counts,
    image_tiles,
    predict_single_tiles,
    score_images,
    whole_images,
)
from automedseg.validation import pseudo_dice


class Threshold(torch.nn.Module):
    """Class 1 wherever the first channel is above 0.5: finds a foreground block and any decoy as bright."""

    def __init__(self) -> None:
        super().__init__()
        self.deep_supervision = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, :1] - 0.5) * 10
        return torch.cat([torch.zeros_like(fg), fg], 1)


class RecordingDist(Dist):
    """Rank ``rank`` of ``world`` without a process group: ``sum`` keeps this rank's counts and returns them."""

    def sum(self, values: np.ndarray) -> np.ndarray:
        self.summed = np.array(values)
        return values


def _images(tiles: list[int]) -> list[WholeImage]:
    return [WholeImage(f"c{i}", None, t) for i, t in enumerate(tiles)]


# --- tiles and images --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "patch", "step", "expected"), [
    ((1, 20, 24), (32, 32), 0.5, 1),  # smaller than the patch: padded, one tile
    ((1, 300, 100), (128, 128), 0.5, 4),  # 4 x 1
    ((1, 64, 64), (16, 16), 0.5, 49),  # 7 x 7
    ((1, 64, 64), (16, 16), 1.0, 16),  # no overlap: 4 x 4
    ((40, 200, 200), (32, 96, 96), 0.5, 2 * 4 * 4),  # z: 2, y and x: 4 each
])
def test_image_tiles_match_the_sliding_window(shape: tuple[int, ...], patch: tuple[int, ...], step: float,
                                              expected: int) -> None:
    from automedseg.inference import tile_starts

    assert image_tiles(shape, patch, step=step) == expected
    padded = [max(s, p) for s, p in zip(shape[-len(patch):], patch)]
    assert expected == math.prod(len(tile_starts(s, p, step)) for s, p in zip(padded, patch))


@pytest.mark.parametrize(("patch", "per_case", "z"), [
    ((8, 12, 12), 1, [None]),  # 3D: the volume
    ((12, 12), 12, list(range(12))),  # 2D: every z-slice of the (12, 20, 20) cases
])
def test_whole_images_are_volumes_in_3d_and_slices_in_2d(window_cache: Any, configuration_plan: Any,
                                                         patch: tuple[int, ...], per_case: int, z: list) -> None:
    images = whole_images(window_cache.folder, window_cache.case_ids, configuration_plan(patch))
    assert len(images) == per_case * len(window_cache.case_ids)
    assert [i.z for i in images if i.case_id == window_cache.case_ids[1]] == z
    assert {i.tiles for i in images} == {image_tiles(window_cache.shape, patch)}


# --- the rotation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tiles", "per_epoch"), [
    ([1] * 10, 3),  # small images: several an epoch
    ([5, 1, 1, 8, 2, 3, 1], 4),  # mixed, some larger than an epoch's tiles
    ([20, 20, 20], 3),  # every image larger than an epoch's tiles: scored every few epochs
    ([4] * 25, 50),  # 2D-like: many cheap images, several rounds' worth a epoch
])
def test_rotation_covers_every_image_once_a_round_at_the_epoch_cost(tiles: list[int], per_epoch: int) -> None:
    images = _images(tiles)
    rotation = ImageRotation(images, tiles_per_epoch=per_epoch, seed=11)
    total = sum(tiles)
    epochs = 3 * math.ceil(total / per_epoch) + 2
    scored = [rotation.for_epoch(e) for e in range(epochs)]
    assert scored[0], "the first epoch always scores an image"
    if total <= per_epoch:  # everything fits: every epoch scores each image once
        assert all(s == images for s in scored)
        return
    covered = {i.case_id for s in scored[:math.ceil(total / per_epoch)] for i in s}
    assert covered == {i.case_id for i in images}  # one round's worth of epochs sees every image
    counts = {i.case_id: 0 for i in images}
    for s in scored:
        for i in s:
            counts[i.case_id] += 1
    rounds = epochs * per_epoch // total
    assert set(counts.values()) <= {rounds, rounds + 1}  # once a round, none twice
    cost = [sum(i.tiles for i in s) for s in scored]
    assert max(cost) <= per_epoch + max(tiles) - 1
    assert abs(sum(cost) - epochs * per_epoch) <= max(tiles)  # about the budget on average
    again = ImageRotation(images, tiles_per_epoch=per_epoch, seed=11)
    assert [again.for_epoch(e) for e in range(epochs)] == scored  # a pure function of the epoch
    assert [again.for_epoch(e) for e in reversed(range(epochs))] == scored[::-1]  # (resumed runs agree)


def test_rotation_order_depends_on_the_seed() -> None:
    images = _images([1] * 30)
    a = [i.case_id for e in range(10) for i in ImageRotation(images, tiles_per_epoch=3, seed=0).for_epoch(e)]
    b = [i.case_id for e in range(10) for i in ImageRotation(images, tiles_per_epoch=3, seed=1).for_epoch(e)]
    assert sorted(a) == sorted(b) and a != b


def test_rotation_refuses_an_empty_budget() -> None:
    with pytest.raises(ValueError, match="tiles_per_epoch"):
        ImageRotation(_images([1]), tiles_per_epoch=0, seed=0)


# --- scoring -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pred", "ref", "classes", "expected"), [
    ([0, 1, 1, 2], [0, 1, 0, 1], 3, [[1, 0], [1, 1], [1, 0]]),
    ([1, 1, 0, 0], [1, 1, 0, 0], 2, [[2], [0], [0]]),
    ([1, 1, 1, 1], [0, 0, 0, 0], 2, [[0], [4], [0]]),  # false positives only
    ([0, 1, 1, 0], [-1, 1, -1, 1], 2, [[1], [0], [1]]),  # reference outside 0..K-1: not counted
])
def test_confusion_counts(pred: list[int], ref: list[int], classes: int, expected: list[list[int]]) -> None:
    assert confusion_counts(np.array(pred), np.array(ref, dtype=np.int8), classes).tolist() == expected


@pytest.mark.parametrize("patch", [(4, 12, 12), (12, 12)])
def test_whole_images_see_the_false_positives_patches_miss(decoy_cache: Any, configuration_plan: Any,
                                                           patch: tuple[int, ...]) -> None:
    """Patches centred on the foreground score a perfect 1.0; the whole images also hold the decoy, and their
    pseudo-Dice is exactly 2 TP / (2 TP + FP)."""
    config = configuration_plan(patch, oversample=1.0)
    model = Threshold()
    strides = [(1,) * len(patch)]
    with make_validation_loader(decoy_cache.folder, decoy_cache.case_ids, config, deep_supervision_strides=strides,
                                seed=0) as loader:
        _, patch_dice = pseudo_dice(model, loader, 4, torch.device("cpu"), torch.contiguous_format, False, 2, Dist())
    assert patch_dice == [1.0]
    images = whole_images(decoy_cache.folder, decoy_cache.case_ids, config)
    got = score_images(model, decoy_cache.folder, images, config, num_classes=2, device=torch.device("cpu"),
                       amp=False)
    tp, fp = decoy_cache.foreground_voxels, decoy_cache.decoy_voxels
    assert got.dice == pytest.approx((2 * tp / (2 * tp + fp),))
    assert got.mean == pytest.approx(2 * tp / (2 * tp + fp)) and got.mean < 0.5
    assert got.images == len(images) and got.seconds > 0
    assert model.deep_supervision is True and not model.training


def test_batched_single_tiles_are_the_sliding_window(configuration_plan: Any) -> None:
    """2D images that fit in one patch, batched: the logits of the sliding window, one image at a time."""
    from automedseg.inference import predict_preprocessed
    from automedseg.network import build_network

    config = configuration_plan((16, 20))
    torch.manual_seed(0)
    model = build_network(config.network, in_channels=2, num_classes=3, dims=2).eval()
    model.deep_supervision = False
    rng = np.random.default_rng(0)
    slices = [rng.normal(size=(2, *shape)).astype(np.float32) for shape in [(16, 20), (9, 20), (16, 7), (5, 3)]]
    with torch.inference_mode():
        got = predict_single_tiles(model, slices, config.patch_size, device=torch.device("cpu"), amp=False)
    for a, lg in zip(slices, got):
        want = predict_preprocessed(model, a[:, None], config, device=torch.device("cpu"), num_classes=3,
                                    amp=False)[:, 0]
        assert lg.shape == want.shape == (3, *a.shape[1:])
        np.testing.assert_allclose(lg, want, atol=1e-5)


@pytest.mark.parametrize(("patch", "fits"), [((48, 48), True), ((12, 12), False), ((4, 12, 12), False)])
def test_single_tile_images_are_batched(decoy_cache: Any, configuration_plan: Any, monkeypatch: pytest.MonkeyPatch,
                                        patch: tuple[int, ...], fits: bool) -> None:
    """Whole 2D images that fit in a patch take one forward pass a batch; the rest take the sliding window."""
    import automedseg.full_image_dice as full_image_dice

    config = configuration_plan(patch, batch_size=5)
    model = Threshold()
    calls: list[int] = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (calls.append(len(x)), real_forward(x))[1])
    windows: list[str] = []
    real_window = full_image_dice.predict_preprocessed
    monkeypatch.setattr(full_image_dice, "predict_preprocessed",
                        lambda *a, **k: (windows.append("call"), real_window(*a, **k))[1])
    images = whole_images(decoy_cache.folder, decoy_cache.case_ids, config)
    got = score_images(model, decoy_cache.folder, images, config, num_classes=2, device=torch.device("cpu"),
                       amp=False)
    assert got.mean == pytest.approx(2 * 72 / (2 * 72 + 200))
    if fits:
        assert calls == [5, 5, 2] and not windows  # 12 slices, 5 a batch
    else:
        assert len(windows) == len(images)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_images_and_their_counts_add_up(decoy_cache: Any, configuration_plan: Any,
                                                        world: int) -> None:
    config = configuration_plan((12, 12))
    model = Threshold()
    images = whole_images(decoy_cache.folder, decoy_cache.case_ids, config)
    kw = dict(num_classes=2, device=torch.device("cpu"), amp=False)
    single = RecordingDist()
    whole = score_images(model, decoy_cache.folder, images, config, dist=single, **kw)
    ranks = [RecordingDist(rank=r, world=world) for r in range(world)]
    for d in ranks:
        assert score_images(model, decoy_cache.folder, images, config, dist=d, **kw).images == len(images)
    assert np.array_equal(sum(d.summed for d in ranks), single.summed)
    assert all(d.summed.any() for d in ranks)  # every rank scored a share
    assert whole.mean == pytest.approx(2 * 72 / (2 * 72 + 200))


@pytest.mark.parametrize(("dice", "images", "mean", "text"), [
    ((0.5, 0.7), 3, 0.6, "0.500 0.700 on 3 images"),
    ((0.5, math.nan), 1, 0.5, "0.500 nan on 1 image"),  # a class neither there nor predicted: left out
    ((math.nan,), 2, None, "nan on 2 images"),
    ((), 0, None, "- (no whole image this epoch)"),
])
def test_image_dice_mean_and_description(dice: tuple[float, ...], images: int, mean: float | None,
                                         text: str) -> None:
    got = ImageDice(dice, images, 0.1)
    assert got.mean == (None if mean is None else pytest.approx(mean))
    assert got.describe() == text


def test_nothing_to_score_costs_nothing(decoy_cache: Any, configuration_plan: Any) -> None:
    got = score_images(Threshold(), decoy_cache.folder, [], configuration_plan((12, 12)), num_classes=2,
                       device=torch.device("cpu"))
    assert got == ImageDice((), 0, 0.0) and got.mean is None
