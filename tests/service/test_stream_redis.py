"""Stream banks on a real Redis: replicas share one bank; budgets and concurrency; an outage."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import pytest

from models.base import ReferenceSet
from service.stream import BankMeta, RedisBankBackend
from tests.service.conftest import png_bytes
from tests.service.stream_helpers import RAW, part, planted_factory, stream_product
from tests.service.test_redis_shared import _free_port, needs_redis_server, start_redis, stop_redis

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]
METHODS = ("winclip", "musc")


def post(client, image, product="gear"):
    r = client.post(f"/inspect?product={product}", content=png_bytes(image), headers=RAW)
    assert r.status_code == 200, r.text
    return r.json()


def bank_keys(redis_url, key_prefix, product="gear"):
    """(index metas, entry keys) of the product's bank, read straight from Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = sorted(
            k.decode() for k in client.scan_iter(match=f"{key_prefix}stream:{product}:*", count=500)
        )
        indexes = [k for k in keys if k.endswith(":index")]
        assert len(indexes) <= 1, indexes
        metas = [BankMeta.from_json(x) for x in client.lrange(indexes[0], 0, -1)] if indexes else []
        entries = {k: client.get(k) for k in keys if ":e:" in k}
        totals = {
            (f if isinstance(f, str) else f.decode()): int(v)
            for f, v in client.hgetall(f"{key_prefix}stream:bytes").items()
        }
    finally:
        client.close()
    return metas, entries, totals


def check_bank(redis_url, key_prefix, capacity):
    """Invariants: count <= capacity, one entry key per index item (none leaked), every entry decodes
    to one image whose hash is the index's, no hash twice, the byte total matches."""
    metas, entries, totals = bank_keys(redis_url, key_prefix)
    assert all(m is not None for m in metas)
    assert len(metas) <= capacity
    assert len(entries) == len(metas)
    hashes = [m.hash for m in metas]
    assert len(set(hashes)) == len(hashes)
    for m in metas:
        blob = next(v for k, v in entries.items() if k.endswith(f":e:{m.id}"))
        ref = ReferenceSet.from_bytes(blob)
        assert ref.count == 1 and ref.image_hashes == (m.hash,) and len(blob) == m.nbytes
        assert np.isfinite(ref.arrays["tokens"].astype(np.float32)).all()
    assert sum(totals.values()) == sum(m.nbytes for m in metas)
    return metas


def test_two_replicas_share_one_bank(app_client, redis_url, key_prefix):
    settings = {
        "redis_url": redis_url,
        "key_prefix": key_prefix,
        "methods": METHODS,
        "factory": planted_factory,
    }
    with app_client(**settings) as (a, _), app_client(**settings) as (b, _):
        assert a.put("/products/gear", json=stream_product(bank=6, min_bank=3)).status_code == 201
        from_a = [post(a, part(i)) for i in range(2)]
        assert [x["bank_size"] for x in from_a] == [1, 2]
        seen_by_b = b.get("/products/gear/stream").json()
        assert seen_by_b["store"] == "redis" and seen_by_b["size"] == 2
        assert seen_by_b["image_hashes"] == [x["image"]["sha256_16"] for x in from_a]
        from_b = post(b, part(2))
        assert from_b["warming_up"] is True and from_b["bank_size"] == 3
        # A now answers with MuSc against all three (one of them appended by B)
        on_a = post(a, part(3))
        assert on_a["warming_up"] is False and on_a["method"] == "musc"
        assert on_a["stream"]["scored_against"] == 3 and on_a["bank_size"] == 4
        assert b.get("/products/gear/stream").json()["image_hashes"][-1] == on_a["image"]["sha256_16"]
        # a reset on B is seen by A
        assert b.delete("/products/gear/stream").json()["deleted_images"] == 4
        after = post(a, part(4))
        assert after["warming_up"] is True and after["bank_size"] == 1
        check_bank(redis_url, key_prefix, 6)


