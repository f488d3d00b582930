"""Decision thresholds from good images, normalised scores and sensitivity (pure maths).

Decision rule everywhere: a part is ``anomalous`` when ``score >= threshold``.

Calibration (split-conformal / order-statistic bound)
------------------------------------------------------
Given the scores ``s_1..s_n`` of ``n`` GOOD images, and a fresh good image whose
score ``S`` is exchangeable with them (same line, same camera, same method, model,
weights and prompts; not one of the ``n`` and not used as its own reference), let
``m = floor(alpha * (n + 1))`` and ``k = n + 1 - m`` (i.e. ``k = ceil((n + 1)(1 - alpha))``),
and set the threshold JUST ABOVE the k-th smallest good score ``s_(k)`` (the next
float up). Then ``score >= threshold`` exactly when ``score > s_(k)``, and

    P(S >= threshold) = P(S > s_(k)) <= m / (n + 1) <= alpha

with no assumption on the score distribution; ties are allowed (placing the
threshold strictly above ``s_(k)`` is what keeps the promise when many good images
share a score, e.g. a method that saturates). The probability is over the draw of
the ``n`` calibration images AND the fresh image: on average over calibrations, at
most a fraction ``alpha`` of good parts is rejected. ``m`` of the calibration images
themselves score above the threshold. It needs ``m >= 1``:

    n >= ceil(1 / alpha) - 1        (alpha = 0.01 -> 99 images, 0.05 -> 19, 0.1 -> 9)

:func:`min_good_images` gives it; fewer raises :class:`CalibrationError`.

With ``confidence = 1 - delta`` (the "PAC" variant) the promise is stronger: with
probability at least ``1 - delta`` over the draw of the calibration images, the
false-reject rate of THIS threshold on future good images, ``P(S >= threshold | s_1..s_n)``,
is at most ``alpha``. The rank is the smallest ``k`` with
``P(Binomial(n, 1 - alpha) >= k) <= delta`` (and at least the marginal rank); it needs
``(1 - alpha)^n <= delta``, i.e. ``n >= ln(delta) / ln(1 - alpha)`` (alpha = 0.01,
confidence 0.9 -> 230 images), and at least the marginal minimum.

The order is taken in float64 on the scores as given. ``alpha`` is read as the
decimal the caller wrote (``0.03`` is exactly 3/100), so ``floor`` is exact.

Normalised score and sensitivity
--------------------------------
:func:`normalize_score` maps a score in [0, 1] to [0, 1] so that the threshold lands
on 0.5 (as anomalib's normalisation does), piecewise linearly: ``[0, t] -> [0, 0.5]``
and ``[t, 1] -> [0.5, 1]``. It is monotone and invertible (:func:`denormalize_score`),
so ``normalized_score >= 0.5`` exactly when ``score >= threshold``. (anomalib's
min-max form ``(s - t) / (max - min) + 0.5`` clipped to [0, 1] needs the min and
max of a validation set and saturates; our scores already live in [0, 1].)

``sensitivity`` in [0, 1] (default 0.5) is anomalib's knob: a part is anomalous when
``normalized_score >= 1 - sensitivity``. 0.5 is the calibrated threshold; higher is
more sensitive (more parts rejected), lower is more lenient; 1 rejects every part,
0 only parts scoring 1.0. :func:`effective_threshold` turns it into a raw threshold
(decide on the RAW score against it; ``sensitivity = 0.5`` returns the threshold
exactly). The calibration promise holds for ``sensitivity <= 0.5`` (a higher
threshold rejects fewer good parts) and NOT above 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, overload

import numpy as np

DEFAULT_TARGET_FALSE_REJECT_RATE = 0.01
DEFAULT_SENSITIVITY = 0.5


class CalibrationError(ValueError):
    """Calibration is impossible with these scores (too few, or the scores saturate).

    Attributes:
        reason: ``too_few_images`` or ``saturated``.
        n: number of good scores given.
        n_required: images the target needs (``min_good_images``).
        target_false_reject_rate: the requested ``alpha``.
        confidence: the requested confidence, or ``None`` for the marginal bound.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        n: int,
        n_required: int,
        target_false_reject_rate: float,
        confidence: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.n = n
        self.n_required = n_required
        self.target_false_reject_rate = target_false_reject_rate
        self.confidence = confidence

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "message": str(self),
            "n": self.n,
            "n_required": self.n_required,
            "target_false_reject_rate": self.target_false_reject_rate,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class Calibration:
    """A threshold set from good scores, with what it promises.

    Attributes:
        threshold: decide ``anomalous if score >= threshold``. The next float above
            ``order_statistic``; keep it at full precision (do not round it).
        target_false_reject_rate: the requested ``alpha``.
        n: number of good scores used.
        rank: ``k``: the threshold sits just above the k-th smallest good score.
        order_statistic: that score, ``s_(k)``.
        bound: ``marginal`` (P(fresh good rejected) <= alpha) or ``pac`` (with
            probability >= ``confidence`` over the calibration draw, the rate of this
            threshold is <= alpha).
        confidence: ``1 - delta`` for ``pac``, ``None`` for ``marginal``.
        guaranteed_false_reject_rate: the marginal bound ``(n + 1 - k) / (n + 1)``
            (<= alpha); for ``pac`` the same figure, which the PAC rank only lowers.
        calibration_false_reject_rate: fraction of the n good scores ``>= threshold``.
        n_required: the minimum n for this target (and confidence).
    """

    threshold: float
    target_false_reject_rate: float
    n: int
    rank: int
    order_statistic: float
    bound: str
    confidence: float | None
    guaranteed_false_reject_rate: float
    calibration_false_reject_rate: float
    n_required: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _alpha(target: float) -> Fraction:
    a = float(target)
    if not math.isfinite(a) or not 0.0 < a < 1.0:
        raise ValueError(f"target false-reject rate must be in (0, 1), got {target!r}")
    return Fraction(repr(a))


