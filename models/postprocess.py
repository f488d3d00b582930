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


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font of one size
        return ImageFont.load_default()


def overlay_image(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    *,
    threshold: float | None = None,
    label: str | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """The input with a JET heat map alpha-blended over it and the score written on it.

    Args:
        image: ``HWC uint8 RGB`` (a 2-D grey image is accepted too).
        anomaly_map: ``(H, W)`` float in [0, 1], same H and W as ``image``.
        score: image score, written as text.
        threshold: when given, the text also says ``ANOMALOUS``/``normal`` (score >= threshold).
        label: an extra line of text (e.g. ``DEMO ...``).
        alpha: heat-map weight in [0, 1].

    Returns:
        ``HWC uint8 RGB``, same size as the input.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img, m = _check_pair(image, anomaly_map)
    heat = jet_colormap(m).astype(np.float32)
    blended = np.rint(img.astype(np.float32) * (1.0 - alpha) + heat * alpha).astype(np.uint8)

    lines = [f"score {score:.3f}"]
    if threshold is not None:
        verdict = "ANOMALOUS" if score >= threshold else "normal"
        lines[0] += f"  {verdict} (thr {threshold:.2f})"
    if label:
        lines.append(label)
    h, w = blended.shape[:2]
    size = int(max(8, min(h // 16, w // 22, 32)))
    font = _font(size)
    pil = Image.fromarray(blended, mode="RGB")
    draw = ImageDraw.Draw(pil)
    pad = max(1, size // 4)
    y: float = pad
    for i, text in enumerate(lines):
        x0, y0, x1, y1 = draw.textbbox((pad, y), text, font=font)
        draw.rectangle((x0 - pad, y0 - pad, x1 + pad, y1 + pad), fill=(0, 0, 0))
        colour = (255, 255, 255) if i == 0 else (255, 210, 0)
        draw.text((pad, y), text, fill=colour, font=font)
        y = y1 + 2 * pad
    return np.asarray(pil)


def overlay_png(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    *,
    threshold: float | None = None,
    label: str | None = None,
    alpha: float = 0.5,
) -> bytes:
    """PNG bytes of :func:`overlay_image`."""
    arr = overlay_image(image, anomaly_map, score, threshold=threshold, label=label, alpha=alpha)
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