def test_concurrent_requests_on_two_replicas_do_not_corrupt_the_bank(app_client, redis_url, key_prefix):
    settings = {
        "redis_url": redis_url,
        "key_prefix": key_prefix,
        "methods": METHODS,
        "factory": planted_factory,
    }
    with app_client(**settings) as (a, _), app_client(**settings) as (b, _):
        a.put("/products/gear", json=stream_product(bank=6, min_bank=2))
        # 16 clients at once, alternating replicas; seeds 0..11 distinct, 12..15 repeat 0..3 (duplicates)
        jobs = [(a if i % 2 else b, part(i % 12, defect=(i % 12 == 11))) for i in range(16)]
        start = threading.Barrier(16)

        def run(job):
            client, image = job
            start.wait()
            return post(client, image)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(run, jobs))
        metas = check_bank(redis_url, key_prefix, capacity=6)
        defect_hash = next(
            x["image"]["sha256_16"] for x, (_, img) in zip(answers, jobs, strict=True) if img[0, 0, 0] == 255
        )
        assert defect_hash not in [m.hash for m in metas]
        added = sum(x["stream"]["appended"] == "added" for x in answers)
        assert added >= 6 and len(metas) == 6
        assert all(x["bank_size"] <= 6 for x in answers)
        assert {x["stream"]["appended"] for x in answers} <= {
            "added",
            "duplicate",
            "rejected_anomalous",
        }
        # each replica's view is the store's
        for client in (a, b):
            assert client.get("/products/gear/stream").json()["image_hashes"] == [m.hash for m in metas]


def test_store_level_appends_from_16_threads(redis_url, key_prefix):
    """The append transaction under contention: never more than max_images, nothing leaked, every
    hash once, the byte total exact; a total budget refuses what does not fit."""
    backend = RedisBankBackend(redis_url, prefix=key_prefix, timeout_s=1.0)
    blob_of = {}

    def entry(i):
        arrays = {
            "tokens": np.full((1, 1, 4, 3), i, np.float16),
            "embedding": np.zeros((1, 2), np.float16),
            "added_at": np.array([time.time()]),
        }
        ref = ReferenceSet(
            method="musc", model_key="musc/x", image_hashes=(f"h{i % 40:014d}",), arrays=arrays
        )
        blob = ref.to_bytes()
        blob_of[i] = blob
        return BankMeta(
            id=f"e{i:05d}", hash=ref.image_hashes[0], added_at=time.time(), nbytes=len(blob)
        ), blob

    start = threading.Barrier(16)

    def worker(t):
        start.wait()
        out = []
        for j in range(6):
            meta, blob = entry(t * 6 + j)
            out.append(
                backend.append(
                    "gear", "m1", meta, blob, epoch=0, max_images=5, max_bytes=1 << 30, total_bytes=1 << 30
                ).status
            )
        return out

    try:
        with ThreadPoolExecutor(16) as pool:
            results = [s for r in pool.map(worker, range(16)) for s in r]
        assert results.count("added") >= 40 - 1 and set(results) <= {"added", "duplicate"}
        metas = check_bank(redis_url, key_prefix, capacity=5)
        assert len(metas) == 5
        # the total budget: another bank may not push the sum over it
        used = sum(m.nbytes for m in metas)
        meta, blob = entry(999)
        tight = backend.append(
            "other", "m1", meta, blob, epoch=0, max_images=5, max_bytes=1 << 30, total_bytes=used
        )
        assert tight.status == "budget"
        # an append prepared before a reset is dropped
        n, epoch = backend.clear("gear")
        assert n == 5 and epoch == 1
        late = backend.append(
            "gear", "m1", meta, blob, epoch=0, max_images=5, max_bytes=1 << 30, total_bytes=1 << 30
        )
        assert late.status == "reset"
        assert backend.read("gear", "m1") == (1, [])
    finally:
        backend.close()


