"""Learning-curve extrapolation: where a short run's score curve is heading at the full budget.

A pruner that compares trials at a rung compares where their curves *are*. Variants that start fast (a high
learning rate, a shallow network) lead early and saturate early, so a short run can rank them above variants
that win after the full budget. Fitting a saturating curve to the scores so far and reading it at the full
budget's resource gives another score to compare: design (c) of the fidelity study
(``benchmarks/search_fidelity.py``). The search does not use it by default.

Models (:data:`MODELS`), three parameters each, fitted by bounded least squares
(:func:`scipy.optimize.curve_fit`); the one with the smaller residual is kept:

* ``exponential``: ``A - (A - a) * exp(-(t - t0) / c)`` (``t0``: the first point fitted, where it is ``a``);
* ``power``: ``A - b * (t / t_last) ** -c`` (inverse power law; ``t_last``: the last point fitted).

Both tend to the asymptote ``A``.

Scores are Dice-like (in [0, 1]): the asymptote lies in [0, 1] and a prediction is clipped to [0, 1]. The time
constant of the exponential is at most :data:`MAX_TIME_CONSTANT` times the observed span, so a curve that is
still straight (no sign of saturation yet) does not extrapolate to a perfect score. A leading plateau near zero
(epochs before the network finds the foreground: scores up to :data:`PLATEAU_FRACTION` of the best) is dropped:
the fit starts where the last rise begins. With fewer than
:data:`MIN_POINTS` points left, or when no fit converges, the curve is not extrapolated: the mean of its last
:data:`FALLBACK_WINDOW` scores stands for it (model ``last``).

Example:
    >>> import numpy as np
    >>> t = np.arange(1, 21)
    >>> y = 0.85 - 0.6 * np.exp(-t / 4)
    >>> round(extrapolate_final_score(t, y, final_epoch=80), 3)
    0.85
    >>> fit_learning_curve(t, y).model
    'exponential'
    >>> extrapolate_final_score([1, 2], [0.1, 0.3], final_epoch=80)  # too short: the mean of the last scores
    0.2
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MODELS = ("exponential", "power")
MIN_POINTS = 4
FALLBACK_WINDOW = 3
MAX_TIME_CONSTANT = 1.0  # of the observed span: the exponential's time constant is at most this
ZERO_TOL = 1e-3  # scores up to this (or PLATEAU_FRACTION of the best) count as the leading plateau
PLATEAU_FRACTION = 0.1


@dataclass(frozen=True)
class CurveFit:
    """A fitted learning curve.

    Attributes:
        model: ``exponential``, ``power`` or ``last`` (not extrapolated: the mean of the last scores).
        params: The model's parameters: ``(a, A, c)`` (exponential), ``(A, b, c)`` (power), ``(value,)`` (last).
        t0: The first resource value fitted (the exponential's origin).
        t_last: The last resource value fitted (the power law's scale).
        sse: Sum of squared residuals on the fitted points.
        n_points: Points fitted.
    """

    model: str
    params: tuple[float, ...]
    t0: float = 0.0
    t_last: float = 1.0
    sse: float = 0.0
    n_points: int = 0

    @property
    def asymptote(self) -> float:
        """The score the curve tends to (clipped to [0, 1]).

        Example:
            >>> CurveFit("exponential", (0.2, 0.8, 3.0)).asymptote
            0.8
        """
        return float(np.clip(self.params[1] if self.model == "exponential" else self.params[0], 0.0, 1.0))

    def predict(self, t: float) -> float:
        """The curve's score at resource ``t`` (clipped to [0, 1]).

        Example:
            >>> round(CurveFit("power", (0.9, 0.3, 1.0), t_last=10.0).predict(20.0), 3)
            0.75
        """
        return float(np.clip(_evaluate(self.model, self.params, float(t), self.t0, self.t_last), 0.0, 1.0))


def _evaluate(model: str, params: Sequence[float], t: float | np.ndarray, t0: float, t_last: float
              ) -> float | np.ndarray:
    if model == "exponential":
        a, top, c = params
        return top - (top - a) * np.exp(-(np.asarray(t, dtype=float) - t0) / c)
    if model == "power":
        a, b, c = params
        return a - b * (np.asarray(t, dtype=float) / t_last) ** (-c)
    return np.full_like(np.asarray(t, dtype=float), params[0])


def _points(epochs: Sequence[float], scores: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The finite ``(t, score)`` pairs with ``t > 0``, sorted by ``t``."""
    pairs = sorted((float(t), float(s)) for t, s in zip(epochs, scores)
                   if s is not None and math.isfinite(float(s)) and math.isfinite(float(t)) and float(t) > 0)
    if not pairs:
        return np.zeros(0), np.zeros(0)
    t, y = (np.asarray(v, dtype=float) for v in zip(*pairs))
    return t, y


def _last(y: np.ndarray, t0: float = 0.0, t_last: float = 1.0) -> CurveFit:
    value = float(np.mean(y[-FALLBACK_WINDOW:])) if y.size else 0.0
    return CurveFit("last", (value,), t0, t_last, 0.0, int(y.size))


def fit_learning_curve(epochs: Sequence[float], scores: Sequence[float | None]) -> CurveFit:
    """Fit a saturating curve to ``scores`` over ``epochs``.

    Args:
        epochs: The resource axis: epochs, or any increasing measure of training (iterations, seconds); only
            values above 0 are used.
        scores: The score after each (Dice-like, in [0, 1]); ``None`` and non-finite entries are skipped.

    Returns:
        The best-fitting model (smallest residual), or ``last`` when the curve is too short or no fit converges.

    Example:
        >>> fit = fit_learning_curve(range(1, 16), [0.7] * 15)  # flat: the asymptote is the level
        >>> round(fit.asymptote, 3)
        0.7
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    t, y = _points(epochs, scores)
    if y.size == 0:
        return _last(y)
    top = float(np.max(y))
    if top <= ZERO_TOL:
        return _last(y, float(t[0]), float(t[-1]))
    # the last rise: back from the first point at half the best score while above the plateau level
    start = int(np.flatnonzero(y >= 0.5 * top)[0])
    while start > 0 and y[start - 1] > max(ZERO_TOL, PLATEAU_FRACTION * top):
        start -= 1
    t, y = t[start:], y[start:]
    t0, t_last = float(t[0]), float(t[-1])
    span = t_last - t0
    if y.size < MIN_POINTS or span <= 0:
        return _last(y, t0, t_last)
    starts = {
        "exponential": ((float(y[0]), min(1.0, top + 0.05), span / 3.0),
                        ([0.0, 0.0, span / 100.0], [1.0, 1.0, MAX_TIME_CONSTANT * span])),
        "power": ((min(1.0, top + 0.05), max(min(1.0, top + 0.05) - float(y[-1]), 1e-3), 0.5),
                  ([0.0, 0.0, 0.05], [1.0, 2.0, 3.0])),
    }
    fits = []
    for model, (p0, bounds) in starts.items():
        p0 = tuple(float(np.clip(v, lo, hi)) for v, lo, hi in zip(p0, *bounds))

        def f(x: np.ndarray, a: float, b: float, c: float, model: str = model) -> np.ndarray:
            return np.asarray(_evaluate(model, (a, b, c), x, t0, t_last), dtype=float)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                params, _ = curve_fit(f, t, y, p0=p0, bounds=bounds, maxfev=5000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((f(t, *params) - y) ** 2))
        if math.isfinite(sse) and all(math.isfinite(float(p)) for p in params):
            fits.append(CurveFit(model, tuple(float(p) for p in params), t0, t_last, sse, int(y.size)))
    if not fits:
        return _last(y, t0, t_last)
    return min(fits, key=lambda c: c.sse)


def extrapolate_final_score(epochs: Sequence[float], scores: Sequence[float | None], *, final_epoch: float
                            ) -> float:
    """The score a run's curve reaches at ``final_epoch``, extrapolated from its scores so far.

    Args:
        epochs: The resource axis of ``scores`` (epochs, iterations or seconds; values above 0).
        scores: The score after each (Dice-like, in [0, 1]; ``None``: not scored).
        final_epoch: The full budget on the same axis.

    Returns:
        The fitted curve at ``final_epoch`` (:func:`fit_learning_curve`), in [0, 1]; the mean of the last
        scores when the curve is too short to fit; 0.0 without any score.

    Example:
        >>> extrapolate_final_score([1, 2, 3, 4, 5, 6], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], final_epoch=40)
        0.0
        >>> extrapolate_final_score([], [], final_epoch=40)
        0.0
    """
    return fit_learning_curve(epochs, scores).predict(float(final_epoch))
