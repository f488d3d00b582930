"""MuSc scoring maths on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.musc.torch_model import (
    aggregate_neighbourhood,
    interval_bounds,
    interval_mean,
    layer_norm_tokens,
    msm,
    mutual_distances,
    nearest_distances,
    rscin,
    score_maps,
)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (31, (0, 9)),  # bank 32 / batch of 32: the 9 nearest images
        (10, (0, 3)),
        (7, (0, 2)),
        (4, (0, 1)),
        (3, (0, 1)),  # (deviation) official interval empty (NaN): nearest image only
        (1, (0, 1)),
    ],
)
def test_interval_bounds_follow_the_official_int_of_fraction(n: int, expected: tuple[int, int]) -> None:
    assert interval_bounds(n) == expected


def test_interval_bounds_other_settings() -> None:
    assert interval_bounds(20, 0.1, 0.5) == (2, 10)
    assert interval_bounds(20, 0.5, 0.1) == (2, 10)  # swapped as the official code
    assert interval_bounds(20, 0, 3) == (0, 3)  # a count when >= 1
    with pytest.raises(ValueError, match="at least one other image"):
        interval_bounds(0)


def test_interval_mean_averages_the_sorted_slice() -> None:
    d = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0]])
    assert interval_mean(d, 0, 2).item() == pytest.approx(1.5)
    assert interval_mean(d, 1, 4).item() == pytest.approx(3.0)


def test_layer_norm_is_over_the_whole_image_not_per_token() -> None:
    x = torch.randn(2, 9, 4) * 3 + 1
    y = layer_norm_tokens(x, (3, 3))
    for b in range(2):
        assert y[b].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert y[b].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # per-token means are NOT zero (a per-token LayerNorm would make them so)
    assert y.mean(dim=-1).abs().max().item() > 0.05


def test_aggregation_degree_one_is_only_l2_normalisation() -> None:
    x = torch.randn(1, 16, 5)
    z = aggregate_neighbourhood(x, (4, 4), 1)
    torch.testing.assert_close(z, x / x.norm(dim=-1, keepdim=True))


def test_aggregation_degree_three_is_the_zero_padded_neighbourhood_mean() -> None:
    x = torch.arange(1, 10, dtype=torch.float32).reshape(1, 9, 1).repeat(1, 1, 2)  # 3x3 grid, 2 channels
    x[..., 1] = 1.0
    z = aggregate_neighbourhood(x, (3, 3), 3)
    # corner (0, 0): neighbours 1, 2, 4, 5 and five zeros -> 12 / 9; channel 1: 4 / 9
    corner = torch.tensor([12 / 9, 4 / 9])
    torch.testing.assert_close(z[0, 0], corner / corner.norm())
    centre = torch.tensor([45 / 9, 1.0])
    torch.testing.assert_close(z[0, 4], centre / centre.norm())


def test_even_or_zero_degrees_are_refused() -> None:
    for r in (0, 2, 4):
        with pytest.raises(ValueError, match="odd"):
            aggregate_neighbourhood(torch.randn(1, 4, 2), (2, 2), r)


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def test_msm_scores_a_patch_by_its_nearest_patches_in_the_nearest_images() -> None:
    # 1 query patch; 4 other images with one patch each at known angles
    q = torch.tensor([[[1.0, 0.0]]])
    angles = [0.1, 0.2, 1.0, 1.5]
    others = torch.tensor([[[math.cos(a), math.sin(a)]] for a in angles])
    d = [2 * math.sin(a / 2) for a in angles]  # chord lengths
    # 4 others -> lowest int(4 * 0.3) = 1 image
    assert msm(q, others).item() == pytest.approx(d[0], abs=1e-6)
    assert msm(q, others, topmin_max=0.5).item() == pytest.approx((d[0] + d[1]) / 2, abs=1e-6)
    # the nearest PATCH of an image counts, wherever it is
    far_and_near = torch.tensor([[[0.0, 1.0], [math.cos(0.05), math.sin(0.05)]]])
    assert nearest_distances(q, far_and_near)[0, 0, 0].item() == pytest.approx(2 * math.sin(0.025), abs=1e-6)


def test_batch_msm_equals_each_image_against_the_others_as_a_bank() -> None:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 10, 8, generator=g), dim=-1)
    batch = msm(z)
    for i in range(6):
        others = torch.cat([z[:i], z[i + 1 :]])
        torch.testing.assert_close(batch[i : i + 1], msm(z[i : i + 1], others), atol=1e-6, rtol=0)


def test_mutual_distances_are_directional_and_skip_self() -> None:
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(3, 5, 4, generator=g), dim=-1)
    d = mutual_distances(z, chunk=1)
    assert torch.isinf(d[torch.arange(3), :, torch.arange(3)]).all()
    for i in range(3):
        for j in range(3):
            if i != j:
                expected = torch.cdist(z[i], z[j]).amin(dim=1)
                torch.testing.assert_close(d[i, :, j], expected, atol=1e-6, rtol=0)


def test_rscin_k1_with_self_most_similar_is_the_min_max_normalised_score() -> None:
    scores = torch.tensor([0.2, 0.8, 0.5], dtype=torch.float64)
    emb = torch.eye(3)
    torch.testing.assert_close(rscin(scores, emb, [1]), torch.tensor([0.0, 1.0, 0.5]))


def test_rscin_averages_over_the_k_most_similar_images() -> None:
    scores = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    emb = torch.tensor([unit([1.0, 0.0]), unit([0.9, 0.1]), unit([0.0, 1.0])])
    w = emb @ emb.T
    out = rscin(scores, emb, [2])
    # image 0: itself and image 1
    expected = float(w[0, 1] / (w[0, 0] + w[0, 1]))
    assert out[0].item() == pytest.approx(expected, abs=1e-6)


def test_rscin_edge_cases() -> None:
    emb = torch.eye(2)
    # all scores equal: (deviation) zeros instead of the official NaN
    assert rscin(torch.tensor([0.3, 0.3]), emb, [1, 2, 3]).tolist() == [0.0, 0.0]
    # k larger than the batch: (deviation) all images kept, no error
    out = rscin(torch.tensor([0.1, 0.9]), torch.ones(2, 2), [1, 2, 3])
    assert torch.isfinite(out).all()
    # off
    torch.testing.assert_close(rscin(torch.tensor([0.1, 0.9]), emb, []), torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(rscin(torch.tensor([0.1, 0.9]), emb, [0]), torch.tensor([0.1, 0.9]))


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=5),
    side=st.integers(min_value=2, max_value=4),
    size=st.integers(min_value=4, max_value=20),
    seed=st.integers(0, 1000),
)
def test_maps_are_bounded_by_the_patch_scores_and_the_score_is_their_max(
    n: int, side: int, size: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, side * side, 3, generator=g), dim=-1)
    patch = msm(z).double()
    maps, scores = score_maps(patch, (side, side), size)
    assert maps.shape == (n, size, size)
    assert (patch >= 0).all() and (patch <= 2).all()
    assert (maps.amax(dim=(1, 2)) <= patch.amax(dim=1) + 1e-9).all()
    assert (maps.amin(dim=(1, 2)) >= patch.amin(dim=1) - 1e-9).all()
    torch.testing.assert_close(scores, maps.reshape(n, -1).amax(dim=1))
    # align_corners=True: the four corners are exactly the corner patches
    torch.testing.assert_close(maps[:, 0, 0], patch[:, 0])
    torch.testing.assert_close(maps[:, -1, -1], patch[:, -1])
