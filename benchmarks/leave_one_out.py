"""Leave-one-out scoring of K golden images (threshold calibration): WinCLIP+ fast path vs the generic one.

The generic :meth:`models.base.Detector.leave_one_out` encodes the K - 1 other images as references
K times (K^2 image encodings); WinCLIP+'s override encodes each image once and takes every image's
few-shot map against the memory of the others. Prints, per K: seconds of each path, the ratio
generic / fast, and the largest score and map difference between them (the same numbers are expected).

Real ``ViT-B-16-plus-240`` architecture on RANDOM weights (timing only), or ``--tiny`` for the test
model. Usage::

    python benchmarks/leave_one_out.py [--device cpu|cuda] [--k 4 8] [--size 240] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models
from models.base import Detector


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8], help="golden set sizes")
    parser.add_argument("--size", type=int, default=240, help="image side in pixels")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the real size")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.tiny:
        det = models.load_tiny_detector("winclip", device=args.device)
    else:
        det = models.load_detector("winclip", weights=models.RANDOM_INIT, device=args.device)
    print(f"{det.model_name} on {args.device}, random weights (timing only), images {args.size}x{args.size}")
    rng = np.random.default_rng(0)
    det.text_prototypes()  # cached, as in the service
    print(
        f"{'K':>4} {'fast s':>9} {'generic s':>10} {'generic/fast':>13} {'max |d score|':>14} {'max |d map|':>12}"
    )
    for k in args.k:
        images = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(k)]
        det.leave_one_out(images[:2])  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        fast = det.leave_one_out(images)
        sync(args.device)
        t1 = time.perf_counter()
        generic = Detector.leave_one_out(det, images)
        sync(args.device)
        t2 = time.perf_counter()
        d_score = max(abs(a.score - b.score) for a, b in zip(fast, generic, strict=True))
        d_map = max(
            float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in zip(fast, generic, strict=True)
        )
        print(
            f"{k:>4} {t1 - t0:>9.3f} {t2 - t1:>10.3f} {(t2 - t1) / (t1 - t0):>13.1f} {d_score:>14.2e} {d_map:>12.2e}"
        )


if __name__ == "__main__":
    main()
