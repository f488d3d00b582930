"""WinCLIP latency on this machine vs the FLOP floor measured in the same run.

Real ``ViT-B-16-plus-240`` architecture on RANDOM weights (timing only: random
weights give no meaningful scores). Prints, for fp32 and bf16:

- seconds per image at batch 1 and batch 8 (text prototypes cached, as in service);
- the matmul throughput of this machine measured now (GFLOP/s, fp32 and bf16);
- the model's FLOPs per image counted from its configuration, the resulting floor
  (FLOPs / matmul throughput) and the ratio time / floor;
- bf16 vs fp32: time ratio and the max abs difference of the anomaly maps;
- on CPU, fp32 with oneDNN-prepacked weights vs plain torch (``F.linear``) at batch 1,
  and which one ``models/cpu.py`` chose for this CPU.

Where the CPU has no native bf16 (AVX2-only, AVX-512 without BF16) the detector
runs bf16 requests in fp32: bf16 is then not timed and the fallback is printed.

Usage::

    python benchmarks/winclip_latency.py [--device cpu|cuda] [--repeats 3] [--skip-bf16]
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
from models.cpu import cpu_capabilities, resolve_precision
from models.winclip.detector import WinClipDetector
from models.winclip.encoder import PackedTower, VisualTower


def vit_flops(width: int, layers: int, seq_len: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one sequence through a pre-LN ViT stack."""
    d, n = width, seq_len
    per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * int(mlp_ratio * d)
    return float(layers * per_layer)


def winclip_flops_per_image(det: WinClipDetector) -> float:
    v = det.clip.visual
    width = v.conv1.out_channels
    layers = len(v.transformer.resblocks)
    mlp_ratio = v.transformer.resblocks[0].mlp.c_fc.out_features / width
    n_patches = det.encoder.n_patches
    embed_dim = v.proj.shape[1]
    patch_dim = v.conv1.in_channels * v.conv1.kernel_size[0] * v.conv1.kernel_size[1]
    total = 2.0 * n_patches * patch_dim * width  # patch embedding
    total += vit_flops(width, layers, 1 + n_patches, mlp_ratio) + 2 * width * embed_dim
    for k in det.scales:
        n_win = det.encoder.masks[k].shape[0]
        total += n_win * (vit_flops(width, layers, 1 + k * k, mlp_ratio) + 2 * width * embed_dim)
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate(fn, flops: float, seconds: float, device: str) -> float:
    for _ in range(3):
        fn()
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
    sync(device)
    return flops * reps / (time.perf_counter() - t0) / 1e9


def matmul_gflops(dtype: torch.dtype, device: str, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """Best sustained GEMM throughput for ``[m, k] @ [k, n]`` in GFLOP/s.

    Tries every GEMM this torch build offers for the shape (the BLAS call behind
    ``torch.mm`` and, on CPU, oneDNN with a prepacked weight) and keeps the best:
    the floor is what the hardware can do, not what one library does.
    """
    a = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    wt = w.t()
    flops = 2.0 * m * k * n
    best = _rate(lambda: a @ wt, flops, seconds, device)
    caps = cpu_capabilities()
    if device == "cpu" and caps.onednn_linear and (dtype == torch.float32 or caps.onednn_bf16):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        best = max(
            best,
            _rate(
                lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""),
                flops,
                seconds,
                device,
            ),
        )
    return best


def model_gemms(det: WinClipDetector, batch: int) -> list[tuple[int, int, int, int]]:
    """The model's dense GEMMs for one batch: ``(m, k, n, count)`` (count = layers)."""
    v = det.clip.visual
    d = v.conv1.out_channels
    hidden = v.transformer.resblocks[0].mlp.c_fc.out_features
    layers = len(v.transformer.resblocks)
    seqs = [(1, 1 + det.encoder.n_patches)] + [(det.encoder.masks[k].shape[0], 1 + k * k) for k in det.scales]
    out = []
    for n_seq, length in seqs:
        m = batch * n_seq * length
        out += [(m, d, 3 * d, layers), (m, d, d, layers), (m, d, hidden, layers), (m, hidden, d, layers)]
    return out


