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
    ANOMALOUS_RGB,
    BOX_RGB,
    LABEL_RGB,
    NORMAL_RGB,
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


DEMO = "DEMO: tiny random-init model, not a real inspection result"


def plain_blend(img: np.ndarray, m: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return np.rint(img * (1.0 - alpha) + jet_colormap(m).astype(np.float32) * alpha).astype(np.uint8)


def count_colour(arr: np.ndarray, rgb: tuple[int, int, int], tol: int = 0) -> int:
    """Pixels of colour ``rgb`` (each channel within ``tol``: anti-aliased text)."""
    diff = np.abs(arr.astype(np.int16) - np.array(rgb, np.int16))
    return int(np.all(diff <= tol, axis=-1).sum())


def test_overlay_fixed_colour_scale_and_text():
    img = np.full((60, 80, 3), 100, np.uint8)
    m = np.full((60, 80), 0.2, np.float32)
    a = overlay_image(img, m, 0.2, alpha=1.0)
    b = overlay_image(img, m * 0 + 0.9, 0.9, alpha=1.0)
    # the image's pixels: pure JET colour of the value, the same for any image (legend is outside)
    assert a[59, 79].tolist() == jet_colormap(np.array([[0.2]], np.float32))[0, 0].tolist()
    assert b[59, 79].tolist() == jet_colormap(np.array([[0.9]], np.float32))[0, 0].tolist()
    with_text = overlay_image(img, m, 0.2, threshold=0.5, label="DEMO")
    assert with_text.shape[0] > 60 and with_text.shape[1] >= 80  # a legend strip below
    assert np.array_equal(with_text[:60, :80], plain_blend(img, m))  # nothing drawn over the image
    with Image.open(io.BytesIO(overlay_png(img, m, 0.2, threshold=0.5, label="DEMO"))) as im:
        assert im.size == (with_text.shape[1], with_text.shape[0]) and im.mode == "RGB"


def two_region_map(h: int, w: int) -> np.ndarray:
    m = np.full((h, w), 0.1, np.float32)
    m[200:260, 300:380] = 0.9  # region A
    m[330:340, 150:170] = 0.7  # region B
    m[100, 500] = 0.6  # region C: one pixel
    return m


def test_region_boxes_are_drawn_just_outside_each_region():
    img = np.full((480, 640, 3), 120, np.uint8)
    m = two_region_map(480, 640)
    out = overlay_image(img, m, 0.9, threshold=0.5)
    assert out.shape == img.shape  # 640 x 480: the legend fits inside
    plain = plain_blend(img, m)
    boxes = boxes_above(m, 0.5)
    assert len(boxes) == 3
    white, black = list(BOX_RGB), [0, 0, 0]
    for b in boxes:
        # the outline runs one pixel outside the region on all four sides ...
        assert (out[b.y0 : b.y1 + 1, b.x0 - 1] == white).all() and (
            out[b.y0 : b.y1 + 1, b.x1 + 1] == white
        ).all()
        assert (out[b.y0 - 1, b.x0 : b.x1 + 1] == white).all() and (
            out[b.y1 + 1, b.x0 : b.x1 + 1] == white
        ).all()
        # ... with a black edge around it, and the region's own pixels stay visible
        assert out[b.y0 - 2, b.x0].tolist() == black and out[b.y1, b.x1 + 2].tolist() == black
        assert np.array_equal(out[b.y0 : b.y1 + 1, b.x0 : b.x1 + 1], plain[b.y0 : b.y1 + 1, b.x0 : b.x1 + 1])
    # nothing else changed around the regions (far from the legend corner)
    assert np.array_equal(out[300:320, 250:290], plain[300:320, 250:290])
    # at most max_boxes, the highest-scoring first
    one = overlay_image(img, m, 0.9, threshold=0.5, max_boxes=1)
    assert (one[200:260, 299] == white).all() and not (one[330:340, 149] == white).all()
    # no threshold: no decision, no boxes
    assert count_colour(overlay_image(img, m, 0.9)[:, :, :], BOX_RGB) < count_colour(out, BOX_RGB) / 4


def test_verdict_colour_differs_red_anomalous_green_normal():
    img = np.full((480, 640, 3), 120, np.uint8)
    m = np.full((480, 640), 0.2, np.float32)
    bad = overlay_image(img, m, 0.8, threshold=0.5)
    good = overlay_image(img, m, 0.2, threshold=0.5)
    assert count_colour(bad, ANOMALOUS_RGB) > 100 and count_colour(bad, NORMAL_RGB) == 0
    assert count_colour(good, NORMAL_RGB) > 100 and count_colour(good, ANOMALOUS_RGB) == 0
    none = overlay_image(img, m, 0.2)  # no threshold: no verdict
    assert count_colour(none, NORMAL_RGB) == 0 and count_colour(none, ANOMALOUS_RGB) == 0


def colour_bar(arr: np.ndarray) -> tuple[int, int, int, list[int]] | None:
    """The longest horizontal run of exact JET colours rising from ~0 to ~1 (gaps <= 3 px allowed):
    (row, first x, last x, gap columns), or None."""
    ramp = jet_colormap(np.linspace(0, 1, 4096, dtype=np.float32)[None, :])[0]
    lut: dict[tuple[int, ...], float] = {}  # every JET colour, within 1 per channel (rounding)
    for i, c in enumerate(ramp.tolist()):
        for d in np.ndindex(3, 3, 3):
            lut.setdefault(tuple(int(v) + int(o) - 1 for v, o in zip(c, d, strict=True)), i / 4095)
    best = None
    for y in range(arr.shape[0]):
        vals = [lut.get(tuple(px), -1.0) for px in arr[y].tolist()]
        x = 0
        while x < len(vals):
            if vals[x] < 0 or vals[x] > 0.05:
                x += 1
                continue
            start, last, gaps, prev = x, x, [], vals[x]
            x += 1
            while x < len(vals):
                if vals[x] >= prev - 0.01:
                    last, prev = x, vals[x]
                    x += 1
                elif vals[x] < 0 and x - last <= 3:
                    gaps.append(x)
                    x += 1
                else:
                    break
            if prev >= 0.95 and (best is None or last - start > best[2] - best[1]):
                best = (y, start, last, [g for g in gaps if g < last])
    return best


@pytest.mark.parametrize("size", [(480, 640), (48, 64)])
def test_colour_bar_on_the_fixed_scale_with_the_threshold_marked(size):
    h, w = size
    img = np.full((h, w, 3), 120, np.uint8)
    out = overlay_image(img, np.full((h, w), 0.1, np.float32), 0.3, threshold=0.7, alpha=0.5)
    found = colour_bar(out)
    assert found is not None, "no JET colour bar 0..1 in the overlay"
    _, x0, x1, gaps = found
    assert x1 - x0 >= 50
    assert gaps, "the threshold is not marked on the colour bar"
    assert abs((np.mean(gaps) - x0) / (x1 - x0) - 0.7) < 0.05


def changed_box_fraction(out: np.ndarray, plain: np.ndarray) -> float:
    ys, xs = np.nonzero(np.any(out != plain, axis=-1))
    if len(ys) == 0:
        return 0.0
    return (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) / (plain.shape[0] * plain.shape[1])


@pytest.mark.parametrize("h,w,score", [(480, 640, 0.2), (480, 640, 0.9), (2048, 2448, 0.9)])
def test_legend_covers_under_a_tenth_of_the_image(h, w, score):
    img = np.full((h, w, 3), 120, np.uint8)
    m = np.full((h, w), 0.3, np.float32)
    out = overlay_image(img, m, score, threshold=0.5, label=DEMO)
    assert out.shape == img.shape
    assert 0 < changed_box_fraction(out, plain_blend(img, m)) < 0.10


@pytest.mark.parametrize("size", [(48, 64), (70, 90), (240, 320)])
def test_small_images_get_the_legend_below_them_not_over_them(size):
    h, w = size
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    m = rng.random((h, w), dtype=np.float32)
    out = overlay_image(img, m, 0.9, threshold=0.95, label=DEMO)
    assert out.shape[0] > h and out.shape[1] >= w
    plain = np.asarray(Image.fromarray(plain_blend(img, m)))
    # the image keeps its coordinates; only region boxes are drawn on it
    keep = ~np.all(out[:h, :w] == np.array(BOX_RGB, np.uint8), axis=-1) & np.any(out[:h, :w] != 0, axis=-1)
    assert np.array_equal(out[:h, :w][keep], plain[keep])
    assert count_colour(out[h:], LABEL_RGB, tol=40) > 50  # the DEMO label is in the strip


def test_demo_label_is_shown_in_full():
    img = np.full((480, 640, 3), 120, np.uint8)
    m = np.full((480, 640), 0.3, np.float32)
    with_label = overlay_image(img, m, 0.3, threshold=0.5, label=DEMO)
    without = overlay_image(img, m, 0.3, threshold=0.5)
    assert count_colour(with_label, LABEL_RGB, tol=40) > count_colour(without, LABEL_RGB, tol=40) + 100
    # wrapped, never cut: a longer label draws more
    longer = overlay_image(img, m, 0.3, threshold=0.5, label=DEMO + " and some more words at the end")
    assert count_colour(longer, LABEL_RGB, tol=40) > count_colour(with_label, LABEL_RGB, tol=40) + 50


def test_overlay_png_keeps_its_old_call_signature():
    img = np.full((480, 640, 3), 90, np.uint8)
    m = np.zeros((480, 640), np.float32)
    png = overlay_png(img, m, 0.1, threshold=0.5, label="DEMO", alpha=0.4)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (640, 480) and im.mode == "RGB"
        assert np.array_equal(
            np.asarray(im), overlay_image(img, m, 0.1, threshold=0.5, label="DEMO", alpha=0.4)
        )


def test_overlay_rejects_mismatched_map():
    with pytest.raises(ValueError):
        overlay_image(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.float32), 0.1)
