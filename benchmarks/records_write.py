"""What the durable record write costs per /inspect request: local journal vs synchronous SQLite commit.

An answered inspection must be on local disk before the answer leaves. Two ways were
measured, each with a realistic record (a full row as the inspection flow makes it, with
five regions and the stage timings):

- ``journal``: :meth:`service.records.RecordService.persist`, the path the service uses:
  one checksummed JSON line appended to the local journal and ``fdatasync``-ed (group
  commit), while the background writer moves records into SQLite;
- ``sqlite``: one INSERT + COMMIT per request into the SQLite records database (WAL),
  through SQLAlchemy, as a request would do it without a journal.

Each is timed with ``fsync`` (power-loss safe: ``ZSI_RECORDS_FSYNC=true`` /
``synchronous=FULL``) and without (process-crash safe only: ``false`` / ``NORMAL``), from
one thread (sequential requests) and from 8 threads at once (concurrent requests:
the journal shares one fsync among the writers that queued behind it). Prints
milliseconds per request and the ratio sqlite / journal.

Usage::

    python benchmarks/records_write.py [--n 400] [--dir /path/on/the/disk/of/ZSI_DATA_DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sample_record() -> dict[str, Any]:
    from service.records.draft import RecordDraft

    d = RecordDraft(
        output="json",
        product="bottle",
        recipe_digest="3cad27ab7113137e",
        prompt_digest="be886e6a0d1f4f2b",
        method="winclip",
        model="ViT-B-16-plus-240",
        weights="laion400m_e31",
        precision="fp32",
        threshold=0.5,
        threshold_source="product",
        score=0.734251,
        decision="anomalous",
        regions=[
            {
                "x0": 10 * i,
                "y0": 5 * i,
                "x1": 10 * i + 40,
                "y1": 5 * i + 30,
                "area": 900,
                "max_score": 0.9,
                "mean_score": 0.7,
            }
            for i in range(5)
        ],
        batch_size=4,
        timings_ms={
            k: 12.345
            for k in ("read", "decode", "references", "cache", "queue_wait", "inference", "render", "total")
        },
        image_sha256="ab" * 32,
        image_bytes=812_345,
        image_width=1024,
        image_height=1024,
        line="L2",
        station="cam-3",
        part_id="SN-000123",
    )
    return d.as_record()


def timed(fn: Callable[[], None], n: int, threads: int) -> float:
    """Milliseconds per call of ``fn``, ``n`` calls spread over ``threads`` threads."""
    per = n // threads
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(per):
            fn()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return (time.perf_counter() - t0) / (per * threads) * 1e3


def bench_journal(root: Path, fsync: bool, n: int, threads: int) -> float:
    from prometheus_client import CollectorRegistry

    from service.records import RecordService, new_record_id

    svc = RecordService(root, None, fsync=fsync, registry=CollectorRegistry())
    svc.start()
    base = sample_record()
    try:
        ms = timed(lambda: svc.persist({**base, "id": new_record_id()}), n, threads)
        svc.flush(60)
    finally:
        svc.stop()
    return ms


def bench_sqlite(root: Path, fsync: bool, n: int, threads: int) -> float:
    from sqlalchemy import insert

    from service.records import new_record_id
    from service.records.db import default_url, make_engine, upgrade
    from service.records.models import InspectionRecord
    from service.records.store import _row

    engine = make_engine(default_url(root), durable=fsync)
    upgrade(engine)
    table = InspectionRecord.__table__
    base = sample_record()

    def one() -> None:
        row = _row({**base, "id": new_record_id()})
        with engine.begin() as conn:
            conn.execute(insert(table), [row])

    try:
        return timed(one, n, threads)
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="requests per case (default 400)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="zsi-records-bench-", dir=args.dir))
    print(f"records write cost per request, {args.n} requests per case, files under {base}")
    print(f"{'case':<34}{'journal ms':>12}{'sqlite ms':>12}{'sqlite/journal':>16}")
    try:
        for fsync in (True, False):
            for threads in (1, 8):
                label = f"{'fsync' if fsync else 'no fsync'}, {threads} thread{'s' if threads > 1 else ''}"
                j = bench_journal(base / f"j-{fsync}-{threads}", fsync, args.n, threads)
                s = bench_sqlite(base / f"s-{fsync}-{threads}", fsync, args.n, threads)
                print(f"{label:<34}{j:>12.3f}{s:>12.3f}{s / j:>16.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
