"""A tiny synthetic anomaly dataset in the MVTec-AD layout (``anomaly-inspect make-demo-dataset``).

Textures and objects with painted defects and their masks, seeded, small images:
enough to try and test ``anomaly-inspect eval`` without downloading anything. It is
NOT a benchmark: figures on it say nothing about a method on real parts.

Categories (every defect type can appear on each):

- ``weave``: a woven texture (two crossed sinusoids, random phase and jitter);
- ``marble``: a smooth cloudy texture with veins;
- ``washer``: an object, a metal ring on a dark background, position jittered.

Defects: ``scratch`` (a bright line), ``stain`` (a dark blob), ``hole`` (a black
disc), ``crack`` (a dark random-walk polyline). On ``washer`` they are kept on the part.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

DEMO_CATEGORIES = ("weave", "marble", "washer")
DEFECT_TYPES = ("scratch", "stain", "hole", "crack")


def _weave(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    f = 2 * np.pi / 8.0
    px, py = rng.uniform(0, 2 * np.pi, 2)
    pattern = 0.5 + 0.25 * np.sin(f * x + px) * np.sign(np.sin(f * y / 2 + py)) + 0.25 * np.sin(f * y + py)
    noise = rng.normal(0, 0.04, (size, size))
    base = np.array([170, 150, 110], dtype=np.float32) + rng.normal(0, 4, 3)
    img = base[None, None, :] * (0.7 + 0.5 * (pattern + noise))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8), np.ones((size, size), dtype=bool)


def _marble(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    cloud = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 16)
    cloud = (cloud - cloud.min()) / (np.ptp(cloud) + 1e-6)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    veins = np.abs(np.sin((x + y) / size * 6 + 4 * cloud + rng.uniform(0, np.pi)))
    v = 0.75 + 0.2 * cloud - 0.25 * (veins < 0.08)
    img = np.stack([v * 225, v * 222, v * 215], axis=-1) + rng.normal(0, 2, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), np.ones((size, size), dtype=bool)


def _washer(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-size / 16, size / 16, 2)
    r = np.hypot(y - cy, x - cx)
    outer, inner = size * 0.38, size * 0.16
    ring = (r <= outer) & (r >= inner)
    shade = 0.75 + 0.25 * np.cos(np.arctan2(y - cy, x - cx) - rng.uniform(0, np.pi))
    img = np.zeros((size, size, 3), dtype=np.float32) + np.array([35, 38, 45], dtype=np.float32)
    metal = np.array([175, 178, 185], dtype=np.float32) * shade[..., None]
    img[ring] = metal[ring]
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), ring


_GENERATORS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "weave": _weave,
    "marble": _marble,
    "washer": _washer,
}


def _defect_mask(rng: np.random.Generator, kind: str, size: int, part: np.ndarray) -> np.ndarray:
    """A bool ``(size, size)`` mask of one painted defect, inside ``part`` and never empty."""
    ys, xs = np.nonzero(part)
    for _ in range(50):
        i = int(rng.integers(0, ys.size))
        cy, cx = float(ys[i]), float(xs[i])
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        s = size / 128.0
        if kind == "scratch":
            ang = rng.uniform(0, np.pi)
            length = rng.uniform(20, 45) * s
            dx, dy = np.cos(ang) * length / 2, np.sin(ang) * length / 2
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(1, round(2 * s)))
        elif kind == "stain":
            rx, ry = rng.uniform(5, 12, 2) * s
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        elif kind == "hole":
            rr = rng.uniform(3, 7) * s
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
        else:  # crack
            pts = [(cx, cy)]
            ang = rng.uniform(0, 2 * np.pi)
            for _ in range(int(rng.integers(6, 12))):
                ang += rng.normal(0, 0.5)
                pts.append((pts[-1][0] + 4 * s * np.cos(ang), pts[-1][1] + 4 * s * np.sin(ang)))
            draw.line(pts, fill=255, width=max(1, round(2 * s)))
        mask = (np.asarray(canvas) > 0) & part
        if mask.sum() >= 4:
            return mask
    raise RuntimeError(f"could not place a {kind} defect on the part")  # pragma: no cover


def _paint(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    out = img.astype(np.float32)
    colour = {
        "scratch": np.array([245, 245, 240]),
        "stain": np.array([70, 50, 30]) + rng.normal(0, 8, 3),
        "hole": np.array([8, 8, 8]),
        "crack": np.array([30, 25, 20]),
    }[kind].astype(np.float32)
    alpha = 0.85 if kind in ("stain", "scratch") else 1.0
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, compress_level=1)


def make_demo_dataset(
    root: str | Path,
    *,
    categories: tuple[str, ...] | list[str] = DEMO_CATEGORIES,
    train: int = 120,
    test_good: int = 10,
    test_defect: int = 12,
    size: int = 128,
    seed: int = 0,
) -> list[str]:
    """Write the synthetic dataset under ``root`` in the MVTec-AD layout; return the categories.

    Per category: ``train/good`` (``train`` images), ``test/good`` (``test_good``),
    ``test/<defect>`` (``test_defect`` spread over the defect types) and
    ``ground_truth/<defect>/<stem>_mask.png`` (0/255). Images are ``size x size`` RGB PNG.
    The same arguments always write the same pixels.
    """
    unknown = [c for c in categories if c not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown demo categories {unknown}; known: {', '.join(DEMO_CATEGORIES)}")
    if size < 32 or train < 0 or test_good < 0 or test_defect < 0:
        raise ValueError("size must be >= 32 and the image counts >= 0")
    out = Path(root)
    for ci, cat in enumerate(categories):
        gen = _GENERATORS[cat]
        rng = np.random.default_rng([seed, ci])
        cat_dir = out / cat
        for i in range(train):
            _save(gen(rng, size)[0], cat_dir / "train" / "good" / f"{i:03d}.png")
        for i in range(test_good):
            _save(gen(rng, size)[0], cat_dir / "test" / "good" / f"{i:03d}.png")
        for i in range(test_defect):
            kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
            img, part = gen(rng, size)
            mask = _defect_mask(rng, kind, size, part)
            _save(_paint(rng, img, mask, kind), cat_dir / "test" / kind / f"{i:03d}.png")
            _save((mask * 255).astype(np.uint8), cat_dir / "ground_truth" / kind / f"{i:03d}_mask.png")
    return list(categories)
