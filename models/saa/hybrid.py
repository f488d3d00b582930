"""The four SAA+ hybrid prompts as pure functions (METHODS.md section 3).

Numpy at the edges, torch only for the saliency maths. Boxes from GroundingDINO
are normalised ``cx, cy, w, h`` in [0, 1]; areas are fractions of the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

RESCORE_GAIN = 3.0  # s' = s * exp(3 * mean saliency in the mask)
SALIENCY_TOP_N = 400  # mean of the 400 largest distances
#: upper bound of a rescored box score: s <= 1 and saliency <= 1 (a distance 0.5 * (1 - cos))
MAX_RESCORED = math.exp(RESCORE_GAIN)


# ------------------------------------------------------------ language prompts
def phrase_is_filtered(phrase: str, filter_word: str) -> bool:
    """True when the detected phrase names the object itself (contains the filter word)."""
    word = filter_word.strip().lower()
    return bool(word) and word in phrase.lower()


def phrase_from_tokens(token_scores: np.ndarray, token_words: Sequence[str], text_threshold: float) -> str:
    """Words of the tokens scoring above ``text_threshold``, joined (BERT ``##`` pieces glued).

    Args:
        token_scores: ``[T]`` float, sigmoid scores of one box against the caption tokens.
        token_words: ``T`` token strings (special tokens given as ``""`` are skipped).
    """
    out = ""
    for score, word in zip(token_scores, token_words, strict=True):
        if score <= text_threshold or not word:
            continue
        if word.startswith("##"):
            out += word[2:]
        else:
            out += (" " if out else "") + word
    return out


# ------------------------------------------------------------ property prompts
def box_areas(boxes_cxcywh: np.ndarray) -> np.ndarray:
    """``[N, 4]`` normalised cx, cy, w, h -> ``[N]`` area fractions."""
    b = np.asarray(boxes_cxcywh, dtype=np.float64).reshape(-1, 4)
    return b[:, 2] * b[:, 3]


def cxcywh_to_xyxy(boxes_cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[N, 4]`` normalised cx, cy, w, h -> ``[N, 4]`` float32 pixel x0, y0, x1, y1."""
    b = np.asarray(boxes_cxcywh, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1) * scale
    return xyxy.astype(np.float32)


def property_filter(
    scores: np.ndarray, areas: np.ndarray, *, box_threshold: float, max_area: float, min_area: float = 0.0
) -> np.ndarray:
    """``[N]`` bool: score above the box threshold and ``min_area < area < max_area`` (reference)."""
    scores = np.asarray(scores, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64)
    return (scores > box_threshold) & (areas > min_area) & (areas < max_area)


def object_area(object_areas: np.ndarray) -> float:
    """Area of the largest kept object box; 1.0 (the whole image) when none was found (reference)."""
    a = np.asarray(object_areas, dtype=np.float64)
    return float(a.max()) if a.size else 1.0


def overlap_with_objects(defects_xyxy: np.ndarray, objects_xyxy: np.ndarray) -> np.ndarray:
    """``[N]`` share of each defect box inside its best-overlapping object box, in [0, 1].

    The IoU-with-object filter the reference leaves out: a defect lies ON the object,
    so we measure intersection over the DEFECT's area (a plain IoU of a small defect
    with a large object is always small). With no object box every share is 1.
    """
    d = np.asarray(defects_xyxy, dtype=np.float64).reshape(-1, 4)
    o = np.asarray(objects_xyxy, dtype=np.float64).reshape(-1, 4)
    if len(o) == 0:
        return np.ones(len(d))
    if len(d) == 0:
        return np.zeros(0)
    iw = np.clip(np.minimum(d[:, None, 2], o[None, :, 2]) - np.maximum(d[:, None, 0], o[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(d[:, None, 3], o[None, :, 3]) - np.maximum(d[:, None, 1], o[None, :, 1]), 0, None)
    area = np.clip((d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]), 1e-12, None)
    return np.clip((iw * ih).max(axis=1) / area, 0.0, 1.0)


# ------------------------------------------------------------ saliency prompt
def self_similarity_saliency(features: torch.Tensor, top_n: int = SALIENCY_TOP_N) -> torch.Tensor:
    """Single-object saliency: per location, mean of its ``top_n`` largest distances to the others.

    Args:
        features: ``[C, h, w]`` unit-norm features.

    Returns:
        ``[h, w]`` float32, distances ``0.5 * (1 - cos)`` in [0, 1].
    """
    c, h, w = features.shape
    flat = features.reshape(c, h * w).float()  # [C, L]
    dist = 0.5 * (1.0 - flat.T @ flat)  # [L, L]
    dist.fill_diagonal_(-math.inf)  # the location itself is not an "other" location
    n = max(1, min(top_n, h * w - 1))
    return dist.topk(n, dim=1).values.mean(dim=1).reshape(h, w).clamp(0.0, 1.0)


def multi_instance_saliency(
    features: torch.Tensor, object_masks: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Saliency for several objects: distance of each object location to its nearest
    location on the OTHER objects (``0.5 * (1 - max cos)``), max over objects; 0 elsewhere.

    Args:
        features: ``[C, h, w]`` unit-norm features.
        object_masks: ``[M, h, w]`` bool, M >= 2.
    """
    c, h, w = features.shape
    flat = features.reshape(c, h * w).float()
    masks = object_masks.reshape(len(object_masks), h * w).bool()
    out = torch.zeros(h * w, dtype=torch.float32, device=features.device)
    for i in range(len(masks)):
        inside = masks[i].nonzero().flatten()
        others = ((masks.sum(dim=0) - masks[i].int()) > 0) & ~masks[i]
        other_idx = others.nonzero().flatten()
        if len(inside) == 0 or len(other_idx) == 0:
            continue
        ref = flat[:, other_idx]  # [C, L_o]
        for start in range(0, len(inside), chunk):
            idx = inside[start : start + chunk]
            sim = (flat[:, idx].T @ ref).max(dim=1).values  # [n]
            out[idx] = torch.maximum(out[idx], (0.5 * (1.0 - sim)).clamp(0.0, 1.0))
    return out.reshape(h, w)


def resize_map(m: torch.Tensor, height: int, width: int) -> np.ndarray:
    """``[h, w]`` -> ``float32 (height, width)`` numpy, bilinear (align_corners=False)."""
    out = F.interpolate(m[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return out[0, 0].cpu().numpy().astype(np.float32)


def rescore(scores: np.ndarray, masks: np.ndarray, saliency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``s' = s * exp(3 * mean(saliency inside the mask))``; an empty mask keeps ``s`` (reference).

    Args:
        scores: ``[N]`` box scores. masks: ``[N, H, W]`` bool. saliency: ``(H, W)`` float.

    Returns:
        ``(rescored [N] float64, mean saliency per mask [N] float64)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    means = np.zeros(len(scores))
    factors = np.ones(len(scores))
    for i, m in enumerate(masks):
        if m.any():
            means[i] = float(saliency[m].mean())
            factors[i] = math.exp(RESCORE_GAIN * means[i])
    return scores * factors, means


# ------------------------------------------------------------ confidence prompt
def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first (ties: lower index first)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    return order[: max(0, k)]


def anomaly_map(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``A = sum_k m_k s'_k / (1 + sum_k m_k)`` as float64 ``(H, W)``; a pixel under one mask gets ``s'/2``.

    Args:
        masks: ``[K, H, W]`` bool or {0, 1}. scores: ``[K]`` rescored box scores.
    """
    m = np.asarray(masks, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1, 1, 1)
    return (m * s).sum(axis=0) / (1.0 + m.sum(axis=0))


def to_unit_interval(raw: np.ndarray) -> np.ndarray:
    """Map a raw SAA+ map (>= 0, unbounded above 1) into [0, 1): ``1 - exp(-A)``.

    Strictly increasing, so every ranking metric (AUROC, max-F1, the reference's
    per-dataset min-max normalisation) is unchanged; about ``A`` for small ``A``; no
    clipping, so two strong anomalies keep their order.
    """
    return (-np.expm1(-np.clip(np.asarray(raw, dtype=np.float64), 0.0, None))).astype(np.float32)


__all__ = [
    "MAX_RESCORED",
    "RESCORE_GAIN",
    "SALIENCY_TOP_N",
    "anomaly_map",
    "box_areas",
    "cxcywh_to_xyxy",
    "multi_instance_saliency",
    "object_area",
    "overlap_with_objects",
    "phrase_from_tokens",
    "phrase_is_filtered",
    "property_filter",
    "rescore",
    "resize_map",
    "self_similarity_saliency",
    "to_unit_interval",
    "top_k",
]
