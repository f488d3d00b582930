"""Rendering and region extraction for anomaly maps (numpy + Pillow only).

Anomaly maps are ``float32 (H, W)`` arrays with values in [0, 1] at the input
resolution. Every rendering uses a FIXED colour/grey scale (0 -> 0, 1 -> 255 or the
top of JET): a map is never stretched per image, so the same colour means the same
score on every image.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    m = np.asarray(anomaly_map)
    if m.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W), got shape {tuple(m.shape)}")
    m = m.astype(np.float32, copy=False)
    return np.nan_to_num(m, nan=0.0, posinf=1.0, neginf=0.0)


def map_to_uint8(anomaly_map: np.ndarray) -> np.ndarray:
    """``(H, W)`` float in [0, 1] -> ``(H, W)`` uint8, fixed scale ``round(255 * v)`` (clipped)."""
    m = _as_map(anomaly_map)
    return np.rint(np.clip(m, 0.0, 1.0) * 255.0).astype(np.uint8)


def anomaly_map_png(anomaly_map: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a [0, 1] map at its own resolution (pixel = round(255 * score))."""
    buf = io.BytesIO()
    Image.fromarray(map_to_uint8(anomaly_map), mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """JET colours of ``(H, W)`` floats in [0, 1] (clipped): ``(H, W, 3)`` uint8 RGB.

    0 is dark blue, 0.5 green-yellow, 1 dark red (the classic piecewise-linear JET).
    """
    v = np.clip(_as_map(values), 0.0, 1.0)
    four = 4.0 * v
    rgb = np.empty((*v.shape, 3), dtype=np.float32)
    rgb[..., 0] = 1.5 - np.abs(four - 3.0)
    rgb[..., 1] = 1.5 - np.abs(four - 2.0)
    rgb[..., 2] = 1.5 - np.abs(four - 1.0)
    np.clip(rgb, 0.0, 1.0, out=rgb)
    return np.rint(rgb * 255.0).astype(np.uint8)


def _check_pair(image: np.ndarray, anomaly_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be HWC uint8 RGB, got {img.dtype} {tuple(img.shape)}")
    m = _as_map(anomaly_map)
    if m.shape != img.shape[:2]:
        raise ValueError(f"anomaly map shape {m.shape} does not match image {img.shape[:2]}")
    return img, m


#: Colours of the overlay (RGB). The verdict badge: red ANOMALOUS, green NORMAL.
ANOMALOUS_RGB = (214, 39, 40)
NORMAL_RGB = (31, 140, 58)
BOX_RGB = (255, 255, 255)  # region boxes: white, with a black outer edge
LABEL_RGB = (255, 210, 0)  # the extra label line (e.g. DEMO ...)
PANEL_RGB = (18, 18, 18)  # legend background
TEXT_RGB = (255, 255, 255)
#: At most this many regions are boxed (the highest-scoring first); the legend says how many exist.
MAX_BOXES = 20
#: The legend sits inside the image only where it covers at most this fraction of it.
MAX_LEGEND_FRACTION = 0.10
#: Smallest legend font in the strip below a small image (pixels).
STRIP_FONT_SIZE = 13


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font of one size
        return ImageFont.load_default()


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    x0, _, x1, _ = font.getbbox(text)
    return int(np.ceil(x1 - min(x0, 0)))


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (long words stay whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(font, f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def legend_font_size(height: int, width: int) -> int:
    """Legend font size in pixels for an image of ``height x width``: 1/36 of the shorter side, 11..40."""
    return int(min(40, max(11, round(min(height, width) / 36))))


def _legend(
    score: float,
    threshold: float | None,
    label: str | None,
    n_regions: int,
    n_boxed: int,
    size: int,
) -> Image.Image:
    """The legend panel: verdict badge + score, JET colour bar 0..1 with the threshold marked,
    region count, the extra label (wrapped). An opaque RGB image; its size follows ``size``."""
    font, small = _font(size), _font(max(11, round(size * 0.85)))
    pad = max(2, size // 4)
    gap = max(3, size // 2)
    _, top, _, bottom = font.getbbox("Ag")
    line_h = int(bottom - top)
    _, stop, _, sbottom = small.getbbox("01")
    small_h = int(sbottom - stop)

    # row 1: verdict badge and score
    verdict = None if threshold is None else ("ANOMALOUS" if score >= threshold else "NORMAL")
    badge_w = _text_width(font, verdict) + 2 * pad if verdict else 0
    score_text = f"score {score:.3f}"
    row1_w = badge_w + (gap if verdict else 0) + _text_width(font, score_text)
    # row 2: "0 [colour bar] 1" then "thr 0.50"
    bar_w, bar_h = max(60, 7 * size), max(5, round(size * 0.7))
    zero_w, one_w = _text_width(small, "0"), _text_width(small, "1")
    thr_text = "" if threshold is None else f"thr {threshold:.2f}"
    row2_w = zero_w + pad + bar_w + pad + one_w + (gap + _text_width(small, thr_text) if thr_text else 0)
    # row 3: regions
    regions = ""
    if threshold is not None:
        regions = (
            "no region >= thr"
            if n_regions == 0
            else f"{n_regions} region{'s' if n_regions != 1 else ''} >= thr"
        )
        if n_boxed < n_regions:
            regions += f" ({n_boxed} boxed)"
    inner_w = max(row1_w, row2_w, _text_width(small, regions) if regions else 0)
    label_lines = _wrap(label, small, max(inner_w, 16 * size)) if label else []
    inner_w = max([inner_w, *(_text_width(small, ln) for ln in label_lines)])

    row1_h = line_h + 2 * pad
    row2_h = max(bar_h + 4, small_h)
    rows_h = [row1_h, row2_h] + ([small_h] if regions else []) + [small_h] * len(label_lines)
    width = inner_w + 2 * pad
    height = sum(rows_h) + pad * (len(rows_h) + 1)
    panel = Image.new("RGB", (width, height), PANEL_RGB)
    draw = ImageDraw.Draw(panel)

    y = pad
    x = pad
    if verdict:
        fill = ANOMALOUS_RGB if verdict == "ANOMALOUS" else NORMAL_RGB
        draw.rectangle((x, y, x + badge_w - 1, y + row1_h - 1), fill=fill)
        draw.text((x + pad, y + pad - top), verdict, fill=TEXT_RGB, font=font)
        x += badge_w + gap
    draw.text((x, y + pad - top), score_text, fill=TEXT_RGB, font=font)
    y += row1_h + pad

    # colour bar: exact JET colours of a 0..1 ramp (the fixed scale of the heat map)
    x = pad
    mid = y + row2_h // 2
    draw.text((x, mid - small_h // 2 - stop), "0", fill=TEXT_RGB, font=small)
    x += zero_w + pad
    ramp = jet_colormap(np.linspace(0.0, 1.0, bar_w, dtype=np.float32)[None, :])  # [1, bar_w, 3]
    bar_y0 = mid - bar_h // 2
    panel.paste(Image.fromarray(np.repeat(ramp, bar_h, axis=0), mode="RGB"), (x, bar_y0))
    if threshold is not None:
        tx = x + round(float(np.clip(threshold, 0.0, 1.0)) * (bar_w - 1))
        half, out = size // 16, max(2, size // 8)  # marker: white, black edges, over the bar's height
        draw.rectangle((tx - half - 1, bar_y0 - out, tx + half + 1, bar_y0 + bar_h - 1 + out), fill=(0, 0, 0))
        draw.rectangle((tx - half, bar_y0 - out + 1, tx + half, bar_y0 + bar_h - 2 + out), fill=TEXT_RGB)
    x += bar_w + pad
    draw.text((x, mid - small_h // 2 - stop), "1", fill=TEXT_RGB, font=small)
    if thr_text:
        x += one_w + gap
        draw.text((x, mid - small_h // 2 - stop), thr_text, fill=TEXT_RGB, font=small)
    y += row2_h + pad

    if regions:
        draw.text((pad, y - stop), regions, fill=TEXT_RGB, font=small)
        y += small_h + pad
    for line in label_lines:
        draw.text((pad, y - stop), line, fill=LABEL_RGB, font=small)
        y += small_h + pad
    return panel


def _draw_boxes(draw: ImageDraw.ImageDraw, boxes: list[Box], height: int, width: int) -> None:
    """White rectangles just outside each region (its pixels stay visible), a black outer edge."""
    lw = max(1, round(min(height, width) / 400))
    for b in boxes:
        for k in range(lw + 1):
            d = 1 + k
            rect = (
                max(0, b.x0 - d),
                max(0, b.y0 - d),
                min(width - 1, b.x1 + d),
                min(height - 1, b.y1 + d),
            )
            draw.rectangle(rect, outline=BOX_RGB if k < lw else (0, 0, 0), width=1)


def overlay_image(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    *,
    threshold: float | None = None,
    label: str | None = None,
    alpha: float = 0.5,
    max_boxes: int = MAX_BOXES,
) -> np.ndarray:
    """The input with a JET heat map alpha-blended over it, region boxes and a legend.

    What is drawn:

    * the heat map on the FIXED 0..1 JET scale (never stretched per image);
    * with ``threshold``: a box around each region ``>= threshold`` (8-connected, as
      :func:`boxes_above` finds them; white, drawn just outside the region, the
      ``max_boxes`` highest-scoring ones) and a verdict badge, red ``ANOMALOUS``
      (``score >= threshold``) or green ``NORMAL``;
    * a legend: badge and score, a JET colour bar 0..1 with the threshold marked, the
      region count, then ``label`` (yellow, wrapped), its font 1/40 of the shorter side
      (11..40 px; at least 13 px in the strip).

    The legend goes inside the image, in the corner where it covers the fewest pixels
    ``>= threshold``, when it covers at most :data:`MAX_LEGEND_FRACTION` (10 %) of the image.
    Otherwise (small images, below ~400 x 300) it goes in a strip BELOW the image and the
    result is larger than the input (and wider where the legend needs it): the input stays at
    the top-left at 1:1, so pixel coordinates (regions) are the same.

    Args:
        image: ``HWC uint8 RGB`` (a 2-D grey image is accepted too).
        anomaly_map: ``(H, W)`` float in [0, 1], same H and W as ``image``.
        score: image score in [0, 1].
        threshold: the decision threshold; without it, no verdict and no boxes.
        label: an extra text (e.g. ``DEMO ...``), always shown in full.
        alpha: heat-map weight in [0, 1].
        max_boxes: most regions boxed.

    Returns:
        ``HWC uint8 RGB``: ``(H, W, 3)``, or ``(H + strip, max(W, legend width), 3)``
        for a small image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img, m = _check_pair(image, anomaly_map)
    h, w = img.shape[:2]
    heat = jet_colormap(m).astype(np.float32)
    blended = np.rint(img.astype(np.float32) * (1.0 - alpha) + heat * alpha).astype(np.uint8)
    pil = Image.fromarray(blended, mode="RGB")

    boxes = boxes_above(m, threshold) if threshold is not None else []
    _draw_boxes(ImageDraw.Draw(pil), boxes[: max(0, max_boxes)], h, w)
    panel = _legend(
        score, threshold, label, len(boxes), min(len(boxes), max(0, max_boxes)), legend_font_size(h, w)
    )
    pw, ph = panel.size
    margin = max(2, legend_font_size(h, w) // 3)
    inside = pw * ph <= MAX_LEGEND_FRACTION * h * w and pw + 2 * margin <= w and ph + 2 * margin <= h
    if inside:
        # inside: the corner covering the fewest pixels >= threshold (or the lowest scores)
        weight = (m >= threshold).astype(np.float64) if threshold is not None else m.astype(np.float64)
        corners = [
            (margin, margin),
            (w - pw - margin, margin),
            (margin, h - ph - margin),
            (w - pw - margin, h - ph - margin),
        ]
        costs = [float(weight[y : y + ph, x : x + pw].sum()) for x, y in corners]
        pil.paste(panel, corners[int(np.argmin(costs))])
        return np.asarray(pil)
    # a strip below the image, with a legend font that stays readable
    size = max(STRIP_FONT_SIZE, legend_font_size(h, w))
    panel = _legend(score, threshold, label, len(boxes), min(len(boxes), max(0, max_boxes)), size)
    pw, ph = panel.size
    pad = max(2, size // 3)
    canvas = Image.new("RGB", (max(w, pw + 2 * pad), h + ph + 2 * pad), PANEL_RGB)
    canvas.paste(pil, (0, 0))
    canvas.paste(panel, (pad, h + pad))
    return np.asarray(canvas)


def overlay_png(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    *,
    threshold: float | None = None,
    label: str | None = None,
    alpha: float = 0.5,
    max_boxes: int = MAX_BOXES,
) -> bytes:
    """PNG bytes of :func:`overlay_image`."""
    arr = overlay_image(
        image, anomaly_map, score, threshold=threshold, label=label, alpha=alpha, max_boxes=max_boxes
    )
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@dataclass(frozen=True)
class Box:
    """One connected region of the map at or above a threshold (8-connectivity).

    ``x0, y0, x1, y1`` are INCLUSIVE pixel bounds; ``area`` counts the region's pixels.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    max_score: float
    mean_score: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in row-major order: ``(row, start, end_inclusive)``."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)  # [H, W+1]: +1 at a run start, -1 one past its end
    rs, cs = np.nonzero(d == 1)
    _, ce = np.nonzero(d == -1)
    return rs, cs, ce - 1


def _components(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Component id (0..n-1) per run; runs touch when in adjacent rows and 8-adjacent."""
    n = len(rows)
    parent = np.arange(n)
    if n == 0:
        return parent
    stride = width + 2
    key_start = rows * stride + starts
    key_end = rows * stride + ends
    # For each run b, runs a of the row above with end_a >= start_b - 1 and start_a <= end_b + 1.
    above = rows - 1
    lo = np.searchsorted(key_end, above * stride + starts - 1, side="left")
    hi = np.searchsorted(key_start, above * stride + ends + 1, side="right")
    lo = np.maximum(lo, np.searchsorted(rows, above, side="left"))
    hi = np.minimum(hi, np.searchsorted(rows, above, side="right"))
    counts = np.maximum(hi - lo, 0)
    if counts.sum() == 0:
        return parent
    b = np.repeat(np.arange(n), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(lo, counts) + offsets
    # Hook-and-compress (Shiloach-Vishkin style) label propagation over the run graph.
    while True:
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            break
        small, big = np.minimum(ra, rb), np.maximum(ra, rb)
        np.minimum.at(parent, big, small)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    _, comp = np.unique(parent, return_inverse=True)
    return comp.reshape(-1)


def boxes_above(anomaly_map: np.ndarray, threshold: float) -> list[Box]:
    """Connected regions (8-connectivity) of pixels with ``map >= threshold``, exact at full resolution.

    Returns boxes sorted by ``max_score`` (highest first), then by position.
    Runs in time linear in the pixel count plus a few passes over the run graph.
    """
    m = _as_map(anomaly_map)
    mask = m >= threshold
    rows, starts, ends = _runs(mask)
    if len(rows) == 0:
        return []
    comp = _components(rows, starts, ends, m.shape[1])
    ncomp = int(comp.max()) + 1
    lengths = ends - starts + 1
    vals = m[mask]  # row-major order == run order
    run_offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    run_max = np.maximum.reduceat(vals, run_offsets)
    run_sum = np.add.reduceat(vals.astype(np.float64), run_offsets)
    area = np.bincount(comp, weights=lengths, minlength=ncomp).astype(np.int64)
    total = np.bincount(comp, weights=run_sum, minlength=ncomp)
    cmax = np.full(ncomp, -np.inf)
    np.maximum.at(cmax, comp, run_max)
    x0 = np.full(ncomp, np.iinfo(np.int64).max)
    np.minimum.at(x0, comp, starts)
    x1 = np.full(ncomp, -1)
    np.maximum.at(x1, comp, ends)
    y0 = np.full(ncomp, np.iinfo(np.int64).max)
    np.minimum.at(y0, comp, rows)
    y1 = np.full(ncomp, -1)
    np.maximum.at(y1, comp, rows)
    boxes = [
        Box(
            x0=int(x0[i]),
            y0=int(y0[i]),
            x1=int(x1[i]),
            y1=int(y1[i]),
            area=int(area[i]),
            max_score=float(cmax[i]),
            mean_score=float(total[i] / area[i]),
        )
        for i in range(ncomp)
    ]
    boxes.sort(key=lambda bx: (-bx.max_score, bx.y0, bx.x0))
    return boxes


__all__ = [
    "Box",
    "anomaly_map_png",
    "boxes_above",
    "jet_colormap",
    "map_to_uint8",
    "overlay_image",
    "overlay_png",
]
