"""WinCLIP through the HTTP service vs a direct call, and throughput under concurrency.

Starts the real service (uvicorn, batching queue, JSON answer with the map PNG and
regions) in a subprocess, on the REAL ``ViT-B-16-plus-240`` architecture with
RANDOM weights injected through ``create_app(detector_factory=...)`` (timing only:
every answer is labelled random-init). Prints:

- direct ``detector.predict`` seconds at batch 1 (same process layout, no HTTP);
- HTTP end-to-end seconds at batch 1 (one client, sequential requests) and the ratio;
- throughput (images/s) and mean latency with 1, 4 and 8 concurrent clients.

Usage::

    python benchmarks/service_throughput.py [--device cpu|cuda] [--precision fp32|bf16] [--requests 2]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _serve(port: int, device: str, precision: str, max_batch: int) -> None:
    """Server side: the app on a full-size random-init WinCLIP."""
    import uvicorn

    import models
    from service.app import create_app
    from service.settings import Settings

    def factory(method: str, *, settings: Settings, device: str, cache: models.ArrayCache) -> models.Detector:
        return models.load_detector(
            method, weights=models.RANDOM_INIT, device=device, cache=cache, precision=precision
        )

    settings = Settings(
        methods=("winclip",),
        device=device,
        redis_url=None,
        max_batch=max_batch,
        request_timeout_s=3600,
        queue_size=64,
        data_dir=Path(os.environ.get("TMPDIR", "/tmp")) / f"zsi-bench-{port}",
    )
    uvicorn.run(
        create_app(settings, detector_factory=factory), host="127.0.0.1", port=port, log_level="warning"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument(
        "--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"), help="camera image size"
    )
    ap.add_argument("--requests", type=int, default=2, help="requests per client in the concurrency runs")
    ap.add_argument(
        "--repeats", type=int, default=3, help="sequential batch-1 requests (min and mean reported)"
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.device, args.precision, args.max_batch)
        return 0

    import httpx

    import models

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*args.size, 3), dtype=np.uint8)
    body = _png(image)
    print(
        f"device {args.device}, precision {args.precision}, image {args.size[1]}x{args.size[0]} PNG ({len(body)} bytes)"
    )
    print("model: ViT-B-16-plus-240 on RANDOM weights (timing only; answers are labelled random-init)")

    # direct call, batch 1, in this process (the server is not started yet: no contention)
    det = models.load_detector(
        "winclip", weights=models.RANDOM_INIT, device=args.device, precision=args.precision
    )
    fallback = det.describe().get("precision_fallback")
    if fallback:
        print(f"precision: {fallback}")
    det.predict(image, object_name="bottle")  # prototypes + warm-up
    direct = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        det.predict(image, object_name="bottle")
        direct.append(time.perf_counter() - t0)
    del det

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--device",
            args.device,
            "--precision",
            args.precision,
            "--max-batch",
            str(args.max_batch),
        ],
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=3600) as client:
            deadline = time.time() + 600
            while True:
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("server did not become ready")
                time.sleep(0.5)

            def post() -> float:
                t0 = time.perf_counter()
                r = client.post(
                    "/inspect?product=bottle", content=body, headers={"Content-Type": "image/png"}
                )
                r.raise_for_status()
                doc = r.json()
                assert doc.get("weights") == models.RANDOM_INIT, (
                    "benchmark must run on labelled random weights"
                )
                return time.perf_counter() - t0

            post()  # warm-up: text prototypes, first batch
            http = [post() for _ in range(args.repeats)]
            print()
            print(
                f"direct detector.predict, batch 1: min {min(direct):.3f} s, mean {statistics.mean(direct):.3f} s"
            )
            print(
                f"HTTP POST /inspect end-to-end, batch 1: min {min(http):.3f} s, mean {statistics.mean(http):.3f} s"
            )
            print(
                f"HTTP / direct: {min(http) / min(direct):.3f} (min), {statistics.mean(http) / statistics.mean(direct):.3f} (mean)"
            )

            print()
            print("clients  requests  wall s  images/s  mean latency s")
            for n in args.clients:
                lat: list[float] = []
                lock = threading.Lock()

                def worker(lat: list[float] = lat, lock: threading.Lock = lock) -> None:
                    for _ in range(args.requests):
                        s = post()
                        with lock:
                            lat.append(s)

                threads = [threading.Thread(target=worker) for _ in range(n)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                total = n * args.requests
                print(f"{n:7d}  {total:8d}  {wall:6.1f}  {total / wall:8.3f}  {statistics.mean(lat):14.2f}")
            metrics = client.get("/metrics").text
            batches = [
                ln
                for ln in metrics.splitlines()
                if ln.startswith("zsi_batch_size") and not ln.startswith("#")
            ]
            if batches:
                print("\nbatch-size metric lines:", *batches[:6], sep="\n  ")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
