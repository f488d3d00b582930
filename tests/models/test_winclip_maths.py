"""WinCLIP scoring maths against the METHODS.md test vectors and plain reference loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.winclip.maths import (
    class_scores,
    fuse_zero_shot,
    harmonic_aggregation,
    make_masks,
    patch_window_index,
    visual_association,
)


def test_masks_3x3_k2_match_methods_vector() -> None:
    assert make_masks((3, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]


def test_masks_count_for_reference_grid() -> None:
    # 15x15 grid: 196 windows of 4 patches and 169 windows of 9 (METHODS.md)
    assert make_masks((15, 15), 2).shape == (196, 4)
    assert make_masks((15, 15), 3).shape == (169, 9)


def test_masks_reject_window_larger_than_grid() -> None:
    with pytest.raises(ValueError, match="smaller than the window"):
        make_masks((2, 2), 3)


def test_harmonic_aggregation_matches_methods_vector() -> None:
    masks = make_masks((3, 3), 2)
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    out = harmonic_aggregation(scores, (3, 3), patch_window_index(masks, 9))
    expected = torch.tensor([[1.0, 0.8571, 0.75], [0.6667, 0.48, 0.375], [0.5, 0.3333, 0.25]])
    assert torch.allclose(out[0], expected, atol=1e-4)


def test_harmonic_aggregation_zero_score_gives_zero_not_nan() -> None:
    masks = make_masks((3, 3), 2)
    scores = torch.tensor([[0.0, 0.75, 0.5, 0.25]])
    out = harmonic_aggregation(scores, (3, 3), patch_window_index(masks, 9))
    assert not torch.isnan(out).any()
    assert out[0, 0, 0] == 0.0  # only window 0 covers patch 0
    assert out[0, 1, 1] == 0.0  # patch 4 is in every window, window 0 included
    assert out[0, 2, 2] == pytest.approx(0.25)


def _harmonic_loop(scores: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor) -> torch.Tensor:
    """Straightforward per-patch loop written from the formula."""
    b = scores.shape[0]
    out = torch.zeros(b, grid[0] * grid[1], dtype=torch.float64)
    for i in range(b):
        for p in range(grid[0] * grid[1]):
            ws = [w for w in range(masks.shape[0]) if p in masks[w].tolist()]
            vals = [float(scores[i, w]) for w in ws]
            out[i, p] = 0.0 if any(v == 0 for v in vals) else len(vals) / sum(1 / v for v in vals)
    return out.reshape(b, *grid)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(3, 6),
    w=st.integers(3, 6),
    k=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_harmonic_aggregation_equals_loop_and_stays_in_unit_interval(
    h: int, w: int, k: int, seed: int
) -> None:
    masks = make_masks((h, w), k)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, masks.shape[0], generator=g, dtype=torch.float64)
    out = harmonic_aggregation(scores, (h, w), patch_window_index(masks, h * w))
    assert out.shape == (2, h, w)
    assert torch.allclose(out, _harmonic_loop(scores, (h, w), masks), atol=1e-12)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_class_scores_vector() -> None:
    # cos similarities, temperature 1: softmax rows of [[0, .7071], [1, .7071]]
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = class_scores(emb, text, temperature=1.0)
    assert torch.allclose(out, torch.tensor([0.6698, 0.4273]), atol=1e-4)


def test_class_scores_uses_temperature_and_ignores_norms() -> None:
    emb = torch.tensor([[3.0, 0.0]])
    text = torch.tensor([[1.0, 1.0], [5.0, 0.0]])
    cos_n, cos_a = 1 / math.sqrt(2), 1.0
    expected = 1 / (1 + math.exp((cos_n - cos_a) / 0.07))
    assert class_scores(emb, text).item() == pytest.approx(expected, rel=1e-5)


def test_visual_association_vector() -> None:
    emb = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    ref = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = visual_association(emb, ref)
    assert torch.allclose(out, torch.tensor([[0.1464, 0.0]]), atol=1e-4)


def test_fuse_zero_shot_is_harmonic_mean_over_scales() -> None:
    s_img = torch.tensor([0.5])
    m2 = torch.full((1, 2, 2), 0.25)
    m3 = torch.full((1, 2, 2), 1.0)
    fused = fuse_zero_shot(s_img, [m2, m3])
    assert torch.allclose(fused, torch.full((1, 2, 2), 3 / (2 + 4 + 1)))
    zero = fuse_zero_shot(torch.tensor([0.0]), [m2, m3])
    assert torch.equal(zero, torch.zeros(1, 2, 2))
