"""Histogram matching (automedseg.intensity_matching) and the plan field that applies it in preprocessing."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from automedseg.intensity_matching import (
    LANDMARK_PERCENTILES,
    landmarks,
    match_image,
    match_to_landmarks,
    piecewise_linear,
)
from automedseg.plans import ChannelNormalization, PlanError, from_jsonable, to_jsonable


def _body(rng: np.random.Generator, shape: tuple[int, ...] = (6, 20, 20)) -> np.ndarray:
    """Positive intensities inside a box, zero around it."""
    image = np.zeros(shape, np.float32)
    image[1:-1, 3:-3, 3:-3] = rng.gamma(3.0, 30.0, image[1:-1, 3:-3, 3:-3].shape) + 1.0
    return image


def test_matching_maps_the_percentiles_onto_the_reference() -> None:
    rng = np.random.default_rng(0)
    reference = landmarks(_body(rng))
    shifted = _body(np.random.default_rng(1))
    shifted[shifted != 0] = 0.02 * shifted[shifted != 0] ** 1.7 + 5.0  # another site: monotone, non-linear
    matched = match_to_landmarks(shifted, reference=reference)
    np.testing.assert_allclose(landmarks(matched), reference, rtol=2e-3)  # percentiles interpolate between voxels
    assert not np.allclose(landmarks(shifted), reference, rtol=0.1)  # there was something to undo


def test_matching_is_monotone_and_leaves_background_untouched() -> None:
    image = _body(np.random.default_rng(2))
    matched = match_to_landmarks(image, reference=[5.0, 6.0, 9.0, 20.0, 21.0, 40.0, 100.0])
    fg = image != 0
    assert np.array_equal(matched[~fg], image[~fg])  # background stays zero
    order = np.argsort(image[fg], kind="stable")
    assert np.all(np.diff(matched[fg][order]) >= 0)  # the map keeps the order of intensities
    assert matched.dtype == np.float32


def test_piecewise_linear_extends_its_end_segments_and_copes_with_ties() -> None:
    x = np.array([-1.0, 0.0, 0.5, 1.0, 3.0])
    assert piecewise_linear(x, source=[0.0, 1.0], target=[10.0, 20.0]).tolist() == [0.0, 10.0, 15.0, 20.0, 40.0]
    # a spike: repeated source landmarks keep their first target, still monotone
    y = piecewise_linear(np.linspace(0, 4, 9), source=[1.0, 1.0, 1.0, 3.0], target=[0.0, 1.0, 2.0, 4.0])
    assert np.all(np.diff(y) >= 0)
    assert piecewise_linear(np.array([2.0]), source=[1.0, 1.0], target=[5.0, 5.0]).tolist() == [6.0]
    with pytest.raises(ValueError, match="non-decreasing"):
        piecewise_linear(x, source=[1.0, 0.0], target=[0.0, 1.0])


def test_match_image_per_channel_and_empty_channels() -> None:
    image = np.stack([_body(np.random.default_rng(3)), np.zeros((6, 20, 20), np.float32)])
    ref = [tuple(float(v) for v in np.linspace(10, 70, len(LANDMARK_PERCENTILES)))] * 2
    out = match_image(image, reference=ref)
    np.testing.assert_allclose(landmarks(out[0]), ref[0], rtol=2e-3)  # percentiles interpolate between voxels
    assert np.array_equal(out[1], image[1])  # nothing nonzero: left as it is
    with pytest.raises(ValueError, match="no foreground"):
        landmarks(image[1])


def test_plan_landmarks_round_trip_and_are_checked() -> None:
    norm = ChannelNormalization("zscore", landmarks=tuple(float(v) for v in range(len(LANDMARK_PERCENTILES))))
    assert from_jsonable(ChannelNormalization, to_jsonable(norm), "n") == norm
    assert "landmarks" not in to_jsonable(ChannelNormalization("zscore"))  # old plans.json stay as they were
    with pytest.raises(PlanError, match="landmarks"):
        ChannelNormalization("zscore", landmarks=(3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(PlanError, match="landmarks"):
        ChannelNormalization("zscore", landmarks=(1.0, 2.0))


def test_preprocessing_matches_before_normalising_and_keys_the_cache(configuration_plan) -> None:
    from automedseg.preprocessing import normalize, preprocessing_key

    image = _body(np.random.default_rng(4))[None]
    ref = tuple(float(v) for v in np.linspace(50, 250, len(LANDMARK_PERCENTILES)))
    plain = normalize(image, [ChannelNormalization("none")])
    matched = normalize(image, [ChannelNormalization("none", landmarks=ref)])
    assert np.array_equal(plain, image)
    np.testing.assert_allclose(landmarks(matched[0]), ref, rtol=2e-3)  # percentiles interpolate between voxels
    config = configuration_plan((8, 16, 16))
    with_norm = dataclasses.replace(config, normalization=(ChannelNormalization("zscore"),))
    with_marks = dataclasses.replace(config, normalization=(ChannelNormalization("zscore", landmarks=ref),))
    from automedseg.plans import Plans

    class _P:  # what preprocessing_key reads of the plan
        transpose_forward = (0, 1, 2)
        labels = {"background": 0, "a": 1}
        label_values = (0, 1)
        num_classes = 2

    plans: Plans = _P()  # type: ignore[assignment]
    key = preprocessing_key(plans, with_norm)
    assert key != preprocessing_key(plans, with_marks)
    # Without landmarks the key is what it was before they existed: existing caches stay valid.
    legacy = {"transpose": (0, 1, 2), "data_identifier": config.data_identifier, "spacing": config.spacing_mm,
              "normalization": [{"scheme": "zscore", "clip_low": None, "clip_high": None, "mean": None, "std": None}],
              "orders": [config.image_order, config.label_order, config.separate_z, config.out_of_plane_order],
              "labels": plans.labels}
    assert key == hashlib.sha256(json.dumps(legacy, sort_keys=True, default=list).encode()).hexdigest()[:16]
