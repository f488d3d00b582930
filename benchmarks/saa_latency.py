"""SAA+ latency per stage on this machine: REAL architectures, RANDOM weights.

    python benchmarks/saa_latency.py                 # SAM vit_b, CPU, 1 warm-up + 1 timed run (~5 min here)
    python benchmarks/saa_latency.py --dino-size 400 # quicker: GroundingDINO dominates on a CPU
    python benchmarks/saa_latency.py --sam vit_h --device cuda

Random weights make GroundingDINO return confident boxes everywhere, so the number
of boxes it proposes is meaningless; SAM decoding and rescoring are therefore timed
on a fixed number of boxes (``--boxes``, default 10, one batched decode call).
SAM vit_h is the default of the service and a GPU method: on a CPU, vit_b is what
fits in a few minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from models import RANDOM_INIT
from models.saa import SaaSettings, build_saa_plus, hybrid
from models.saa.sam import decode_boxes, embed_image
from prompts import get_builtin_product
from prompts.saa import resolve_saa_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512, help="square input image side (pixels)")
    ap.add_argument("--dino-size", type=int, default=800, help="GroundingDINO short side (reference 800)")
    ap.add_argument("--boxes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--product", default="carpet")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t = time.perf_counter()
    det = build_saa_plus(
        weights=RANDOM_INIT,
        device=args.device,
        sam_variant=args.sam,
        settings=SaaSettings(dino_size=args.dino_size),
    )
    build_s = time.perf_counter() - t
    product = get_builtin_product(args.product)
    prompts = resolve_saa_prompts(product.object_name, product.saa)
    img = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, args.size * 0.7, (args.boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, args.size * 0.3, (args.boxes, 2))], axis=1).astype(
        np.float32
    )

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    stages: dict[str, list[float]] = {}
    proposed = 0
    for run in range(args.repeats + 1):
        times: dict[str, float] = {}
        with torch.no_grad():
            props, t_dino = det.propose(img, prompts)
            proposed = len(props.defects)
            times.update(t_dino)
            sync()
            t0 = time.perf_counter()
            emb = embed_image(det.sam, img)
            sync()
            t1 = time.perf_counter()
            masks = decode_boxes(det.sam, emb, boxes)
            sync()
            t2 = time.perf_counter()
            sal = det.saliency(img, masks[:0], prompts.object_count)
            sync()
            t3 = time.perf_counter()
            s, _ = hybrid.rescore(rng.uniform(0.1, 0.5, args.boxes), masks, sal)
            order = hybrid.top_k(s, prompts.max_anomalies)
            hybrid.to_unit_interval(hybrid.anomaly_map(masks[order], s[order]))
            t4 = time.perf_counter()
        times.update(sam_image=t1 - t0, sam_decode=t2 - t1, saliency=t3 - t2, map=t4 - t3)
        times["total"] = sum(times.values())
        if run == 0:
            continue  # warm-up
        for k, v in times.items():
            stages.setdefault(k, []).append(v)

    print("SAA+ latency per stage -- REAL architectures with RANDOM weights (not an inspection result)")
    print(
        f"device={args.device} threads={torch.get_num_threads()} sam={args.sam} image={args.size}x{args.size} "
        f"dino_short_side={args.dino_size} captions={1 + len(prompts.defect_prompts)} ({args.product}) "
        f"sam_boxes={args.boxes} repeats={args.repeats} (+1 warm-up) build={build_s:.1f}s"
    )
    print(f"(random GroundingDINO proposed {proposed} defect boxes after the filters: not representative)")
    for k, v in stages.items():
        print(f"  {k:<16} median {statistics.median(v) * 1000:9.1f} ms   min {min(v) * 1000:9.1f} ms")
    if args.sam != "vit_h":
        print(
            "note: the service default is SAM vit_h, a GPU method; its image encoder is several times slower."
        )


if __name__ == "__main__":
    main()
