"""Evaluation metrics as pure functions: numpy in, Python floats out.

Conventions (the anomalib >= 2.3 ones, so figures compare with published tables):

- Scores and maps: higher means more anomalous. Image scores are ``(N,)`` floats;
  anomaly maps are ``(N, H, W)`` floats (or a sequence of ``(H, W)`` arrays, each the
  shape of its mask). Any range; the service's are in [0, 1].
- Labels: ``(N,)`` 0/1 or bool, 1 = anomalous. Masks: ``(N, H, W)`` (or a sequence of
  ``(H, W)``) bool or 0/1 numbers, 1 = defective pixel. Anything else is a ``ValueError``.
- Decisions are ``anomalous if score >= threshold`` (as the service decides).
- A metric that is undefined for the input (AUROC with one class only, AUPRO without
  any defective or without any normal pixel, a false-reject rate of no image) is
  ``nan``, never an exception: a category with good images only is a normal case.
  (anomalib returns 0.0 for an AUPRO without regions; we say "not defined".)

scikit-learn computes AUROC; scipy labels connected regions. Written here: the
per-region overlap curve (AUPRO), and F1-max in anomalib's float32 arithmetic (so that
the threshold it picks among tied F1 values is anomalib's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

#: 8-connectivity, as OpenCV's ``connectedComponents`` (anomalib's CPU path) and kornia's.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

ArrayOrMaps = np.ndarray | Sequence[np.ndarray]


def _scores_labels(
    scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _binary(np.asarray(labels), "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (no nan or inf)")
    return s, y


def _binary(a: np.ndarray, name: str) -> np.ndarray:
    """A bool array from bool or 0/1 numbers; ``ValueError`` for any other value."""
    if a.dtype == bool:
        return a
    if a.size and not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must be bool or 0/1, got values {np.unique(a)[:5].tolist()}...")
    return a.astype(bool)


def _as_list(a: ArrayOrMaps, name: str) -> list[np.ndarray]:
    """Per-image 2-D arrays from ``(N, H, W)``, ``(N, 1, H, W)``, ``(H, W)`` or a sequence of them."""
    if isinstance(a, np.ndarray):
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim == 3:
            return list(a)
        if a.ndim == 2:
            return [a]
        raise ValueError(f"{name} must be (N, H, W) or (H, W), got shape {a.shape}")
    out = [np.asarray(x) for x in a]
    return [x[0] if x.ndim == 3 and x.shape[0] == 1 else x for x in out]


def _maps_masks(
    maps: ArrayOrMaps, masks: ArrayOrMaps, *, dtype: type[np.floating] = np.float64
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-image ``(H, W)`` maps (``dtype``) and bool masks, shapes checked pairwise."""
    m_list, g_list = _as_list(maps, "maps"), _as_list(masks, "masks")
    if len(m_list) != len(g_list):
        raise ValueError(f"{len(m_list)} maps but {len(g_list)} masks")
    if not m_list:
        raise ValueError("no maps given")
    out_m, out_g = [], []
    for i, (m, g) in enumerate(zip(m_list, g_list, strict=True)):
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(f"map {i} has shape {m.shape}, its mask {g.shape}: need equal (H, W)")
        mf = m.astype(dtype, copy=False)
        if not np.all(np.isfinite(mf)):
            raise ValueError(f"map {i} holds nan or inf")
        out_m.append(mf)
        out_g.append(_binary(g, f"mask {i}"))
    return out_m, out_g


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def image_auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """Area under the ROC curve of image scores against image labels.

    Args:
        scores: ``(N,)`` float image scores, higher = more anomalous.
        labels: ``(N,)`` 0/1 or bool, 1 = anomalous.

    Returns:
        AUROC in [0, 1] (ties count half, as ``sklearn.metrics.roc_auc_score``);
        ``nan`` when only one class is present.
    """
    s, y = _scores_labels(scores, labels)
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, s))


def pixel_auroc(maps: ArrayOrMaps, masks: ArrayOrMaps) -> float:
    """AUROC over every pixel of every image (anomalib's pixel AUROC).

    Args:
        maps: ``(N, H, W)`` float maps, or a sequence of ``(H, W)`` maps.
        masks: the same shapes, bool or 0/1, 1 = defective pixel.

    Returns:
        AUROC in [0, 1]; ``nan`` when no pixel (or every pixel) is defective.
    """
    m_list, g_list = _maps_masks(maps, masks)
    y = np.concatenate([g.reshape(-1) for g in g_list])
    if y.all() or not y.any():
        return math.nan
    s = np.concatenate([m.reshape(-1) for m in m_list])
    return float(roc_auc_score(y, s))


def label_regions(masks: ArrayOrMaps) -> tuple[list[np.ndarray], int]:
    """Connected defect regions (8-connectivity) with labels unique across all images.

    Returns:
        ``(labels, count)``: per image an ``int64 (H, W)`` array, 0 = background and
        ``1..count`` the regions, numbered image after image.
    """
    g_list = [_binary(g, "mask") for g in _as_list(masks, "masks")]
    out: list[np.ndarray] = []
    offset = 0
    for g in g_list:
        lab, n = ndimage.label(g, structure=_EIGHT_CONNECTED)
        lab = lab.astype(np.int64)
        lab[lab > 0] += offset
        offset += int(n)
        out.append(lab)
    return out, offset