def _delta(confidence: float | None) -> float | None:
    if confidence is None:
        return None
    c = float(confidence)
    if not math.isfinite(c) or not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return 1.0 - c


def min_good_images(target_false_reject_rate: float, confidence: float | None = None) -> int:
    """The fewest good images that can promise ``target_false_reject_rate``.

    Marginal bound (``confidence=None``): ``ceil(1 / alpha) - 1``. PAC bound: the
    smallest n with ``(1 - alpha) ** n <= 1 - confidence``, and at least the marginal
    minimum (the PAC rank is never below the marginal one, so both promises hold; this
    matters only for confidences below about 63 %). Exact for any target in (0, 1),
    however small (a huge count then, which no request reaches).
    """
    alpha = _alpha(target_false_reject_rate)
    delta = _delta(confidence)
    marginal = math.ceil(1 / alpha) - 1
    if delta is None:
        return marginal
    # (1 - alpha) ** n <= delta in the log domain: 1.0 - alpha rounds (to 1.0 below ~1e-16,
    # where its powers never fall), log1p(-alpha) keeps its precision and is < 0 for alpha > 0
    log_delta, log_keep = math.log(delta), math.log1p(-float(alpha))
    n = max(1, math.ceil(Fraction(log_delta) / Fraction(log_keep)))
    if n < 2**52:  # guard the float division against an off-by-one at the boundary
        while n > 1 and (n - 1) * log_keep <= log_delta:
            n -= 1
        while n * log_keep > log_delta:
            n += 1
    return max(n, marginal)


def _pac_rank(n: int, alpha: float, delta: float) -> int | None:
    """Smallest k in 1..n with P(Binomial(n, 1 - alpha) >= k) <= delta, else ``None``."""
    from scipy.stats import binom

    ks = np.arange(1, n + 1)
    tail = binom.sf(ks - 1, n, 1.0 - alpha)  # P(X >= k)
    ok = np.flatnonzero(tail <= delta)
    return int(ks[ok[0]]) if ok.size else None


