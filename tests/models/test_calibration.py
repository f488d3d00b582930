"""Threshold calibration (order-statistic bound), normalised score and sensitivity."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.calibration import (
    Calibration,
    CalibrationError,
    calibrate_threshold,
    denormalize_score,
    effective_threshold,
    min_good_images,
    normalize_score,
)

# ------------------------------------------------------------------ the minimum n


@pytest.mark.parametrize(("alpha", "n"), [(0.01, 99), (0.05, 19), (0.1, 9), (0.03, 33), (0.3, 3), (0.5, 1)])
def test_min_good_images_marginal(alpha: float, n: int) -> None:
    assert min_good_images(alpha) == n
    calibrate_threshold(np.linspace(0, 0.5, n), alpha)  # enough
    with pytest.raises(CalibrationError):
        calibrate_threshold(np.linspace(0, 0.5, n - 1), alpha)  # one too few


def test_min_good_images_pac() -> None:
    # (1 - 0.01) ** n <= 0.1  ->  n >= ln 0.1 / ln 0.99 = 229.1
    assert min_good_images(0.01, confidence=0.9) == 230
    assert 0.99**230 <= 0.1 < 0.99**229


def test_pac_at_low_confidence_needs_the_marginal_minimum_too() -> None:
    # 0.999 ** 693 <= 0.5, but 693 images cannot promise 0.1 % even on average (k would be n + 1)
    assert min_good_images(0.001, confidence=0.5) == 999 == min_good_images(0.001)
    with pytest.raises(CalibrationError) as info:
        calibrate_threshold(np.linspace(0.0, 0.9, 693), 0.001, confidence=0.5)
    assert info.value.reason == "too_few_images" and info.value.n_required == 999
    cal = calibrate_threshold(np.linspace(0.0, 0.9, 999), 0.001, confidence=0.5)
    assert cal.rank == 999 and cal.bound == "pac" and cal.guaranteed_false_reject_rate <= 0.001


@pytest.mark.timeout(20)
@pytest.mark.parametrize("alpha", [1e-10, 1e-17, 1e-300, 5e-324])
def test_tiny_targets_are_refused_at_once(alpha: float) -> None:
    # 1 - alpha rounds to 1.0 below ~1.1e-16: the PAC minimum must not loop on (1 - alpha) ** n
    n_pac = min_good_images(alpha, confidence=0.9)
    assert Fraction(n_pac) * Fraction(alpha) >= Fraction(-math.log(0.1) * (1 - 1e-9))  # n >= ln 10 / alpha
    assert min_good_images(alpha) > 10**9
    for confidence in (None, 0.9):
        with pytest.raises(CalibrationError) as info:
            calibrate_threshold([0.1] * 300, alpha, confidence=confidence)
        assert info.value.reason == "too_few_images" and info.value.n_required > 10**9


def test_too_few_images_is_a_clear_error() -> None:
    with pytest.raises(CalibrationError) as info:
        calibrate_threshold([0.1] * 32, 0.01)
    err = info.value
    assert err.reason == "too_few_images"
    assert (err.n, err.n_required) == (32, 99)
    assert "at least 99" in str(err)
    assert err.as_dict()["n_required"] == 99


def test_bad_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="target"):
        calibrate_threshold([0.1] * 10, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        calibrate_threshold([0.1] * 10, 0.1, confidence=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibrate_threshold([0.1] * 9 + [1.5], 0.1)


# ------------------------------------------------------------------ hand-made cases


def test_threshold_sits_just_above_the_kth_smallest_score() -> None:
    scores = np.arange(1, 100) / 100.0  # 0.01 .. 0.99, n = 99
    cal = calibrate_threshold(scores, 0.01)
    assert isinstance(cal, Calibration)
    # m = floor(0.01 * 100) = 1, k = 99: just above the largest good score
    assert cal.rank == 99 and cal.order_statistic == 0.99
    assert cal.threshold == np.nextafter(0.99, 1.0)
    assert cal.calibration_false_reject_rate == 0.0
    assert cal.guaranteed_false_reject_rate == pytest.approx(0.01)
    # n = 199, alpha 0.05: m = 10, k = 190 -> 9 good images of 199 above
    cal = calibrate_threshold(np.arange(1, 200) / 200.0, 0.05)
    assert (cal.rank, cal.order_statistic) == (190, 0.95)
    assert cal.calibration_false_reject_rate == pytest.approx(9 / 199)
    assert cal.as_dict()["bound"] == "marginal"


def test_ties_do_not_break_the_promise() -> None:
    # 60 good images, 50 of them at exactly 0.3: a threshold AT 0.3 would reject 5/6
    scores = np.array([0.3] * 50 + list(np.linspace(0.01, 0.2, 10)))
    cal = calibrate_threshold(scores, 0.1)
    assert cal.order_statistic == 0.3
    assert cal.threshold > 0.3
    score = 0.3  # a fresh good image tied with the 50: the service's rule is score >= threshold
    assert (score >= cal.threshold) is False


def test_saturated_scores_are_refused() -> None:
    with pytest.raises(CalibrationError) as info:
        calibrate_threshold([1.0] * 30 + [0.2] * 20, 0.1)
    assert info.value.reason == "saturated"


# ------------------------------------------------------------------ coverage over many draws


def _exact_frr_uniform(threshold: float) -> float:
    return 1.0 - min(threshold, 1.0)  # P(U >= t) for U ~ Uniform(0, 1)


def _exact_frr_discrete(threshold: float, values: np.ndarray, probs: np.ndarray) -> float:
    return float(probs[values >= threshold].sum())


def test_false_reject_rate_on_fresh_good_images_stays_within_the_bound() -> None:
    # Given n = 49 good scores and alpha = 0.1 (m = 5, promise 5/50 = 0.1), over 3000 seeded
    # draws the false-reject rate of fresh good images (computed exactly from the known score
    # distribution) averages at most alpha -- for a continuous law AND one with heavy ties.
    rng = np.random.default_rng(12)
    n, alpha, draws = 49, 0.1, 3000
    values = np.array([0.1, 0.2, 0.3, 0.35, 0.6])
    probs = np.array([0.3, 0.3, 0.25, 0.1, 0.05])
    uniform, discrete = [], []
    for _ in range(draws):
        uniform.append(_exact_frr_uniform(calibrate_threshold(rng.random(n), alpha).threshold))
        s = rng.choice(values, size=n, p=probs)
        discrete.append(_exact_frr_discrete(calibrate_threshold(s, alpha).threshold, values, probs))
    u, d = np.array(uniform), np.array(discrete)
    # continuous law: the bound is exact (Beta(45, 5) coverage, mean 0.1, sd 0.042)
    se = u.std() / math.sqrt(draws)
    assert abs(u.mean() - 0.1) < 4 * se
    # ties: never above the bound (in fact well below it here)
    assert d.mean() <= alpha + 4 * d.std() / math.sqrt(draws)
    # the naive threshold AT the order statistic would break the promise on tied scores
    naive = [
        _exact_frr_discrete(np.sort(rng.choice(values, size=n, p=probs))[n - 5], values, probs)
        for _ in range(300)
    ]
    assert np.mean(naive) > alpha + 0.05


def test_pac_variant_holds_for_the_stated_share_of_calibrations() -> None:
    # Given confidence 0.9: in at most ~10 % of calibrations the threshold's own rate exceeds alpha.
    rng = np.random.default_rng(7)
    n, alpha, conf, draws = 120, 0.05, 0.9, 2000
    exceed = 0
    for _ in range(draws):
        cal = calibrate_threshold(rng.random(n), alpha, confidence=conf)
        assert cal.bound == "pac"
        exceed += _exact_frr_uniform(cal.threshold) > alpha
    rate = exceed / draws
    assert rate <= (1 - conf) + 3 * math.sqrt(0.1 * 0.9 / draws)
    # the plain marginal threshold exceeds alpha far more often: the PAC rank is not a no-op
    marginal = sum(
        _exact_frr_uniform(calibrate_threshold(rng.random(n), alpha).threshold) > alpha for _ in range(500)
    )
    assert marginal / 500 > 0.3


# ------------------------------------------------------------------ normalised score and sensitivity


def test_normalize_score_hand_values() -> None:
    assert normalize_score(0.2, 0.2) == 0.5
    assert normalize_score(0.0, 0.2) == 0.0
    assert normalize_score(1.0, 0.2) == 1.0
    assert normalize_score(0.1, 0.2) == pytest.approx(0.25)
    assert normalize_score(0.6, 0.2) == pytest.approx(0.75)
    assert normalize_score(1.0, 1.0) == 0.5
    assert normalize_score(0.0, 0.0) == 0.5
    out = normalize_score(np.array([[0.0, 0.2], [0.6, 1.0]]), 0.2)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.75, 1.0]])
    with pytest.raises(ValueError, match="threshold"):
        normalize_score(0.3, 1.5)


@settings(max_examples=300, deadline=None)
@given(
    s=st.floats(0.0, 1.0),
    t=st.floats(0.0, 1.0),
)
def test_normalised_decision_equals_raw_decision(s: float, t: float) -> None:
    u = normalize_score(s, t)
    assert 0.0 <= u <= 1.0
    assert (u >= 0.5) == (s >= t)


@settings(max_examples=200, deadline=None)
@given(a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0), t=st.floats(0.0, 1.0))
def test_normalize_is_monotone(a: float, b: float, t: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert normalize_score(lo, t) <= normalize_score(hi, t)


@settings(max_examples=200, deadline=None)
@given(u=st.floats(0.0, 1.0), t=st.floats(0.001, 0.999))
def test_denormalize_inverts_normalize(u: float, t: float) -> None:
    assert normalize_score(denormalize_score(u, t), t) == pytest.approx(u, abs=1e-9)


def test_sensitivity_moves_the_threshold() -> None:
    t = 0.3
    assert effective_threshold(t) == t
    assert effective_threshold(t, 0.5) == t
    assert effective_threshold(t, 1.0) == 0.0  # every part anomalous
    assert effective_threshold(t, 0.0) == 1.0  # only scores of 1.0
    assert effective_threshold(t, 0.75) == pytest.approx(0.15)  # normalised 0.25
    assert effective_threshold(t, 0.25) == pytest.approx(0.65)  # normalised 0.75
    grid = [effective_threshold(t, s) for s in np.linspace(0, 1, 21)]
    assert all(a >= b for a, b in itertools.pairwise(grid))
    with pytest.raises(ValueError, match="sensitivity"):
        effective_threshold(t, 1.2)
