"""Tests of automedseg.class_sampling: difficulty weights, shared with the loader's worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from automedseg.augmentation import PatchSampler, make_training_loader
from automedseg.class_sampling import (
    MIN_CLASS_WEIGHT,
    SharedClassWeights,
    class_weights_for,
    difficulty_weights,
    foreground_weights,
    update_class_weights,
)
from automedseg.plans import AugmentationPlan, ConfigurationPlan, NetworkPlan, PlanError, TrainingPlan

SHAPE = (8, 40, 40)
# one 4x4x4 cube per class, far enough apart that a 4x8x8 patch centred on one holds no other
CUBES = {1: (slice(2, 6), slice(2, 6), slice(2, 6)), 2: (slice(2, 6), slice(2, 6), slice(30, 34)),
         3: (slice(2, 6), slice(30, 34), slice(18, 22))}


@pytest.fixture(scope="module")
def three_class_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("preprocessed")
    for case in ("a", "b"):
        seg = np.zeros((1, *SHAPE), np.int8)
        for k, cube in CUBES.items():
            seg[(0, *cube)] = k
        np.save(folder / f"{case}.npy", np.ones((1, *SHAPE), np.float32))
        np.save(folder / f"{case}_seg.npy", seg)
        np.savez(folder / f"{case}_locs.npz", **{f"class_{k}": np.argwhere(seg[0] == k) for k in CUBES})
    return folder


def _config(*, num_workers: int) -> ConfigurationPlan:
    return ConfigurationPlan(
        name="3d", data_identifier="x", dims=3, spacing_mm=(1.0, 1.0, 1.0), patch_size=(4, 8, 8), batch_size=4,
        median_shape=SHAPE, normalization=(), image_order=3, label_order=1, separate_z=False,
        out_of_plane_order=0,
        network=NetworkPlan(architecture="plain_unet", features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2,
                            strides=((1, 1, 1), (2, 2, 2)), n_conv_per_stage_encoder=(1, 1),
                            n_conv_per_stage_decoder=(1,)),
        augmentation=AugmentationPlan(),
        training=TrainingPlan(epochs=1, iterations_per_epoch=1, oversample_foreground=1.0, num_workers=num_workers,
                              class_sampling="difficulty"),
    )


def _centre_classes(batch: dict) -> list[int]:
    return [int(s[0, 2, 4, 4]) for s in batch["seg"]]


@pytest.mark.parametrize(
    ("dice", "expected"),
    [
        ([0.0, 0.5, 1.0], [1.0, 0.5, MIN_CLASS_WEIGHT]),
        ([np.nan, 0.95], [1.0, MIN_CLASS_WEIGHT]),
        ([-0.1, 1.2], [1.0, MIN_CLASS_WEIGHT]),  # clipped to [0, 1]
    ],
)
def test_difficulty_weights(dice: list[float], expected: list[float]) -> None:
    np.testing.assert_allclose(difficulty_weights(np.array(dice)), expected)


@pytest.mark.parametrize("bad", [[1.0, 0.0, 1.0], [1.0, np.nan, 1.0], [1.0, 1.0]])
def test_shared_weights_refuse_bad_values(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="positive finite"):
        SharedClassWeights(3).set(bad)


def test_pick_follows_the_weights() -> None:
    weights = SharedClassWeights(4)
    assert [weights.pick([1, 2, 3], u) for u in (0.0, 0.34, 0.99)] == [1, 2, 3]  # uniform at first
    weights.set([1.0, 0.1, 0.1, 0.8])  # class 3 has 0.8 of the 1.0 foreground weight
    assert weights.pick([1, 2, 3], 0.19) == 2 and weights.pick([1, 2, 3], 0.21) == 3
    assert weights.pick([1, 2], 0.6) == 2  # normalised among the classes offered


@pytest.mark.parametrize(
    ("weights", "expected_shares"),
    [
        (None, [1 / 3, 1 / 3, 1 / 3]),
        ([1.0, 0.1, 0.1, 1.0], [1 / 12, 1 / 12, 10 / 12]),
    ],
)
def test_sampler_draws_classes_in_proportion_to_the_weights(
    three_class_cache: Path, weights: list[float] | None, expected_shares: list[float]
) -> None:
    shared = None
    if weights is not None:
        shared = SharedClassWeights(4)
        shared.set(weights)
    sampler = PatchSampler(three_class_cache, ["a", "b"], patch_size=(4, 8, 8), batch_size=4,
                           oversample_foreground=1.0, seed=1, class_weights=shared)
    draws = [sampler.draw_class_first()[1] for _ in range(3000)]
    shares = [np.mean([d == k for d in draws]) for k in (1, 2, 3)]
    np.testing.assert_allclose(shares, expected_shares, atol=0.03)


def test_worker_processes_see_weights_set_after_they_started(three_class_cache: Path) -> None:
    weights = class_weights_for("difficulty", 4)
    assert weights is not None
    with make_training_loader(three_class_cache, ["a", "b"], _config(num_workers=1), class_weights=weights,
                              augment=False, num_cached_per_worker=1) as loader:
        before = [c for _ in range(20) for c in _centre_classes(next(loader))]
        assert {1, 2, 3} <= set(before)
        weights.set([1.0, MIN_CLASS_WEIGHT, MIN_CLASS_WEIGHT, 1.0])  # classes 1 and 2 learned, 3 not
        for _ in range(4):  # batches the worker queued before the update
            next(loader)
        after = [c for _ in range(40) for c in _centre_classes(next(loader))]
    assert np.mean([c == 3 for c in before]) < 0.5
    assert np.mean([c == 3 for c in after]) > 0.7  # 1 / 1.2 expected


def test_update_from_the_training_dice_and_resume() -> None:
    weights = class_weights_for("difficulty", 4)
    assert weights is not None
    dice, logged = update_class_weights(weights, np.array([0.0, 0.8, np.nan]))
    assert dice == [0.0, 0.8, None]
    np.testing.assert_allclose(logged, [1.0, 1.0, 0.2, 1.0])
    resumed = class_weights_for("difficulty", 4, [{"class_weights": logged}])
    assert resumed is not None
    np.testing.assert_allclose(resumed.get(), logged)
    assert class_weights_for("uniform", 4) is None
    assert update_class_weights(None, np.array([0.5])) == ([0.5], [])
    np.testing.assert_allclose(foreground_weights(np.array([1.0])), [1.0, MIN_CLASS_WEIGHT])


def test_plan_field_is_checked() -> None:
    with pytest.raises(PlanError, match="class_sampling"):
        TrainingPlan(epochs=1, iterations_per_epoch=1, class_sampling="rare-first")
    assert TrainingPlan(epochs=1, iterations_per_epoch=1).class_sampling == "uniform"  # older plans
