"""Readiness, missing weights, API key, /models and /metrics."""

from __future__ import annotations

import threading

import pytest

import models
from service.app import default_detector_factory
from tests.service.conftest import png_bytes, random_image, tiny_factory, wait_ready

pytestmark = pytest.mark.timeout(120)
RAW = {"content-type": "image/png"}


def test_missing_weights_service_starts_and_says_how_to_fetch(app_client, tmp_path):
    with app_client(factory=default_detector_factory, ready=None, demo=False) as (client, _):
        assert client.get("/health").status_code == 200
        r = wait_ready(client, expect=503)
        err = r.json()["error"]
        assert err["code"] == "weights_missing"
        win = err["methods"]["winclip"]
        assert win["state"] == "failed" and win["missing"] == ["openclip-vit-b-16-plus-240-laion400m_e31"]
        assert win["fetch"] == models.weights.fetch_hint(win["missing"], tmp_path / "weights")
        assert "anomaly-inspect weights fetch" in err["message"]
        r = client.post("/inspect", content=png_bytes(random_image(0)), headers=RAW)
        assert r.status_code == 503 and r.json()["error"]["code"] == "weights_missing"
        assert r.json()["error"]["fetch"] == win["fetch"]
        assert client.get("/models").json()["methods"][0]["state"] == "failed"


def test_ready_is_503_while_loading(app_client):
    gate = threading.Event()

    def slow_factory(method, **kw):
        gate.wait(30)
        return tiny_factory(method, **kw)

    with app_client(factory=slow_factory, ready=None) as (client, _):
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers["retry-after"]
        r = client.post("/inspect", content=png_bytes(random_image(0)), headers=RAW)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert client.get("/health").status_code == 200
        gate.set()
        wait_ready(client)


def test_demo_mode_labels_everything(app_client):
    with app_client(factory=default_detector_factory, demo=True) as (client, _):
        for path in ("/ready", "/models", "/products", "/products/bottle"):
            body = client.get(path).json()
            assert body["demo"] is True and "random-init" in body["warning"], path
        assert client.get("/models").json()["demo_mode"] is True
        err = client.get("/products/nope").json()
        assert err["demo"] is True and err["error"]["code"] == "unknown_product"


def test_api_key(app_client):
    with app_client(api_key="s3cret") as (client, _):
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        for headers in ({}, {"X-API-Key": "wrong"}):
            r = client.post("/inspect", content=png_bytes(random_image(0)), headers={**RAW, **headers})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert client.get("/products", headers=headers).status_code == 401
            assert client.get("/metrics", headers=headers).status_code == 401
        ok = client.post(
            "/inspect", content=png_bytes(random_image(0)), headers={**RAW, "X-API-Key": "s3cret"}
        )
        assert ok.status_code == 200
        assert client.get("/docs").status_code == 200


def test_metrics_count_requests_stages_batches_and_cache(app_client):
    with app_client() as (client, _):
        for i in range(2):
            client.post("/inspect?product=bottle", content=png_bytes(random_image(i)), headers=RAW)
        client.post("/inspect", content=b"junk", headers=RAW)
        text = client.get("/metrics").text
    assert 'zsi_requests_total{route="/inspect",status="200"} 2.0' in text
    assert 'zsi_requests_total{route="/inspect",status="400"} 1.0' in text
    assert 'zsi_batch_size_count{method="winclip"} 2.0' in text
    assert 'zsi_stage_seconds_count{method="winclip",stage="queue_wait"} 2.0' in text
    assert 'zsi_cache_lookups_total{kind="text_prototypes",result="miss"}' in text
    assert 'zsi_cache_lookups_total{kind="text_prototypes",result="hit"}' in text
    assert 'zsi_queue_depth{method="winclip"} 0.0' in text
    assert 'zsi_request_seconds_bucket{le="0.5",route="/inspect"}' in text
