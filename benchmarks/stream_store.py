"""The service side of a stream answer: what the bank store costs, next to the model.

For bank entries of a real MuSc size (default: CLIP ViT-L/14 at 518, 4 blocks x 37x37
tokens x 1024 channels in float16 + a 768 embedding: 11.2 MB per image; random values, the
store does not care), on the Redis of ``--redis-url`` (keys under a random prefix, removed
at the end) or on files, it prints:

- ``append``: one accepted image entering the bank (serialise + the WATCH/MULTI transaction
  writing ~11 MB and evicting the oldest), seconds;
- ``refresh (index only)``: what every stream request does when the bank did not change;
- ``refresh (1 new entry)``: after one append by another replica;
- ``cold load``: a replica's first request: the whole bank read and decoded;
- ``concat``: the bank assembled for scoring on the musc worker (one copy).

Compare with ``benchmarks/musc_latency.py`` (seconds of backbone and bank scoring per image).

Usage::

    python benchmarks/stream_store.py [--redis-url redis://127.0.0.1:6379/15] [--files]
        [--bank 32] [--tokens 5476] [--channels 1024] [--blocks 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.base import ReferenceSet
from models.musc import bank_concat
from service.stream import BankBackend, BankMeta, FileBankBackend, RedisBankBackend

MODEL_KEY = "musc/bench/random/518/6-12-18-24"


def entry(i: int, args: argparse.Namespace) -> ReferenceSet:
    rng = np.random.default_rng(i)
    arrays = {
        "tokens": rng.standard_normal((1, args.blocks, args.tokens, args.channels), dtype=np.float32).astype(
            np.float16
        ),
        "embedding": rng.standard_normal((1, 768), dtype=np.float32).astype(np.float16),
        "added_at": np.array([time.time()]),
    }
    return ReferenceSet(method="musc", model_key=MODEL_KEY, image_hashes=(f"{i:016x}",), arrays=arrays)


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def append(backend: BankBackend, e: ReferenceSet, cap: int) -> str:
    blob = e.to_bytes()
    meta = BankMeta(id=uuid.uuid4().hex, hash=e.image_hashes[0], added_at=time.time(), nbytes=len(blob))
    return backend.append(
        "bench", "m", meta, blob, epoch=0, max_images=cap, max_bytes=1 << 40, total_bytes=1 << 40
    ).status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--files", action="store_true", help="the files store (no Redis)")
    ap.add_argument("--bank", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=37 * 37)
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = None
    if args.files:
        tmp = Path(tempfile.mkdtemp(prefix="zsi-stream-bench-"))
        backend: BankBackend = FileBankBackend(tmp)
    else:
        backend = RedisBankBackend(args.redis_url, prefix=f"zsibench:{uuid.uuid4().hex[:8]}:", timeout_s=5.0)
    entries = [entry(i, args) for i in range(args.bank + 1)]
    per_image = len(entries[0].to_bytes())
    print(f"store: {backend.name}; bank {args.bank}; entry {per_image:,} bytes ({per_image / 2**20:.1f} MiB)")
    try:
        t0 = time.perf_counter()
        for e in entries[: args.bank]:
            assert append(backend, e, args.bank) == "added"
        fill = (time.perf_counter() - t0) / args.bank
        extra = [entry(10_000 + i, args) for i in range(args.repeats)]
        t0 = time.perf_counter()
        for e in extra:
            assert append(backend, e, args.bank) == "added"
        t_append = (time.perf_counter() - t0) / len(extra)
        _, metas = backend.read("bench", "m")
        assert len(metas) == args.bank
        t_index, _ = timed(lambda: backend.read("bench", "m"), args.repeats)
        t_one, _ = timed(lambda: backend.blobs("bench", "m", [metas[-1].id]), args.repeats)
        ids = [m.id for m in metas]
        t_cold, blobs = timed(lambda: backend.blobs("bench", "m", ids), 1)
        t_decode, decoded = timed(lambda: [ReferenceSet.from_bytes(b) for b in blobs], 1)
        t_concat, _ = timed(lambda: bank_concat(decoded), args.repeats)
        print(f"append (fill, mean)            {fill:8.3f} s")
        print(f"append (full bank, evicting)   {t_append:8.3f} s  (serialise + transaction)")
        print(f"refresh (index only)           {t_index * 1000:8.2f} ms")
        print(f"refresh (1 new entry)          {(t_index + t_one) * 1000:8.2f} ms")
        print(f"cold load: read {args.bank} entries      {t_cold:8.3f} s")
        print(f"cold load: decode              {t_decode:8.3f} s")
        print(f"concat for scoring             {t_concat:8.3f} s")
    finally:
        backend.clear("bench")
        with_redis = isinstance(backend, RedisBankBackend)
        if with_redis:
            for key in backend.client.scan_iter(match=f"{backend.prefix}*"):
                backend.client.delete(key)
        backend.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
