"""The batching queue (issue 7): same results as single calls, fewer forward passes, bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models
from models.base import AnomalyResult, Detector, ReferenceSet
from prompts import builtin_products
from service.queue import InferenceQueue, QueueFull, QueueTimeout, batch_key
from tests.service.conftest import make_settings, png_bytes, random_image, wait_ready

pytestmark = pytest.mark.timeout(120)
RAW = {"content-type": "image/png"}


class SlowDetector(Detector):
    """A fake model whose forward pass takes ``delay_s``; score = mean pixel / 255."""

    method = "winclip"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.model_name = "slow-fake"
        self.weights_tag = "none"
        self.device = "cpu"
        self.random_weights = True
        self.batches: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def prompt_digest(self, object_name: str | None = None, product: Any = None) -> str:
        return "fake"

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        object_name: str | None = None,
        product: Any = None,
        references: ReferenceSet | None = None,
    ) -> list[AnomalyResult]:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay_s)
        with self._lock:
            self.in_flight -= 1
            self.batches.append(len(images))
        return [
            AnomalyResult(
                score=float(img.mean() / 255.0),
                anomaly_map=np.full(img.shape[:2], img.mean() / 255.0, np.float32),
                method=self.method,
                model=self.model_name,
                weights=self.weights_tag,
                prompt_digest="fake",
                random_weights=True,
            )
            for img in images
        ]


def test_concurrent_requests_match_single_calls_with_fewer_batches():
    det = models.load_tiny_detector("winclip", device="cpu")
    recipe = builtin_products()["bottle"]
    images = [random_image(100 + i, 40 + 8 * (i % 3), 56) for i in range(8)]
    singles = [det.predict(img, product=recipe) for img in images]

    async def run() -> tuple[list[Any], InferenceQueue]:
        q = InferenceQueue(det, max_batch=8, max_wait_s=0.2, max_size=16)
        q.start()
        try:
            key = batch_key(recipe, None, None)
            return await asyncio.gather(*(q.submit(img, key=key, product=recipe) for img in images)), q
        finally:
            await q.close()

    answers, q = asyncio.run(run())
    assert q.stats.images == 8
    assert q.stats.batches < 8, q.stats.batch_sizes
    for (res, info), want in zip(answers, singles, strict=True):
        assert res.anomaly_map.shape == want.anomaly_map.shape
        assert abs(res.score - want.score) <= 1e-5
        assert np.abs(res.anomaly_map - want.anomaly_map).max() <= 1e-5
        assert info["batch_size"] >= 1


def test_different_products_are_not_batched_together():
    det = SlowDetector(0.01)
    a, b = builtin_products()["bottle"], builtin_products()["cable"]

    async def run() -> None:
        q = InferenceQueue(det, max_batch=8, max_wait_s=0.1, max_size=16)
        q.start()
        try:
            jobs = [
                q.submit(random_image(i), key=batch_key(p, None, None), product=p)
                for i, p in enumerate([a, b, a, b, a])
            ]
            await asyncio.gather(*jobs)
        finally:
            await q.close()

    asyncio.run(run())
    assert sorted(det.batches) == [2, 3]


def test_full_queue_and_deadline():
    det = SlowDetector(0.3)

    async def run() -> None:
        q = InferenceQueue(det, max_batch=1, max_wait_s=0.0, max_size=2)
        q.start()
        try:
            first = asyncio.ensure_future(q.submit(random_image(0), key="k", timeout_s=5))
            await asyncio.sleep(0.05)  # running now
            waiting = [asyncio.ensure_future(q.submit(random_image(i), key="k", timeout_s=5)) for i in (1, 2)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFull) as full:
                await q.submit(random_image(3), key="k", timeout_s=5)
            assert full.value.retry_after_s >= 1
            with pytest.raises(QueueTimeout):
                # the queue has room again only after the first finishes; this one times out waiting
                await asyncio.sleep(0.35)
                await q.submit(random_image(4), key="k", timeout_s=0.1)
            await asyncio.gather(first, *waiting)
        finally:
            await q.close()

    asyncio.run(run())
    assert det.max_in_flight == 1  # one model, one batch at a time


def test_overload_over_http_gets_503_retry_after_and_recovers(app_client):
    det = SlowDetector(0.15)
    data = png_bytes(random_image(5))
    with app_client(
        factory=lambda *a, **k: det, max_batch=1, max_wait_ms=0, queue_size=2, request_timeout_s=20
    ) as (
        client,
        services,
    ):

        def call(_: int) -> Any:
            t = time.monotonic()
            r = client.post("/inspect", content=data, headers=RAW)
            return r.status_code, r.headers.get("retry-after"), r.json(), time.monotonic() - t

        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(call, range(12)))
        codes = [r[0] for r in results]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 1
        for status, retry, body, took in results:
            assert took < 15
            if status == 503:
                assert body["error"]["code"] == "queue_full" and int(retry) >= 1
        assert client.get("/health").status_code == 200
        assert client.post("/inspect", content=data, headers=RAW).status_code == 200
        assert services.methods["winclip"].queue.depth == 0
        assert 'zsi_rejected_total{method="winclip",reason="queue_full"}' in client.get("/metrics").text


def test_request_past_its_deadline_gets_504(app_client):
    det = SlowDetector(1.0)
    with app_client(factory=lambda *a, **k: det, request_timeout_s=0.2) as (client, _):
        r = client.post("/inspect", content=png_bytes(random_image(6)), headers=RAW)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert client.get("/health").status_code == 200


def test_http_concurrency_batches_with_the_real_tiny_model(app_client):
    images = [random_image(200 + i) for i in range(6)]
    with app_client(max_batch=8, max_wait_ms=150) as (client, services):
        det = services.methods["winclip"].detector
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(
                pool.map(
                    lambda im: client.post(
                        "/inspect?product=bottle", content=png_bytes(im), headers=RAW
                    ).json(),
                    images,
                )
            )
        q = services.methods["winclip"].queue
        assert q.stats.images == 6 and q.stats.batches < 6, q.stats.batch_sizes
        recipe = builtin_products()["bottle"]
        for im, a in zip(images, answers, strict=True):
            want = det.predict(im, product=recipe)
            assert abs(a["score"] - want.score) <= 1e-5
            assert a["anomaly_map"]["max"] == pytest.approx(float(want.anomaly_map.max()), abs=1e-5)
        assert max(a["batch_size"] for a in answers) > 1


def test_expiry_seen_by_the_worker_is_a_timeout_not_a_cancellation():
    """The worker finds a job past its deadline before ``submit``'s own timer fires (issue 10, item 2)."""
    det = SlowDetector(0.2)

    async def run() -> None:
        q = InferenceQueue(det, max_batch=1, max_wait_s=0.0, max_size=8)
        q.start()
        try:
            busy = asyncio.ensure_future(q.submit(random_image(0), key="k", timeout_s=5))
            await asyncio.sleep(0.05)  # the worker runs `busy` now
            late = asyncio.ensure_future(q.submit(random_image(1), key="k", timeout_s=5))
            await asyncio.sleep(0)
            q._pending[0].deadline = 0.0  # expired: the worker drops it when `busy` is done
            with pytest.raises(QueueTimeout):
                await late
            await busy
        finally:
            await q.close()

    asyncio.run(run())
    assert det.batches == [1]  # the expired job never ran