@needs_redis_server
def test_redis_outage_stream_answers_keep_working(app_client, tmp_path):
    port = _free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    settings = {
        "redis_url": url,
        "redis_timeout_s": 0.2,
        "redis_retry_s": 0.3,
        "methods": METHODS,
        "factory": planted_factory,
    }
    try:
        with app_client(**settings) as (client, _):
            assert client.put("/products/gear", json=stream_product(bank=5, min_bank=2)).status_code == 201
            post(client, part(1))
            post(client, part(2))
            stop_redis(server)
            during = post(client, part(3))  # the product itself is read from the local copy too
            assert during["method"] == "musc" and during["stream"]["scored_against"] == 2
            assert during["stream"]["appended"] == "skipped_store_unavailable"
            assert during["stream"]["store_available"] is False and during["stream"]["warnings"]
            assert during["bank_size"] == 2
            defect = post(client, part(4, defect=True))
            assert defect["decision"] == "anomalous"
            status = client.get("/products/gear/stream")
            assert status.status_code == 200 and status.json()["store_available"] is False
            assert status.json()["size"] == 2
            refused = client.delete("/products/gear/stream")
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
            assert "skipped_store_unavailable" in status.json()["appends_this_replica"]
            metrics = client.get("/metrics").text
            assert 'zsi_stream_bank_appends_total{result="skipped_store_unavailable"}' in metrics

            server = start_redis(port, tmp_path)  # back, empty (no persistence): the product is gone
            time.sleep(0.4)
            assert client.put("/products/gear", json=stream_product(bank=5, min_bank=2)).status_code == 201
            back = post(client, part(5))
            assert back["stream"]["store_available"] is True and back["warming_up"] is True
            assert back["bank_size"] == 1
    finally:
        stop_redis(server)


def _corrupt_total(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('zsi_cache_corrupt_total{kind="stream_bank"}'):
            return float(line.split()[-1])
    return 0.0


def test_corrupt_bank_bookkeeping_is_read_as_absent_repaired_and_counted(app_client, redis_url, key_prefix):
    """A bank epoch, byte total or index item that is not what it should be made every answer of the
    product, its GET /stream a 500 and its reset a 503 (INCR on a non-integer) until an operator
    cleaned Redis by hand; each must read as absent, be repaired by the next append or reset, and
    be counted."""
    import redis

    direct = redis.Redis.from_url(redis_url)
    settings = {
        "redis_url": redis_url,
        "key_prefix": key_prefix,
        "methods": METHODS,
        "factory": planted_factory,
    }
    with app_client(**settings) as (client, _):
        assert client.put("/products/gear", json=stream_product(bank=6, min_bank=2)).status_code == 201
        post(client, part(1))
        post(client, part(2))
        (index,) = [k for k in direct.scan_iter(match=f"{key_prefix}stream:gear:*:index", count=500)]
        epoch_key, bytes_key = f"{key_prefix}stream:gear:epoch", f"{key_prefix}stream:bytes"
        (field,) = direct.hkeys(bytes_key)
        direct.set(epoch_key, b"not a number")
        direct.hset(bytes_key, field, b"lots")
        direct.rpush(index, b"[1, 2]")
        status = client.get("/products/gear/stream")
        assert status.status_code == 200, status.text
        assert status.json()["size"] == 2 and status.json()["epoch"] == 0
        answer = post(client, part(3))  # scored against the 2 good entries, appended; repairs the rest
        assert answer["stream"]["scored_against"] == 2 and answer["stream"]["appended"] == "added"
        assert direct.get(epoch_key) == b"0" and int(cast(bytes, direct.hget(bytes_key, field))) > 0
        assert direct.llen(index) == 3  # the corrupt item dropped, the new entry added
        assert _corrupt_total(client.get("/metrics").text) == 3.0
        direct.set(epoch_key, b"-")
        reset = client.delete("/products/gear/stream")
        assert reset.status_code == 200, reset.text
        assert reset.json()["deleted_images"] == 3 and reset.json()["epoch"] == 1
        assert _corrupt_total(client.get("/metrics").text) == 4.0
        again = post(client, part(4))
        assert again["warming_up"] is True and again["stream"]["appended"] == "added"
    direct.close()