def gemm_floor_seconds(
    det: WinClipDetector, batch: int, dtype: torch.dtype, device: str
) -> tuple[float, float]:
    """Time the model's own GEMMs would take at this machine's measured throughput.

    Returns ``(seconds per image, FLOPs per image in those GEMMs)``. Attention
    score/value products (a few % of FLOPs) are charged at the mean GEMM rate.
    """
    seconds, gemm_flops = 0.0, 0.0
    for m, k, n, count in model_gemms(det, batch):
        rate = matmul_gflops(dtype, device, m, k, n, seconds=0.4) * 1e9
        f = 2.0 * m * k * n * count
        seconds += f / rate
        gemm_flops += f
    return seconds / batch, gemm_flops / batch


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def time_batch(
    det: WinClipDetector, images: list[np.ndarray], repeats: int, device: str
) -> tuple[float, list]:
    det.predict_batch(images[:1], object_name="bottle")  # warm-up (prototypes cached, kernels ready)
    times, results = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        results = det.predict_batch(images, object_name="bottle")
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) / len(images), results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (min is reported)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--fp16", action="store_true", help="also time fp16 (CUDA only)")
    args = ap.parse_args(argv)
    dev = args.device

    torch.manual_seed(0)
    print(
        f"device: {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}; cpus {os.cpu_count()}"
    )
    if dev.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    if not dev.startswith("cuda"):
        print(cpu_capabilities().summary())
    print("model: ViT-B-16-plus-240, RANDOM weights (timing only, scores are meaningless)")
    fp32 = models.load_detector("winclip", weights=models.RANDOM_INIT, device=dev)
    assert isinstance(fp32, WinClipDetector)
    flops = winclip_flops_per_image(fp32)
    print(f"FLOPs per image (counted from the config): {flops / 1e12:.3f} TFLOP")

    precisions = ["fp32"] + ([] if args.skip_bf16 else ["bf16"])
    bf16 = resolve_precision("bf16", dev)
    if "bf16" in precisions and bf16.fallback:
        print(f"bf16: not timed; the detector would run fp32 (timed below): {bf16.fallback}")
        precisions.remove("bf16")
    if args.fp16 and dev.startswith("cuda"):
        precisions.append("fp16")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def measure_peak() -> dict[str, float]:
        return {
            p: max(
                matmul_gflops(dtypes[p], dev, 4096, 4096, 4096),
                matmul_gflops(dtypes[p], dev, 2896, 896, 3584),
            )
            for p in precisions
        }

    peak = measure_peak()  # measured again after the model runs; the larger value is kept
    for p, g in peak.items():
        print(f"peak matmul throughput {p} (best GEMM of 4096^3 and 2896x896x3584): {g:.1f} GFLOP/s")

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240, 240, 3), dtype=np.uint8) for _ in range(max(args.batch))]
    detectors = {"fp32": fp32}
    for p in precisions[1:]:
        detectors[p] = WinClipDetector(backbone=fp32.backbone, device=dev, precision=p, cache=fp32.cache)

    rows = []
    timed = []
    maps: dict[tuple[str, int], list] = {}
    for p in precisions:
        for b in args.batch:
            sec, res = time_batch(
                detectors[p], images[:b], args.repeats if b == 1 else max(1, args.repeats - 1), dev
            )
            maps[(p, b)] = res
            shape_floor, gemm_flops = gemm_floor_seconds(detectors[p], b, dtypes[p], dev)
            timed.append((p, b, sec, shape_floor, gemm_flops))
    again = measure_peak()
    peak = {p: max(peak[p], again[p]) for p in precisions}
    for p, g in peak.items():
        print(f"peak matmul throughput {p}, best of the measurements before and after: {g:.1f} GFLOP/s")
    for p, b, sec, shape_floor, gemm_flops in timed:
        rows.append((p, b, sec, flops / (peak[p] * 1e9), shape_floor, gemm_flops / flops))
    print()
    print("floor A = counted FLOPs / peak matmul throughput measured above")
    print(
        "floor B = the model's own GEMM shapes timed on their own in this run (the matmul floor of this machine)"
    )
    print("precision  batch  s/image  floorA s/img  time/floorA  floorB s/img  time/floorB")
    for p, b, sec, fa, fb, _ in rows:
        print(
            f"{p:9s}  {b:5d}  {sec:7.3f}  {fa:12.3f}  {ratio(sec, fa):11.3f}  {fb:12.3f}  {ratio(sec, fb):11.3f}"
        )
    base = {b: sec for p, b, sec, *_ in rows if p == "fp32"}
    for p in precisions[1:]:
        for b in args.batch:
            sec = next(r[2] for r in rows if r[0] == p and r[1] == b)
            diff = max(
                float(np.abs(a.anomaly_map - c.anomaly_map).max())
                for a, c in zip(maps[("fp32", b)], maps[(p, b)], strict=True)
            )
            sdiff = max(abs(a.score - c.score) for a, c in zip(maps[("fp32", b)], maps[(p, b)], strict=True))
            print(
                f"{p} vs fp32, batch {b}: time ratio {sec / base[b]:.3f}, max |map diff| {diff:.2e}, max |score diff| {sdiff:.2e}"
            )
    if dev == "cpu" and cpu_capabilities().onednn_linear:
        compare_fp32_kernels(fp32, images[0], args.repeats)
    return 0


def compare_fp32_kernels(det: WinClipDetector, image: np.ndarray, repeats: int) -> None:
    """fp32 batch 1 on the three CPU tower paths, and the path chosen here.

    ``onednn-prepacked`` / ``torch``: one :class:`PackedTower` pass with oneDNN-prepacked
    weights or plain ``F.linear``; ``open_clip``: open_clip's own modules, one pass per scale.
    """
    towers = {
        "onednn-prepacked": lambda: PackedTower(det.clip.visual, prepack=True),
        "torch": lambda: PackedTower(det.clip.visual, prepack=False),
        "open_clip": lambda: VisualTower(det.clip.visual),
    }
    secs, maps = {}, {}
    for label, make in towers.items():
        if label == "onednn-prepacked" and not cpu_capabilities().onednn_linear:
            continue
        d = WinClipDetector(backbone=det.backbone, device="cpu", cache=det.cache, tower=make())
        secs[label], res = time_batch(d, [image], repeats, "cpu")
        maps[label] = res[0].anomaly_map
    chosen = det.kernels
    print()
    print(
        "fp32 tower paths, batch 1: "
        + ", ".join(f"{k} {v:.3f} s/image" for k, v in secs.items())
        + "; max |map diff| between them "
        + f"{max(float(np.abs(a - b).max()) for a in maps.values() for b in maps.values()):.2e}"
    )
    if chosen in secs:
        best = min(secs, key=lambda k: secs[k])
        print(
            f"fp32 path chosen for this CPU ({cpu_capabilities().isa}): {chosen}; "
            f"chosen/fastest time ratio {secs[chosen] / secs[best]:.3f} (fastest: {best})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
