"""Tiny synthetic anomaly datasets in the MVTec-AD or VisA folder layout (tests, demos).

Normal images are smooth coloured gradients with mild noise; anomalous ones add a
few high-contrast blobs or scratches whose pixels make the ground-truth mask.

MVTec-AD layout::

    ROOT/<category>/train/good/000.png
    ROOT/<category>/test/good/000.png
    ROOT/<category>/test/<defect>/000.png
    ROOT/<category>/ground_truth/<defect>/000_mask.png

VisA layout (raw download + the ``split_csv/1cls.csv`` the reference reads)::

    ROOT/<category>/Data/Images/Normal/000.JPG
    ROOT/<category>/Data/Images/Anomaly/000.JPG
    ROOT/<category>/Data/Masks/Anomaly/000.png
    ROOT/split_csv/1cls.csv      (object,split,label,image,mask)

Usage: ``python -m models.anomalyclip.synthetic OUT_DIR [--layout visa]``.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("blob", "scratch")


def normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """``HWC uint8 RGB`` smooth gradient + noise, values in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    slope = rng.uniform(-40, 40, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def add_defect(img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect; returns ``(image HWC uint8, mask HW bool)``."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "blob":
        cy, cx = rng.uniform(0.2, 0.8, size=2) * (h, w)
        ry, rx = rng.uniform(0.08, 0.2, size=2) * (h, w)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    elif kind == "scratch":
        y0, y1 = rng.uniform(0.1, 0.9, size=2) * h
        x0, x1 = 0.1 * w, 0.9 * w
        t = np.clip((xx - x0) / (x1 - x0), 0, 1)
        line_y = y0 + t * (y1 - y0)
        mask = (np.abs(yy - line_y) <= max(1.0, 0.04 * h)) & (xx >= x0) & (xx <= x1)
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    out = img.copy()
    colour = 255 - np.asarray(img[mask].mean(axis=0) if mask.any() else img.mean(axis=(0, 1)))
    out[mask] = np.clip(colour + rng.normal(0, 10, size=(int(mask.sum()), 3)), 0, 255).astype(np.uint8)
    return out, mask


def make_synthetic_dataset(
    root: str | Path,
    *,
    layout: str = "mvtec",
    categories: Sequence[str] = ("widget",),
    n_train_good: int = 2,
    n_test_good: int = 4,
    n_test_bad: int = 4,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset under ``root``; returns ``root``.

    ``n_test_bad`` anomalous images per category are split over :data:`DEFECTS`.
    ``layout`` is ``mvtec`` or ``visa``. Deterministic for a given ``seed``.
    """
    if layout not in ("mvtec", "visa"):
        raise ValueError(f"layout must be 'mvtec' or 'visa', got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows: list[list[str]] = []
    for cat in categories:
        goods = [normal_image(rng, size) for _ in range(n_train_good + n_test_good)]
        bads = []
        for i in range(n_test_bad):
            kind = DEFECTS[i % len(DEFECTS)]
            bads.append((kind, *add_defect(normal_image(rng, size), rng, kind)))
        if layout == "mvtec":
            for i, img in enumerate(goods):
                split = "train" if i < n_train_good else "test"
                idx = i if split == "train" else i - n_train_good
                _save(img, root / cat / split / "good" / f"{idx:03d}.png")
            counters: dict[str, int] = {}
            for kind, img, mask in bads:
                j = counters.get(kind, 0)
                counters[kind] = j + 1
                _save(img, root / cat / "test" / kind / f"{j:03d}.png")
                _save(mask_image(mask), root / cat / "ground_truth" / kind / f"{j:03d}_mask.png")
        else:
            for i, img in enumerate(goods):
                rel = f"{cat}/Data/Images/Normal/{i:03d}.JPG"
                _save(img, root / rel, quality=95)
                rows.append([cat, "train" if i < n_train_good else "test", "normal", rel, ""])
            for j, (_, img, mask) in enumerate(bads):
                rel = f"{cat}/Data/Images/Anomaly/{j:03d}.JPG"
                mrel = f"{cat}/Data/Masks/Anomaly/{j:03d}.png"
                _save(img, root / rel, quality=95)
                _save(mask_image(mask), root / mrel)
                rows.append([cat, "test", "anomaly", rel, mrel])
    if layout == "visa":
        (root / "split_csv").mkdir(parents=True, exist_ok=True)
        with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["object", "split", "label", "image", "mask"])
            writer.writerows(rows)
    return root


def mask_image(mask: np.ndarray) -> np.ndarray:
    """Bool ``(H, W)`` -> uint8 ``(H, W)`` with 0 / 255 (the datasets' mask encoding)."""
    return mask.astype(np.uint8) * 255


def _save(arr: np.ndarray, path: Path, quality: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if quality is not None:
        img.save(path, quality=quality)
    else:
        img.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write a tiny synthetic anomaly dataset")
    parser.add_argument("out", type=Path)
    parser.add_argument("--layout", choices=["mvtec", "visa"], default="mvtec")
    parser.add_argument("--categories", nargs="+", default=["widget"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--good", type=int, default=4, help="normal test images per category")
    parser.add_argument("--bad", type=int, default=4, help="anomalous test images per category")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_synthetic_dataset(
        args.out,
        layout=args.layout,
        categories=args.categories,
        n_test_good=args.good,
        n_test_bad=args.bad,
        size=args.size,
        seed=args.seed,
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