def test_a_cancelled_request_still_propagates_cancellation_and_is_skipped():
    det = SlowDetector(0.2)

    async def run() -> None:
        q = InferenceQueue(det, max_batch=1, max_wait_s=0.0, max_size=8)
        q.start()
        try:
            busy = asyncio.ensure_future(q.submit(random_image(0), key="k", timeout_s=5))
            await asyncio.sleep(0.05)
            gone = asyncio.ensure_future(q.submit(random_image(1), key="k", timeout_s=5))
            await asyncio.sleep(0.01)
            gone.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await gone
            await busy
            await asyncio.sleep(0.35)  # long enough for a wrongly kept job to run
        finally:
            await q.close()

    asyncio.run(run())
    assert det.batches == [1]  # the cancelled request's job was skipped


def test_many_short_deadline_requests_get_504_never_500():
    """64 clients at a deadline close to the batch time: every answer is 200, 503 or a JSON 504."""
    det = SlowDetector(0.02)
    settings_kw = {"max_batch": 4, "max_wait_ms": 1.0, "queue_size": 256, "request_timeout_s": 0.05}
    from fastapi.testclient import TestClient

    from service.app import create_app

    data = png_bytes(random_image(3, 16, 16))

    async def hammer(app: Any) -> list[tuple[int, str]]:
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def one(i: int) -> tuple[int, str]:
                try:
                    r = await client.post("/inspect", content=data, headers=RAW)
                except BaseException as exc:  # a CancelledError escaping the app: a 500
                    return 500, type(exc).__name__
                return r.status_code, r.headers.get("content-type", "")

            out: list[tuple[int, str]] = []
            for _ in range(20):
                out += await asyncio.gather(*(one(i) for i in range(64)))
            return out

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(make_settings(Path(tmp), **settings_kw), detector_factory=lambda *a, **k: det)
        with TestClient(app, raise_server_exceptions=False) as client:
            wait_ready(client)
            answers = client.portal.call(hammer, app)
    codes = [c for c, _ in answers]
    assert 500 not in codes, (codes.count(500), len(codes))
    assert set(codes) <= {200, 503, 504}, sorted(set(codes))
    assert codes.count(504) > 0
    assert all(ct.startswith("application/json") for c, ct in answers if c != 200)


