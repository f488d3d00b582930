"""MuSc latency on this machine: batch mode and stream mode, backbone pass and bank scoring apart.

Real architectures on RANDOM weights: TIMING ONLY, the scores mean nothing.

- ``ViT-L-14-336`` (open_clip, 24 blocks, width 1024) at 518: 37x37 grid, blocks 6/12/18/24.
- ``dinov2_vitb14`` (timm DINOv2 ViT-B/14, width 768) at 518: 37x37 grid, blocks 3/6/9/12.

For each backbone it prints, in seconds per image:

- backbone pass (fp32 and bf16), batched over ``--backbone-images`` images;
- batch mode (``--batch``, official 32 in the issue): LNAMD + MSM + RsCIN of the whole
  batch divided by the batch size (every image against the ``B - 1`` others);
- stream mode: one image (batch 1) against a bank of ``--bank`` images: the backbone
  pass of that image, and the bank scoring (LNAMD of the bank + MSM against it).

Scoring (LNAMD, MSM: ``cdist`` in float32 as the official code) does not depend on the
backbone precision, so it is timed once. Its cost does not depend on the feature
values either: the batch and the bank are made of the ``--backbone-images`` encoded
images plus small noise, so that a batch of 32 does not need 32 backbone passes.

Usage::

    python benchmarks/musc_latency.py [--backbone ViT-L-14-336 dinov2_vitb14] [--batch 32]
        [--bank 32] [--backbone-images 4] [--repeats 1] [--skip-bf16] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import RANDOM_INIT, ReferenceSet
from models.musc import MuscDetector, build_musc


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, and the last call's result."""
    times = []
    out: object = None
    for _ in range(max(1, repeats)):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times), out


def msm_flops(det: MuscDetector, n_pairs: float) -> float:
    """cdist FLOPs (2 per multiply-add) of ``n_pairs`` image pairs over all blocks and degrees."""
    n = det.grid[0] * det.grid[1]
    return 2.0 * n * n * det.token_dim * len(det.feature_layers) * len(det.config.r_list) * n_pairs


def widen(
    normed: torch.Tensor, emb: torch.Tensor, count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` feature sets from the encoded ones (repeated, plus small noise)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(count) % normed.shape[0]
    n = normed[idx] + 0.01 * torch.randn(normed[idx].shape, generator=g)
    e = emb[idx] + 0.01 * torch.randn(emb[idx].shape, generator=g)
    return n, e


def with_precision(det: MuscDetector, precision: str) -> MuscDetector:
    return MuscDetector(
        encoder=det.encoder,
        model_name=det.model_name,
        weights_tag=det.weights_tag,
        random_weights=det.random_weights,
        config=det.config,
        mean=det.mean,
        std=det.std,
        interpolation=det.interpolation,
        device=det.device,
        precision=precision,
        bank_dtype=det.bank_dtype,
    )


def run_backbone(name: str, args: argparse.Namespace) -> None:
    t = time.perf_counter()
    # the bank as the service stores it (float16; the model default float32 is exact)
    det = build_musc(
        weights=RANDOM_INIT,
        device=args.device,
        backbone=name,
        image_size=args.image_size,
        bank_dtype="float16",
    )
    print(f"\n== {name}: RANDOM weights (timing only), build {time.perf_counter() - t:.1f} s")
    n_tokens = det.grid[0] * det.grid[1]
    print(
        f"processing size {det.config.image_size} (grid {det.grid[0]}x{det.grid[1]}), blocks {det.feature_layers}, "
        f"r {det.config.r_list}, width {det.token_dim}; bank {det.bytes_per_image:,} bytes/image "
        f"({det.bank_dtype}), {args.bank} images = {args.bank * det.bytes_per_image / 2**20:.0f} MiB"
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (600, 600, 3), dtype=np.uint8) for _ in range(args.backbone_images)]
    query = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)

    precisions = ["fp32"] + ([] if args.skip_bf16 else ["bf16"])
    normed = emb = None
    backbone_batch: dict[str, float] = {}
    backbone_one: dict[str, float] = {}
    for p in precisions:
        d = det if p == "fp32" else with_precision(det, p)
        if d.precision != p:
            print(f"{p}: not supported natively on this CPU, skipped")
            continue
        d.features(images[:1])  # warm-up
        secs, feats = best_of(partial(d.features, images), args.repeats, args.device)
        backbone_batch[p] = secs / len(images)
        backbone_one[p], _ = best_of(partial(d.features, [query]), args.repeats, args.device)
        if p == "fp32":
            normed, emb = cast(tuple[torch.Tensor, torch.Tensor], feats)
        print(
            f"backbone {p}: {backbone_batch[p]:.2f} s/image batched ({len(images)} images), "
            f"{backbone_one[p]:.2f} s for one image"
        )
    assert normed is not None and emb is not None

    # batch mode: every image against the B-1 others (each pair's cdist computed once)
    bn, be = widen(normed, emb, args.batch, seed=1)
    batch_secs, _ = best_of(partial(det.score_features, bn, be), args.repeats, args.device)
    pairs = args.batch * (args.batch - 1) / 2
    print(
        f"batch mode B={args.batch}: scoring (LNAMD+MSM+RsCIN) {batch_secs:.1f} s = {batch_secs / args.batch:.2f} "
        f"s/image; cdist {msm_flops(det, pairs) / 1e12:.2f} TFLOP, "
        f"{msm_flops(det, pairs) / batch_secs / 1e9:.0f} GFLOP/s"
    )
    for p in backbone_batch:
        print(f"  batch mode total {p}: {backbone_batch[p] + batch_secs / args.batch:.2f} s/image")

    # stream mode: one image against a bank
    kn, ke = widen(normed, emb, args.bank, seed=2)
    dt = np.float16 if det.bank_dtype == "float16" else np.float32
    bank = ReferenceSet(
        method="musc",
        model_key=det.model_key,
        image_hashes=tuple(f"h{i}" for i in range(args.bank)),
        arrays={
            "tokens": kn.numpy().astype(dt),
            "embedding": ke.numpy().astype(dt),
            "added_at": np.zeros(args.bank, dtype=np.float64),
        },
    )
    qn, qe = normed[:1], emb[:1]
    stream_secs, _ = best_of(partial(det.score_features, qn, qe, bank=bank), args.repeats, args.device)
    print(
        f"stream mode, bank {args.bank}: bank scoring {stream_secs:.2f} s/image; cdist "
        f"{msm_flops(det, args.bank) / 1e12:.2f} TFLOP, {msm_flops(det, args.bank) / stream_secs / 1e9:.0f} GFLOP/s"
    )
    for p in backbone_one:
        print(f"  stream mode total {p}: {backbone_one[p] + stream_secs:.2f} s/image (batch 1)")
    blob = len(bank.to_bytes())
    print(f"bank blob ({args.bank} images, to_bytes): {blob / 2**20:.1f} MiB; tokens per image {n_tokens}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", nargs="+", default=["ViT-L-14-336", "dinov2_vitb14"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=None, help="default: the official 518")
    ap.add_argument("--batch", type=int, default=32, help="batch-mode batch size (issue: 32)")
    ap.add_argument("--bank", type=int, default=32, help="stream-mode bank size (issue: 32)")
    ap.add_argument("--backbone-images", type=int, default=4, help="images actually encoded")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows during a long run
    if args.batch < 2 or args.bank < 1 or args.backbone_images < 1:
        ap.error("--batch >= 2, --bank >= 1 and --backbone-images >= 1")
    print("MuSc latency: real architectures, RANDOM weights (timing only)")
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.backbone:
        run_backbone(name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
