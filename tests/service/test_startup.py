"""What a new user meets at startup (issue 10, item 11): demo data kept apart, the CPU fallback
said loudly, logs with timestamps and without third-party noise."""

from __future__ import annotations

import io
import logging

import pytest

from service.app import default_detector_factory
from service.logs import configure_logging
from tests.service.conftest import tiny_factory

pytestmark = pytest.mark.timeout(120)


def test_products_created_in_demo_mode_stay_out_of_the_real_store(app_client):
    with app_client(factory=default_detector_factory, demo=True) as (client, _):
        assert client.put("/products/demo-part", json={"object_name": "demo part"}).status_code == 201
        assert client.get("/products/demo-part").status_code == 200
    with app_client(factory=tiny_factory, demo=False) as (client, _):  # same ZSI_DATA_DIR
        assert client.get("/products/demo-part").status_code == 404
        assert client.put("/products/real-part", json={"object_name": "real part"}).status_code == 201
    with app_client(factory=default_detector_factory, demo=True) as (client, _):
        assert client.get("/products/demo-part").status_code == 200  # demo data persists for demo
        assert client.get("/products/real-part").status_code == 404


@pytest.mark.redis
def test_demo_and_real_use_separate_redis_keys(app_client, redis_url, key_prefix):
    with app_client(
        factory=default_detector_factory, demo=True, redis_url=redis_url, key_prefix=key_prefix
    ) as (
        client,
        _,
    ):
        assert client.put("/products/demo-part", json={"object_name": "demo part"}).status_code == 201
    with app_client(factory=tiny_factory, demo=False, redis_url=redis_url, key_prefix=key_prefix) as (
        client,
        _,
    ):
        assert client.get("/products/demo-part").status_code == 404
        assert "demo-part" not in {p["id"] for p in client.get("/products").json()["products"]}


def test_auto_device_falling_back_to_cpu_is_a_warning_in_ready_and_models(app_client, monkeypatch, caplog):
    monkeypatch.setattr("service.app.resolve_device", lambda device: "cpu")
    with caplog.at_level(logging.INFO, logger="service"), app_client(device="auto") as (client, _):
        ready = client.get("/ready").json()
        models = client.get("/models").json()
    assert ready["device"] == "cpu" and any("no CUDA GPU" in w for w in ready["warnings"]), ready
    assert any("no CUDA GPU" in w for w in models["warnings"]), models
    assert any(r.levelno == logging.WARNING and "no CUDA GPU" in r.getMessage() for r in caplog.records)


def test_explicit_cpu_or_demo_gives_no_device_warning(app_client):
    with app_client(device="cpu") as (client, _):
        assert client.get("/ready").json()["warnings"] == []
    with app_client(factory=default_detector_factory, demo=True, device="auto") as (client, services):
        body = client.get("/ready").json()
        assert body["warnings"] == [] and services.device == "cpu"  # tiny demo models: CPU, no CUDA start-up


def test_logs_have_timestamps_and_third_party_info_is_quiet():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        root.handlers = []
        configure_logging(stream=stream)
        logging.getLogger("service.test").info("service line")
        logging.info("Loaded built-in tiny-vit-test model config.")  # what open_clip does (root logger)
        logging.getLogger("transformers.x").info("hub chatter")
        logging.getLogger("open_clip").warning("a real warning")
    finally:
        root.handlers, root.level = saved
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "service line" in lines[0] and "a real warning" in lines[1]
    for line in lines:  # 2026-01-01T12:00:00.123 INFO service.test: ...
        assert line[:4].isdigit() and line[4] == "-" and line[10] == "T", line
