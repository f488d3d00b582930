"""AnomalyDINO latency on this machine, against WinCLIP+ measured in the same run.

Real architectures on RANDOM weights (timing only: random weights give no meaningful
scores): DINOv2 ``vit_small_patch14_dinov2`` for AnomalyDINO, open_clip
``ViT-B-16-plus-240`` for WinCLIP+. Both with ONE golden image (1-shot memory).
Prints:

- AnomalyDINO seconds per image at ``image_size`` 448 and 672 (the paper's sizes; 252,
  anomalib's default, for reference), fp32 and bf16, at batch 1 and batch 4;
- WinCLIP+ seconds per image (same precision and batch), each WinCLIP+ call
  interleaved with an AnomalyDINO call, and the ratio AnomalyDINO / WinCLIP+ as the
  median over these pairs (robust to a drifting load; below 1 = AnomalyDINO is faster);
- the backbone FLOPs per image of each configuration (counted from the shapes);
- a 2448x2048 image with tiling: ``{"tile": 518, "overlap": 64}`` at image_size 252
  (the issue's example setting) and ``{"tile": 448, "overlap": 64}`` at image_size 448
  (tiles at their native resolution): seconds per image, tiles and batches.

Usage::

    python benchmarks/anomalydino_latency.py [--repeats 3] [--batch 1 4] [--sizes 252 448 672]
        [--threads N] [--skip-bf16] [--skip-tiled]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models
from models.anomalydino.detector import AnomalyDinoDetector
from models.base import Detector, ReferenceSet
from models.cpu import cpu_capabilities, resolve_precision
from models.dinov2 import create_dinov2
from models.tiling import TiledDetector, TilingConfig
from models.winclip.detector import WinClipDetector


def vit_flops(width: int, layers: int, seq_len: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sequence through a pre-LN ViT stack."""
    d, n = width, seq_len
    per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * int(mlp_ratio * d)
    return float(layers * per_layer)


WINCLIP_TFLOP = 0.673  # counted in benchmarks/winclip_latency.py (2,896 tokens x 12 layers, width 896)