def pro_curve(maps: ArrayOrMaps, masks: ArrayOrMaps, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The per-region overlap curve up to ``fpr_limit``, exactly as anomalib's ``AUPRO`` builds it.

    Every connected ground-truth region (8-connected, over all images) weighs the
    same. At each distinct map value ``t`` (pixels ``>= t`` flagged) the curve has
    the point (global false-positive rate over all normal pixels, mean over regions of
    the fraction of the region flagged). The curve starts at (0, 0); it stops at the
    last point with FPR <= ``fpr_limit``, plus a point AT the limit linearly
    interpolated with the next one when that last point lies below the limit.

    Maps are compared in float32, as anomalib does (values equal in float32 are one
    threshold); the running sums are float64.

    Returns:
        ``(fpr, pro)``: float64 1-D arrays, FPR non-decreasing from 0. Empty arrays when
        the curve is undefined (no defective or no normal pixel).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m_list, g_list = _maps_masks(maps, masks, dtype=np.float32)
    lab_list, n_regions = label_regions(g_list)
    labels = np.concatenate([lab.reshape(-1) for lab in lab_list])
    preds = np.concatenate([m.reshape(-1) for m in m_list])
    background = labels == 0
    n_bg = int(background.sum())
    if n_bg == 0 or n_regions == 0:
        return np.zeros(0), np.zeros(0)

    sizes = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    fp_step = background.astype(np.float64)
    pro_step = np.zeros(labels.shape, dtype=np.float64)
    fg = ~background
    pro_step[fg] = 1.0 / sizes[labels[fg]]

    order = np.argsort(preds, kind="stable")[::-1]  # descending scores
    p_sorted = preds[order]
    fpr = np.minimum(np.cumsum(fp_step[order]) / n_bg, 1.0)
    pro = np.minimum(np.cumsum(pro_step[order]) / n_regions, 1.0)
    # one point per distinct value: the last pixel of each run of equal scores
    last_of_run = np.ones(p_sorted.shape, dtype=bool)
    last_of_run[:-1] = p_sorted[:-1] != p_sorted[1:]
    fpr = np.concatenate([[0.0], fpr[last_of_run]])
    pro = np.concatenate([[0.0], pro[last_of_run]])

    i = int(np.flatnonzero(fpr <= fpr_limit)[-1])  # fpr[0] == 0: always found
    if fpr[i] < fpr_limit and i + 1 < fpr.size:
        f1, f2, p1, p2 = fpr[i], fpr[i + 1], pro[i], pro[i + 1]
        p_lim = p1 + (p2 - p1) * (fpr_limit - f1) / (f2 - f1)
        return np.concatenate([fpr[: i + 1], [fpr_limit]]), np.concatenate([pro[: i + 1], [p_lim]])
    return fpr[: i + 1], pro[: i + 1]


def aupro(maps: ArrayOrMaps, masks: ArrayOrMaps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region overlap curve up to ``fpr_limit``, normalised to [0, 1].

    The MVTec-AD convention as anomalib >= 2.3 computes it (see :func:`pro_curve`):
    trapezoidal area of the PRO curve divided by the curve's last FPR (``fpr_limit``
    except when every normal pixel is reached before it).

    Args:
        maps: ``(N, H, W)`` float maps, or a sequence of ``(H, W)`` maps.
        masks: the same shapes, bool or 0/1, 1 = defective pixel. Images without
            defects (all-zero masks) count only through their normal pixels.
        fpr_limit: in (0, 1]; 0.3 is the usual "AUPRO@0.3".

    Returns:
        AUPRO in [0, 1]; ``nan`` when no pixel is defective or none is normal.
    """
    fpr, pro = pro_curve(maps, masks, fpr_limit)
    if fpr.size == 0 or fpr[-1] <= 0.0:
        return math.nan
    return _trapezoid(pro, fpr) / float(fpr[-1])


def f1_max(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> tuple[float, float]:
    """The best F1 over all thresholds, and that threshold, exactly as anomalib's ``F1Max``.

    Every distinct score ``t`` is a threshold (``score >= t`` is anomalous). As anomalib 2.x
    (torchmetrics' exact precision/recall curve) computes it: precision ``TP / (TP + FP)``
    and recall ``TP / P`` are float32 quotients of the counts, F1 = 2PR / (P + R + 1e-10)
    in float32, and the FIRST maximum in ascending threshold order wins, i.e. among equal
    F1 values the lowest threshold (with float32 rounding deciding near-ties as anomalib's
    does). The thresholds are the scores as given (float64).

    Returns:
        ``(f1, threshold)``; ``(nan, nan)`` when no image is anomalous (anomalib: 0.0).
    """
    s, y = _scores_labels(scores, labels)
    if not y.any():
        return math.nan, math.nan
    order = np.argsort(-s, kind="stable")  # descending scores
    s_desc, y_desc = s[order], y[order]
    # the last index of each run of equal scores: one curve point per distinct threshold
    last = np.append(np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1)
    tps = np.cumsum(y_desc, dtype=np.int64)[last]
    predicted = last + 1  # TP + FP
    f32 = np.float32
    precision = tps.astype(f32) / predicted.astype(f32)
    recall = tps.astype(f32) / f32(tps[-1])
    f1 = (f32(2.0) * precision * recall) / (precision + recall + f32(1e-10))
    f1, thresholds = f1[::-1], s_desc[last][::-1]  # ascending thresholds
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def false_reject_rate(scores_good: np.ndarray | Sequence[float], threshold: float) -> float:
    """Fraction of GOOD images rejected, i.e. with ``score >= threshold``; ``nan`` for none."""
    s = np.asarray(scores_good, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return math.nan
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return float(np.mean(s >= threshold))


def recall_at(scores_bad: np.ndarray | Sequence[float], threshold: float) -> float:
    """Fraction of ANOMALOUS images caught, i.e. with ``score >= threshold``; ``nan`` for none."""
    s = np.asarray(scores_bad, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return math.nan
    return float(np.mean(s >= threshold))
