"""AnomalyCLIP latency at 518x518 on this machine.

Real ``ViT-L-14-336`` architecture (QuickGELU, 24 blocks, width 1024, 37x37 grid at
518) on RANDOM weights, random prompts: TIMING ONLY, the scores mean nothing.
Prints seconds per image (batch 1, text embeddings already cached as in the
service) for fp32 and bf16, the FLOPs per image counted from the configuration,
this machine's matmul throughput measured now and the resulting floor. Where the
CPU has no native bf16 (AVX2-only, AVX-512 without BF16) the detector runs bf16
requests in fp32: bf16 is then not timed and the fallback is printed.

Usage::

    python benchmarks/anomalyclip_latency.py [--device cpu|cuda] [--repeats 2] [--skip-bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.anomalyclip.detector import AnomalyClipDetector, build_anomalyclip
from models.base import RANDOM_INIT
from models.cpu import cpu_capabilities, resolve_precision


def anomalyclip_flops_per_image(det: AnomalyClipDetector) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image through the DPAM encoder."""
    v = det.clip.visual
    d = v.conv1.out_channels
    blocks = v.transformer.resblocks
    hidden = blocks[0].mlp.c_fc.out_features
    p = v.conv1.kernel_size[0]
    g = det.image_size // p
    n = 1 + g * g
    plain = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    dual_extra = 2 * 2 * n * n * d + 2 * n * d * d  # V-V attention + its out_proj
    n_dual = len(blocks) - det.arch.dpam_start + 1
    total = 2.0 * g * g * (3 * p * p) * d + len(blocks) * plain + n_dual * dual_extra
    total += len(det.encoder.feature_layers) * 2 * (n - 1) * d * v.proj.shape[1] + 2 * d * v.proj.shape[1]
    return float(total)


def matmul_gflops(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):  # best of 3: the machine is shared, the peak is what the floor needs
        sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 * repeats / best / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_detector(det: AnomalyClipDetector, image: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    det.predict(image)  # warm-up; also computes and caches the text embeddings
    times = []
    res = None
    for _ in range(repeats):
        sync(det.device)
        t = time.perf_counter()
        res = det.predict(image)
        sync(det.device)
        times.append(time.perf_counter() - t)
    assert res is not None
    return min(times), res.anomaly_map


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args(argv)

    print("AnomalyCLIP latency: ViT-L-14-336 architecture, RANDOM weights and prompts (timing only)")
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.device.startswith("cuda"):
        print(cpu_capabilities().summary())
    t = time.perf_counter()
    det = build_anomalyclip(weights=RANDOM_INIT, device=args.device, image_size=args.image_size)
    print(f"build (random init): {time.perf_counter() - t:.1f} s")
    image = np.random.default_rng(0).integers(0, 256, size=(700, 700, 3), dtype=np.uint8)
    flops = anomalyclip_flops_per_image(det)
    print(
        f"processing size {det.image_size} (grid {det.image_size // 14}), feature layers {det.encoder.feature_layers}"
    )
    print(f"FLOPs per image: {flops / 1e12:.3f} TFLOP")

    rows = [("fp32", torch.float32)] + ([] if args.skip_bf16 else [("bf16", torch.bfloat16)])
    bf16 = resolve_precision("bf16", args.device)
    if not args.skip_bf16 and bf16.fallback:
        print(f"bf16: not timed; the detector would run fp32 (timed below): {bf16.fallback}")
        rows = rows[:1]
    maps = {}
    for label, dtype in rows:
        det_p = (
            det
            if label == "fp32"
            else AnomalyClipDetector(
                backbone=det.backbone,
                prompt_learner=det.prompt_learner,
                prompt_tag=det.prompt_tag,
                arch=det.arch,
                device=args.device,
                image_size=det.image_size,
                cache=det.cache,
                precision=label,
                prompts_random=True,
            )
        )
        secs, maps[label] = time_detector(det_p, image, args.repeats)
        gf = matmul_gflops(dtype, args.device)
        floor = flops / (gf * 1e9)
        print(
            f"{label}: {secs:.2f} s/image (batch 1, best of {args.repeats}); matmul {gf:.0f} GFLOP/s now; "
            f"floor {floor:.2f} s; time/floor {secs / floor:.2f}"
        )
    if "bf16" in maps:
        diff = float(np.abs(maps["fp32"] - maps["bf16"]).max())
        print(f"bf16 vs fp32: max |map difference| {diff:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