def dino_flops(det: AnomalyDinoDetector) -> float:
    gh, gw = (s // det.backbone.patch_size for s in det.image_size)
    vit = det.backbone.model
    return vit_flops(det.backbone.embed_dim, len(vit.blocks), 1 + gh * gw)  # type: ignore[arg-type]


def time_per_image(
    det: Detector, images: list[np.ndarray], refs: ReferenceSet | None, repeats: int, warm: bool = True
) -> tuple[float, list[models.AnomalyResult]]:
    """Best of ``repeats`` timed ``predict_batch`` calls, per image (after a warm-up call if ``warm``)."""
    if warm:
        det.predict_batch(images[:1], object_name="bottle", references=refs)
    best, results = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = det.predict_batch(images, object_name="bottle", references=refs)
        best = min(best, time.perf_counter() - t0)
    return best / len(images), results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (min is reported)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=[252, 448, 672])
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--skip-tiled", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default). On a shared, oversubscribed machine use 1: every "
        "parallel op then waits for a descheduled thread (~10 ms per op), which penalises models made "
        "of many small ops (DINOv2 at 252 px) far more than WinCLIP's few large GEMMs",
    )
    args = ap.parse_args(argv)
    dev = "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"device: {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}; cpus {os.cpu_count()}"
    )
    print("models: vit_small_patch14_dinov2 (AnomalyDINO) and ViT-B-16-plus-240 (WinCLIP+), RANDOM weights:")
    print("        timing only, scores are meaningless; 1 golden image (1-shot)")
    print(cpu_capabilities().summary())
    precisions = ["fp32"]
    if not args.skip_bf16:
        bf16 = resolve_precision("bf16", dev)
        if bf16.fallback is None:
            precisions.append("bf16")
        else:
            print(f"bf16: not timed; the detector would run fp32 (timed below): {bf16.fallback}")

    rng = np.random.default_rng(0)
    golden = rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)
    images = [rng.integers(0, 256, (900, 900, 3), dtype=np.uint8) for _ in range(max(args.batch))]

    win32 = models.load_detector("winclip", weights=models.RANDOM_INIT, device=dev)
    assert isinstance(win32, WinClipDetector)
    backbone = create_dinov2("vit_small_patch14_dinov2", models.RANDOM_INIT, device=dev)
    # On a shared machine the load drifts: each AnomalyDINO measurement is interleaved with
    # a WinCLIP+ measurement of the same precision and batch, and the ratio is taken per pair.
    rows = []  # size, precision, batch, dino s/img, winclip+ s/img, median pair ratio, TFLOP/img
    dino_results: dict[tuple[int, str], list[models.AnomalyResult]] = {}
    for p in precisions:
        win = (
            win32 if p == "fp32" else WinClipDetector(backbone=win32.backbone, precision=p, cache=win32.cache)
        )
        wrefs = win.encode_references([golden])
        for size in args.sizes:
            det = AnomalyDinoDetector(backbone=backbone, device=dev, image_size=size, precision=p)
            drefs = det.encode_references([golden])
            for b in args.batch:
                tw, td, pairs = [], [], []
                for _ in range(args.repeats):
                    w_sec, _ = time_per_image(win, images[:b], wrefs, 1, warm=not tw)
                    d_sec, res = time_per_image(det, images[:b], drefs, 1, warm=not td)
                    tw.append(w_sec)
                    td.append(d_sec)
                    pairs.append(d_sec / w_sec)
                dino_results[(size, p)] = res
                row = (size, p, b, min(td), min(tw), float(np.median(pairs)), dino_flops(det) / 1e12)
                rows.append(row)
                print(
                    f"  anomalydino@{size} {p} batch {b}: {min(td):.3f} s/image; winclip+ {min(tw):.3f} s/image; "
                    f"pair ratios {', '.join(f'{r:.2f}' for r in pairs)}",
                    flush=True,
                )

    print()
    print(f"WinCLIP+ backbone: {WINCLIP_TFLOP:.3f} TFLOP/image (ViT-B-16-plus-240, image + 365 windows)")
    print(
        "method/size        precision  batch  s/image  TFLOP/img  winclip+ s/image  ratio (median of pairs)"
    )
    for size, p, b, d_sec, w_sec, ratio, tf in rows:
        print(f"anomalydino@{size:<6d} {p:9s}  {b:5d}  {d_sec:7.3f}  {tf:9.4f}  {w_sec:16.3f}  {ratio:.3f}")
    for size in args.sizes:
        if (size, "bf16") in dino_results:
            a, c = dino_results[(size, "fp32")], dino_results[(size, "bf16")]
            diff = max(float(np.abs(x.anomaly_map - y.anomaly_map).max()) for x, y in zip(a, c, strict=True))
            sdiff = max(abs(x.score - y.score) for x, y in zip(a, c, strict=True))
            print(f"anomalydino@{size} bf16 vs fp32: max |map diff| {diff:.2e}, max |score diff| {sdiff:.2e}")

    if not args.skip_tiled:
        print()
        print("tiled 2448x2048 image (1 golden image of the same size, tiled the same way), fp32:")
        big_golden = rng.integers(0, 256, (2048, 2448, 3), dtype=np.uint8)
        big = rng.integers(0, 256, (2048, 2448, 3), dtype=np.uint8)
        for size, tiling in ((252, {"tile": 518, "overlap": 64}), (448, {"tile": 448, "overlap": 64})):
            inner = AnomalyDinoDetector(backbone=backbone, device=dev, image_size=size)
            det = TiledDetector(inner, TilingConfig.from_dict(tiling) or TilingConfig(tile=518))
            t0 = time.perf_counter()
            refs = det.encode_references([big_golden])
            t_enc = time.perf_counter() - t0
            sec, res = time_per_image(det, [big], refs, max(1, args.repeats - 1))
            info = res[0].details["tiling"]
            print(
                f"  anomalydino@{size} tiling {tiling}: {sec:.2f} s/image "
                f"({info['tiles']} tiles in {info['batches']} batches of <= {info['batch']}; "
                f"bank {res[0].details['bank_size']} patches, encoded in {t_enc:.2f} s)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