def calibrate_threshold(
    good_scores: Sequence[float] | np.ndarray,
    target_false_reject_rate: float = DEFAULT_TARGET_FALSE_REJECT_RATE,
    *,
    confidence: float | None = None,
) -> Calibration:
    """Threshold whose false-reject rate on fresh good images is at most the target.

    Args:
        good_scores: ``(n,)`` scores in [0, 1] of good images NOT used as references
            for themselves (leave-one-out for few-shot methods).
        target_false_reject_rate: ``alpha`` in (0, 1), e.g. 0.01.
        confidence: ``None`` for the marginal (conformal) promise; ``1 - delta`` in
            (0, 1) for the PAC promise (see the module docstring).

    Returns:
        A frozen :class:`Calibration`.

    Raises:
        CalibrationError: fewer than :func:`min_good_images` scores (``too_few_images``),
            or the k-th smallest good score is already 1.0, so no threshold in [0, 1]
            keeps the promise (``saturated``).
        ValueError: scores not finite or outside [0, 1]; bad target or confidence.
    """
    alpha = _alpha(target_false_reject_rate)
    delta = _delta(confidence)
    s = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("good scores must be finite")
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(f"good scores must lie in [0, 1], got [{s.min()}, {s.max()}]")
    n = int(s.size)
    needed = min_good_images(target_false_reject_rate, confidence)

    def refuse(message: str, reason: str) -> CalibrationError:
        return CalibrationError(
            message,
            reason=reason,
            n=n,
            n_required=needed,
            target_false_reject_rate=float(target_false_reject_rate),
            confidence=confidence,
        )

    if n < needed:
        what = (
            f"at confidence {confidence}" if confidence is not None else "(distribution-free conformal bound)"
        )
        raise refuse(
            f"{n} good images cannot promise a false-reject rate of {float(alpha):g} {what}: "
            f"at least {needed} are needed",
            "too_few_images",
        )
    m = math.floor(alpha * (n + 1))
    k = n + 1 - m
    if delta is not None:
        pac = _pac_rank(n, float(alpha), delta)
        if pac is None:  # min_good_images says this cannot happen; keep the promise anyway
            raise refuse(
                f"{n} good images are too few for confidence {confidence}",
                "too_few_images",
            )
        k = max(k, pac)
    order_stat = float(np.sort(s)[k - 1])
    if order_stat >= 1.0:
        raise refuse(
            f"at least {n - k + 1} of {n} good images score 1.0: no threshold in [0, 1] rejects at most "
            f"{float(alpha):g} of good parts with this method",
            "saturated",
        )
    threshold = float(np.nextafter(order_stat, np.inf))
    return Calibration(
        threshold=threshold,
        target_false_reject_rate=float(target_false_reject_rate),
        n=n,
        rank=k,
        order_statistic=order_stat,
        bound="marginal" if delta is None else "pac",
        confidence=confidence,
        guaranteed_false_reject_rate=(n + 1 - k) / (n + 1),
        calibration_false_reject_rate=float(np.mean(s >= threshold)),
        n_required=needed,
    )


# ------------------------------------------------------------------ normalised score, sensitivity
def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return t


def _check_sensitivity(sensitivity: float) -> float:
    sv = float(sensitivity)
    if not math.isfinite(sv) or not 0.0 <= sv <= 1.0:
        raise ValueError(f"sensitivity must be in [0, 1], got {sensitivity!r}")
    return sv


@overload
def normalize_score(score: float, threshold: float) -> float: ...
@overload
def normalize_score(score: np.ndarray, threshold: float) -> np.ndarray: ...
def normalize_score(score: float | np.ndarray, threshold: float) -> float | np.ndarray:
    """Map a score in [0, 1] to [0, 1] with ``threshold -> 0.5``, piecewise linearly.

    ``0.5 * s / t`` below the threshold ``t``, ``0.5 + 0.5 * (s - t) / (1 - t)`` at or
    above it (``0.5`` at ``s = t = 1``); scores are clipped to [0, 1] first.
    Works on floats (returns a float) and arrays (returns float64, same shape).
    ``normalize_score(s, t) >= 0.5`` exactly when ``s >= t``.

    Raises:
        ValueError: ``threshold`` not in [0, 1].
    """
    t = _check_threshold(threshold)
    s = np.clip(np.asarray(score, dtype=np.float64), 0.0, 1.0)
    at_or_above = s >= t
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        below = 0.5 * s / t if t > 0.0 else np.zeros_like(s)
        above = 0.5 + 0.5 * (s - t) / (1.0 - t) if t < 1.0 else np.full_like(s, 0.5)
    # rounding must never move a score across 0.5
    out = np.where(at_or_above, np.maximum(above, 0.5), np.minimum(below, np.nextafter(0.5, 0.0)))
    if np.ndim(score) == 0:
        return float(out)
    return out


def denormalize_score(normalized: float, threshold: float) -> float:
    """Inverse of :func:`normalize_score`: the raw score whose normalised score is ``normalized``."""
    t = _check_threshold(threshold)
    u = float(normalized)
    if not math.isfinite(u) or not 0.0 <= u <= 1.0:
        raise ValueError(f"normalised score must be in [0, 1], got {normalized!r}")
    if u <= 0.5:
        return t * (u / 0.5)
    return t + (u - 0.5) / 0.5 * (1.0 - t)


def effective_threshold(threshold: float, sensitivity: float = DEFAULT_SENSITIVITY) -> float:
    """The raw threshold a request with ``sensitivity`` decides with (``score >= it``).

    ``sensitivity`` in [0, 1]: the normalised threshold is ``1 - sensitivity``, mapped
    back to a raw score with :func:`denormalize_score`. 0.5 returns ``threshold``
    exactly; 1.0 returns 0.0 (every part anomalous); 0.0 returns 1.0 (only scores of
    1.0). It never decreases when the threshold increases, and never increases when
    the sensitivity increases.

    Raises:
        ValueError: ``threshold`` or ``sensitivity`` not in [0, 1].
    """
    t = _check_threshold(threshold)
    sv = _check_sensitivity(sensitivity)
    if sv == DEFAULT_SENSITIVITY:
        return t
    return denormalize_score(1.0 - sv, t)
