"""models.postprocess: fixed-scale rendering and exact connected regions."""

from __future__ import annotations

import io
import time
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from models.postprocess import (
    anomaly_map_png,
    boxes_above,
    jet_colormap,
    overlay_image,
    overlay_png,
)


def bfs_regions(m: np.ndarray, thr: float) -> list[tuple[int, int, int, int, int, float, float]]:
    """Naive 8-connected flood fill, the reference for boxes_above."""
    mask = m >= thr
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            q = deque([(y, x)])
            seen[y, x] = True
            pix = []
            while q:
                cy, cx = q.popleft()
                pix.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            q.append((ny, nx))
            ys = [p[0] for p in pix]
            xs = [p[1] for p in pix]
            v = np.array([m[p] for p in pix], dtype=np.float64)
            out.append((min(xs), min(ys), max(xs), max(ys), len(pix), float(v.max()), float(v.mean())))
    return sorted(out)


def as_tuples(boxes):
    return sorted((b.x0, b.y0, b.x1, b.y1, b.area, b.max_score, b.mean_score) for b in boxes)


@settings(max_examples=120, deadline=None)
@given(
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
    thr=st.floats(0.05, 0.95),
)
def test_boxes_match_naive_flood_fill(h, w, seed, thr):
    m = np.random.default_rng(seed).random((h, w), dtype=np.float32)
    got = as_tuples(boxes_above(m, thr))
    want = bfs_regions(m, thr)
    assert len(got) == len(want)
    for g, r in zip(got, want, strict=True):
        assert g[:5] == r[:5]
        assert g[5] == pytest.approx(r[5], abs=1e-6)
        assert g[6] == pytest.approx(r[6], abs=1e-6)


def test_diagonal_touch_is_one_region_and_gap_splits():
    m = np.zeros((5, 6), dtype=np.float32)
    m[0, 0] = m[1, 1] = m[2, 2] = 0.9  # diagonal chain: 8-connected
    m[4, 5] = 0.7  # isolated
    boxes = boxes_above(m, 0.5)
    assert [(b.x0, b.y0, b.x1, b.y1, b.area) for b in boxes] == [(0, 0, 2, 2, 3), (5, 4, 5, 4, 1)]
    assert boxes[0].max_score == pytest.approx(0.9)


def test_u_shape_merges_late():
    # two arms joined only at the bottom row: a union that needs propagation
    m = np.zeros((6, 7), dtype=np.float32)
    m[:, 0] = 1
    m[:, 6] = 1
    m[5, :] = 1
    boxes = boxes_above(m, 0.5)
    assert len(boxes) == 1
    assert (boxes[0].x0, boxes[0].y0, boxes[0].x1, boxes[0].y1, boxes[0].area) == (0, 0, 6, 5, 6 + 6 + 5)


def test_empty_and_full():
    assert boxes_above(np.zeros((4, 4), np.float32), 0.5) == []
    full = boxes_above(np.ones((3, 5), np.float32), 0.5)
    assert len(full) == 1 and full[0].area == 15 and full[0].as_dict()["x1"] == 4


def test_boxes_fast_on_4mp_map():
    rng = np.random.default_rng(0)
    small = rng.random((64, 64)).astype(np.float32)
    m = np.asarray(Image.fromarray(small).resize((2048, 2048), Image.BILINEAR))
    t = time.perf_counter()
    boxes = boxes_above(m, 0.7)
    dt = time.perf_counter() - t
    assert len(boxes) > 5
    assert sum(b.area for b in boxes) == int((m >= 0.7).sum())
    assert dt < 3.0, f"boxes_above took {dt:.2f}s on a 4 MP map"


def test_map_png_is_fixed_scale_at_input_resolution():
    m = np.array([[0.0, 0.5, 1.0], [0.25, 2.0, -1.0]], dtype=np.float32)
    png = anomaly_map_png(m)
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "L" and im.size == (3, 2)
        arr = np.asarray(im)
    assert arr.tolist() == [[0, 128, 255], [64, 255, 0]]
    # not stretched: a map in [0.2, 0.3] stays dark
    low = np.asarray(Image.open(io.BytesIO(anomaly_map_png(np.full((2, 2), 0.2, np.float32)))))
    assert low.max() == 51


@given(st.lists(st.floats(0, 1), min_size=1, max_size=50))
def test_jet_endpoints_and_shape(values):
    v = np.array(values, dtype=np.float32).reshape(1, -1)
    c = jet_colormap(v)
    assert c.shape == (1, len(values), 3) and c.dtype == np.uint8
    ends = jet_colormap(np.array([[0.0, 1.0]], np.float32))
    assert ends[0, 0].tolist() == [0, 0, 128]  # dark blue
    assert ends[0, 1].tolist() == [128, 0, 0]  # dark red


def test_overlay_fixed_colour_scale_and_text():
    img = np.full((60, 80, 3), 100, np.uint8)
    m = np.full((60, 80), 0.2, np.float32)
    a = overlay_image(img, m, 0.2, alpha=1.0)
    b = overlay_image(img, m * 0 + 0.9, 0.9, alpha=1.0)
    # bottom-right corner is free of text: pure JET colour of the value, the same for any image
    assert a[-1, -1].tolist() == jet_colormap(np.array([[0.2]], np.float32))[0, 0].tolist()
    assert b[-1, -1].tolist() == jet_colormap(np.array([[0.9]], np.float32))[0, 0].tolist()
    # the text banner changes the top-left pixels
    plain = np.rint(img * 0.5 + jet_colormap(m) * 0.5).astype(np.uint8)
    with_text = overlay_image(img, m, 0.2, threshold=0.5, label="DEMO")
    assert with_text.shape == img.shape
    assert not np.array_equal(with_text[:15], plain[:15])
    assert np.array_equal(with_text[-5:, -5:], plain[-5:, -5:])
    with Image.open(io.BytesIO(overlay_png(img, m, 0.2))) as im:
        assert im.size == (80, 60) and im.mode == "RGB"


def test_overlay_rejects_mismatched_map():
    with pytest.raises(ValueError):
        overlay_image(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.float32), 0.1)
