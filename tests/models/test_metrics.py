"""Evaluation metrics against hand-computed cases and plain brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import (
    aupro,
    f1_max,
    false_reject_rate,
    image_auroc,
    label_regions,
    pixel_auroc,
    pro_curve,
    recall_at,
)

# ------------------------------------------------------------------ brute-force references


def _auroc_pairs(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(anomalous scores higher than normal) + half the ties: the Mann-Whitney form."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _aupro_loop(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """AUPRO by looping over thresholds: one point per distinct map value (pixels >= t flagged).

    Regions are found by a flood fill written here (8-connectivity), not scipy.
    """
    regions: list[np.ndarray] = []  # boolean (N, H, W) per region
    seen = np.zeros(masks.shape, dtype=bool)
    n, h, w = masks.shape
    for b in range(n):
        for y in range(h):
            for x in range(w):
                if masks[b, y, x] and not seen[b, y, x]:
                    region = np.zeros(masks.shape, dtype=bool)
                    stack = [(y, x)]
                    seen[b, y, x] = True
                    while stack:
                        cy, cx = stack.pop()
                        region[b, cy, cx] = True
                        for dy in (-1, 0, 1):
                            for dx in (-1, 0, 1):
                                ny, nx = cy + dy, cx + dx
                                if 0 <= ny < h and 0 <= nx < w and masks[b, ny, nx] and not seen[b, ny, nx]:
                                    seen[b, ny, nx] = True
                                    stack.append((ny, nx))
                    regions.append(region)
    background = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fprs.append(float(flagged[background].mean()))
        pros.append(float(np.mean([flagged[r].mean() for r in regions])))
    fpr, pro = np.array(fprs), np.array(pros)
    i = int(np.flatnonzero(fpr <= limit)[-1])
    if fpr[i] < limit and i + 1 < fpr.size:
        p_lim = pro[i] + (pro[i + 1] - pro[i]) * (limit - fpr[i]) / (fpr[i + 1] - fpr[i])
        fpr, pro = np.append(fpr[: i + 1], limit), np.append(pro[: i + 1], p_lim)
    else:
        fpr, pro = fpr[: i + 1], pro[: i + 1]
    area = sum((fpr[j + 1] - fpr[j]) * (pro[j + 1] + pro[j]) / 2 for j in range(fpr.size - 1))
    return float(area / fpr[-1])


def _f1_loop(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """F1-max by looping over thresholds, in anomalib's arithmetic (torchmetrics' curve).

    Precision and recall are float32 quotients of the counts, F1 = 2PR / (P + R + 1e-10)
    in float32; the first maximum in ascending threshold order wins.
    """
    best, best_t = np.float32(-1.0), math.nan
    n_pos = np.float32((labels == 1).sum())
    for t in np.unique(scores):  # ascending: among equal float32 F1 values the lowest threshold wins
        pred = scores >= t
        tp = np.float32((pred & (labels == 1)).sum())
        p, r = tp / np.float32(pred.sum()), tp / n_pos
        f = (np.float32(2.0) * p * r) / (p + r + np.float32(1e-10))
        if f > best:
            best, best_t = f, float(t)
    return float(best), best_t


# ------------------------------------------------------------------ image AUROC


def test_image_auroc_perfect_reversed_and_ties() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert image_auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert image_auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5
    # one tie between a good and a bad image counts half: 3.5 of 4 pairs
    assert image_auroc([0.1, 0.5, 0.5, 0.9], labels) == pytest.approx(3.5 / 4)


def test_image_auroc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 50))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, n) / 5.0  # many ties
        assert image_auroc(scores, labels) == pytest.approx(_auroc_pairs(scores, labels), abs=1e-12)


def test_image_auroc_one_class_is_nan_not_an_error() -> None:
    assert math.isnan(image_auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(image_auroc([0.1, 0.2], [1, 1]))


def test_bad_labels_and_lengths_raise() -> None:
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="length"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        image_auroc([0.1, float("nan")], [0, 1])


# ------------------------------------------------------------------ pixel AUROC


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """One 10x10 image: region A (1 pixel, map 0.9), region B (3x3, map 0.5),
    10 normal pixels at 0.7, the other 80 normal pixels at 0."""
    mask = np.zeros((10, 10), dtype=np.uint8)
    amap = np.zeros((10, 10), dtype=np.float32)
    mask[0, 0] = 1
    amap[0, 0] = 0.9
    mask[5:8, 5:8] = 1
    amap[5:8, 5:8] = 0.5
    amap[9, :] = 0.7  # 10 normal pixels
    return amap[None], mask[None]


def test_pixel_auroc_perfect_reversed_constant() -> None:
    _, masks = _two_region_case()
    assert pixel_auroc(masks.astype(np.float32), masks) == 1.0
    assert pixel_auroc(1.0 - masks.astype(np.float32), masks) == 0.0
    assert pixel_auroc(np.full(masks.shape, 0.3), masks) == 0.5


def test_pixel_auroc_equals_auroc_of_flattened_pixels() -> None:
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 10, (3, 8, 9)) / 9.0
    masks = rng.random((3, 8, 9)) < 0.2
    flat = _auroc_pairs(maps.reshape(-1), masks.reshape(-1).astype(int))
    assert pixel_auroc(maps, masks) == pytest.approx(flat, abs=1e-12)
    # a list of differently sized images is the same as their pixels pooled
    assert pixel_auroc([maps[0], maps[1, :4]], [masks[0], masks[1, :4]]) == pytest.approx(
        _auroc_pairs(
            np.concatenate([maps[0].ravel(), maps[1, :4].ravel()]),
            np.concatenate([masks[0].ravel(), masks[1, :4].ravel()]).astype(int),
        ),
        abs=1e-12,
    )


def test_pixel_metrics_without_defective_pixels_are_nan() -> None:
    maps = np.random.default_rng(2).random((2, 6, 6))
    masks = np.zeros((2, 6, 6), dtype=bool)
    assert math.isnan(pixel_auroc(maps, masks))
    assert math.isnan(aupro(maps, masks))


def test_masks_must_be_binary_and_match_maps() -> None:
    maps = np.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="0/1"):
        pixel_auroc(maps, np.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="shape"):
        aupro(maps, np.zeros((1, 4, 5)))


# ------------------------------------------------------------------ AUPRO


def test_aupro_perfect_and_reversed_maps() -> None:
    _, masks = _two_region_case()
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(1.0 - masks.astype(np.float32), masks) == pytest.approx(0.0)


def test_aupro_constant_map_is_half_the_limit() -> None:
    # one threshold: every pixel flagged at (FPR 1, PRO 1); the chord from (0, 0) gives
    # PRO 0.3 at FPR 0.3: area 0.3 * 0.3 / 2, divided by 0.3 -> 0.15
    _, masks = _two_region_case()
    assert aupro(np.full(masks.shape, 0.4), masks) == pytest.approx(0.15)
    assert aupro(np.full(masks.shape, 0.4), masks, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_two_regions_of_different_sizes_weigh_the_same() -> None:
    # curve (0,0) (0,0.5) (1/9,0.5) (1/9,1) (1,1): region A alone is HALF the overlap
    # (pixel-weighted it would be 1/10). Cut at 0.3: area 0.5/9 + (0.3 - 1/9) -> / 0.3
    maps, masks = _two_region_case()
    expected = (0.5 / 9 + (0.3 - 1 / 9)) / 0.3
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-9)
    fpr, pro = pro_curve(maps, masks)
    assert fpr.tolist() == pytest.approx([0.0, 0.0, 1 / 9, 1 / 9, 0.3])
    assert pro.tolist() == pytest.approx([0.0, 0.5, 0.5, 1.0, 1.0])
    # the same regions in two different images: regions are pooled over the dataset.
    # 190 normal pixels, 20 of them at 0.7: the flat step now ends at FPR 2/19
    split_maps = np.concatenate([maps, maps])
    split_masks = np.concatenate([masks, masks])
    split_masks[0, 5:8, 5:8] = 0
    split_maps[0, 5:8, 5:8] = 0.0
    split_masks[1, 0, 0] = 0
    split_maps[1, 0, 0] = 0.0
    step = 2 / 19
    assert aupro(split_maps, split_masks) == pytest.approx((0.5 * step + (0.3 - step)) / 0.3, abs=1e-9)


def test_regions_are_eight_connected_and_unique_across_images() -> None:
    mask = np.zeros((2, 5, 5), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal neighbours: one region
    mask[0, 4, 4] = True
    mask[1, 2, 2] = True
    labels, count = label_regions(mask)
    assert count == 3
    assert labels[0][0, 0] == labels[0][1, 1] != labels[0][4, 4]
    assert labels[1][2, 2] == 3


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_threshold_loop(limit: float) -> None:
    # tolerance 1e-9: both sum in float64; only the order of additions differs
    rng = np.random.default_rng(3)
    for trial in range(6):
        masks = np.zeros((3, 12, 11), dtype=np.uint8)
        for b in range(3):
            for _ in range(int(rng.integers(0, 3))):
                y, x = rng.integers(0, 12), rng.integers(0, 11)
                masks[b, y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = 1
        masks[0, 0, 0] = 1
        if trial % 2:
            maps = (rng.integers(0, 7, masks.shape) / 6).astype(np.float32)  # ties
        else:
            maps = (masks * 0.3 + rng.random(masks.shape) * 0.8).astype(np.float32)
        assert aupro(maps, masks, limit) == pytest.approx(_aupro_loop(maps, masks, limit), abs=1e-9)


def test_aupro_rejects_bad_limit() -> None:
    maps, masks = _two_region_case()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)


# ------------------------------------------------------------------ F1-max, false-reject rate


def test_f1_max_hand_case() -> None:
    # t=0.35: P 2/3, R 1 -> 0.8 (best); t=0.8: P 1, R 1/2 -> 2/3; t=0.4: P 1/2, R 1/2
    f1, t = f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert f1 == pytest.approx(0.8)
    assert t == pytest.approx(0.35)


def test_f1_max_matches_loop_with_ties() -> None:
    rng = np.random.default_rng(4)
    for _ in range(300):
        n = int(rng.integers(3, 40))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = rng.integers(0, int(rng.integers(2, 8)), n) / 4.0
        f1, t = f1_max(scores, labels)
        f1_ref, t_ref = _f1_loop(scores, labels)
        assert f1 == f1_ref  # the same float32 arithmetic
        assert t == t_ref


def test_f1_max_ties_pick_the_threshold_anomalib_picks() -> None:
    # t=0.5: P 4/6, R 4/6; t=0.9: P 1, R 3/6: both F1 = 2/3 exactly. anomalib 2.7's F1Max takes
    # the first maximum in ascending threshold order: 0.5 (a float64 2PR / (P + R + 1e-10)
    # would favour 0.9, whose P + R is larger).
    scores = [0.9, 0.9, 0.9, 0.5, 0.1, 0.1] + [0.5, 0.5] + [0.1] * 5
    labels = [1] * 6 + [0] * 7
    f1, t = f1_max(scores, labels)
    assert t == 0.5 and f1 == pytest.approx(2 / 3, abs=1e-7)
    # an exact tie (t=0 and t=0.25 both 2/3) that anomalib's float32 rounding breaks towards 0.25
    scores = [0.75, 0.5, 0.0, 0.5, 1.0, 0.0, 0.25, 0.0, 0.25, 0.75, 0.25, 0.25]
    labels = [1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1]
    assert f1_max(scores, labels)[1] == 0.25


def test_f1_max_without_anomalies_is_nan() -> None:
    f1, t = f1_max([0.1, 0.2], [0, 0])
    assert math.isnan(f1) and math.isnan(t)


def test_false_reject_rate_counts_ties_as_rejected() -> None:
    assert false_reject_rate([0.1, 0.5, 0.5, 0.9], 0.5) == 0.75
    assert false_reject_rate([0.1, 0.5], 0.6) == 0.0
    assert math.isnan(false_reject_rate([], 0.5))
    assert recall_at([0.4, 0.5], 0.5) == 0.5


def test_channel_dimension_and_sequences_are_accepted() -> None:
    maps, masks = _two_region_case()
    expected = aupro(maps, masks)
    assert aupro(maps[:, None], masks[:, None]) == expected  # (N, 1, H, W), as anomalib batches
    assert aupro(list(maps), list(masks)) == expected
    assert pixel_auroc(maps[:, None], masks[:, None]) == pixel_auroc(maps, masks)