class SlowTextDetector(SlowDetector):
    """Like the real WinCLIP: ``predict_batch`` uses cached text prototypes, computed on first use.

    Computing them takes ``text_s`` per product (a product with many prompt states).
    """

    def __init__(self, delay_s: float, text_s: float) -> None:
        super().__init__(delay_s)
        self.text_s = text_s
        self.text_threads: list[str] = []
        self._protos: dict[str, np.ndarray] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._text_lock = threading.Lock()

    def prompt_digest(self, object_name: str | None = None, product: Any = None) -> str:
        return product.id if product is not None else "generic"

    def text_prototypes(self, object_name: str | None = None, product: Any = None) -> np.ndarray:
        digest = self.prompt_digest(object_name, product)
        cached = self._protos.get(digest)
        if cached is not None:
            return cached
        with self._text_lock:  # one lock per prompt set, as WinCLIP has
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            if digest not in self._protos:
                self.text_threads.append(threading.current_thread().name)
                time.sleep(self.text_s)
                self._protos[digest] = np.zeros(2, np.float32)
            return self._protos[digest]

    def predict_batch(self, images, *, object_name=None, product=None, references=None):
        self.text_prototypes(object_name, product)
        return super().predict_batch(images, object_name=object_name, product=product, references=references)


def test_one_products_text_encoding_does_not_block_other_products(app_client):
    """Issue 10, item 4: a product whose prompts take long to encode must not stall the queue."""
    det = SlowTextDetector(delay_s=0.01, text_s=2.0)
    data = png_bytes(random_image(9))
    with app_client(factory=lambda *a, **k: det, max_wait_ms=0, request_timeout_s=30) as (client, _):
        assert client.put("/products/wordy", json={"object_name": "wordy part"}).status_code == 201
        client.post("/inspect?product=bottle", content=data, headers=RAW)  # bottle's prototypes ready
        slow: dict[str, Any] = {}

        def wordy() -> None:
            t = time.monotonic()
            slow["status"] = client.post("/inspect?product=wordy", content=data, headers=RAW).status_code
            slow["seconds"] = time.monotonic() - t

        worker = threading.Thread(target=wordy)
        worker.start()
        time.sleep(0.3)  # wordy's text encoding is under way
        latencies = []
        for _ in range(5):
            t = time.monotonic()
            assert client.post("/inspect?product=bottle", content=data, headers=RAW).status_code == 200
            latencies.append(time.monotonic() - t)
        worker.join()
    assert slow["status"] == 200 and slow["seconds"] >= det.text_s
    # bottle's answers came while wordy's prompts were being encoded (each far below 2 s)
    assert sum(latencies) < det.text_s * 0.75, latencies
    assert all(not name.startswith("model-") for name in det.text_threads), det.text_threads
