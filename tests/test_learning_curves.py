"""automedseg.learning_curves: saturating fits recover the asymptote, survive noise, flat and short curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from automedseg.learning_curves import MIN_POINTS, CurveFit, extrapolate_final_score, fit_learning_curve

T = np.arange(1, 21, dtype=float)


@pytest.mark.parametrize(("curve", "asymptote"), [
    (0.85 - 0.6 * np.exp(-T / 4), 0.85),
    (0.9 - 0.5 * T ** -0.7, 0.9),
    (0.6 - 0.55 * np.exp(-T / 2), 0.6),
])
def test_saturating_curves_recover_the_asymptote(curve: np.ndarray, asymptote: float) -> None:
    fit = fit_learning_curve(T, curve)
    assert fit.model in ("exponential", "power") and fit.n_points == len(T)
    assert fit.asymptote == pytest.approx(asymptote, abs=0.01)
    assert extrapolate_final_score(T, curve, final_epoch=1e6) == pytest.approx(asymptote, abs=0.01)


def test_the_prediction_is_the_curve_at_the_final_epoch_not_its_asymptote() -> None:
    curve = 0.9 - 0.5 * T ** -0.7
    assert extrapolate_final_score(T, curve, final_epoch=80) == pytest.approx(0.9 - 0.5 * 80 ** -0.7, abs=0.005)
    assert extrapolate_final_score(T, curve, final_epoch=10) == pytest.approx(curve[9], abs=0.005)


def test_noise_moves_the_extrapolation_little() -> None:
    clean = 0.85 - 0.6 * np.exp(-T / 4)
    errors = []
    for seed in range(10):
        noisy = np.clip(clean + np.random.default_rng(seed).normal(0, 0.02, T.size), 0, 1)
        value = extrapolate_final_score(T, noisy, final_epoch=80)
        assert 0.0 <= value <= 1.0
        errors.append(abs(value - 0.85))
    assert np.mean(errors) < 0.02 and max(errors) < 0.05


def test_a_leading_zero_plateau_is_dropped() -> None:
    rise = np.r_[np.zeros(5), 0.8 - 0.7 * np.exp(-np.arange(15) / 3)]
    assert fit_learning_curve(T, rise).asymptote == pytest.approx(0.8, abs=0.01)
    noisy = np.clip(rise + np.random.default_rng(3).normal(0, 0.01, T.size), 0, 1)
    assert fit_learning_curve(T, noisy).asymptote == pytest.approx(0.8, abs=0.05)


def test_flat_curves_stay_flat() -> None:
    assert extrapolate_final_score(T, np.full(T.size, 0.5), final_epoch=80) == pytest.approx(0.5, abs=1e-3)
    noisy = 0.5 + np.random.default_rng(0).normal(0, 0.02, T.size)
    assert extrapolate_final_score(T, noisy, final_epoch=80) == pytest.approx(0.5, abs=0.03)
    assert extrapolate_final_score(T, np.zeros(T.size), final_epoch=80) == 0.0


def test_a_straight_curve_is_not_extrapolated_to_a_perfect_score() -> None:
    line = 0.02 * T[:10]  # no sign of saturation yet
    value = extrapolate_final_score(T[:10], line, final_epoch=40)
    assert line[-1] <= value < 0.6


def test_short_empty_and_missing_scores() -> None:
    assert extrapolate_final_score([1, 2, 3], [0.2, 0.4, 0.6], final_epoch=50) == pytest.approx(0.4)
    assert MIN_POINTS > 3
    assert fit_learning_curve([1, 2], [0.1, 0.3]).model == "last"
    assert extrapolate_final_score([], [], final_epoch=50) == 0.0
    assert extrapolate_final_score([1, 2], [None, math.nan], final_epoch=50) == 0.0
    with_gaps = [None if i % 3 == 0 else float(v) for i, v in enumerate(0.85 - 0.6 * np.exp(-T / 4))]
    assert extrapolate_final_score(T, with_gaps, final_epoch=1e6) == pytest.approx(0.85, abs=0.01)
    assert extrapolate_final_score([0, -1, 1, 2, 3, 4], [0.9, 0.9, 0.1, 0.2, 0.3, 0.35], final_epoch=5) <= 1.0


def test_the_resource_axis_may_be_seconds() -> None:
    seconds = T * 37.5
    curve = 0.85 - 0.6 * np.exp(-T / 4)
    assert extrapolate_final_score(seconds, curve, final_epoch=80 * 37.5) == pytest.approx(
        extrapolate_final_score(T, curve, final_epoch=80), abs=1e-3)


def test_predictions_are_clipped() -> None:
    fit = CurveFit("power", (1.0, 0.5, 1.0), t_last=10.0)
    assert 0.0 <= fit.predict(0.1) <= 1.0 and fit.predict(1e9) == pytest.approx(1.0)
    assert CurveFit("last", (0.4,)).predict(123.0) == pytest.approx(0.4) and CurveFit("last", (0.4,)).asymptote == 0.4
