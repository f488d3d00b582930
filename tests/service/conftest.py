"""Fixtures for the service tests: real app, real tiny WinCLIP, real Redis (db 15, random key prefix)."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import models
from service.app import create_app, storage_options
from service.settings import Settings

REDIS_TEST_URL = os.environ.get("ZSI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def tiny_factory(method: str, *, settings: Settings, device: str, cache: Any) -> models.Detector:
    """The real tiny random-init detector, with the app's cache (what demo mode loads)."""
    return models.load_tiny_detector(method, device="cpu", cache=cache, **storage_options(method))


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def random_image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def wait_ready(client: TestClient, timeout_s: float = 60.0, expect: int = 200) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get("/ready")
        body = r.json()
        states = body.get("methods") or body.get("error", {}).get("methods", {})
        if r.status_code == 200 or any(s.get("state") == "failed" for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"service not ready after {timeout_s}s: {body}")
        time.sleep(0.05)
    assert r.status_code == expect, r.json()
    return r


def make_settings(tmp_path: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": None,
        "data_dir": tmp_path / "data",
        "weights_dir": tmp_path / "weights",
        "device": "cpu",
        "methods": ("winclip",),
        "max_wait_ms": 5.0,
        "api_key": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


AppMaker = Callable[..., Any]


@pytest.fixture
def app_client(tmp_path: Any) -> Iterator[AppMaker]:
    """``with app_client(**settings) as (client, services): ...`` — started, models loaded."""

    @contextmanager
    def make(factory: Any = tiny_factory, ready: int | None = 200, **overrides: Any) -> Iterator[Any]:
        settings = make_settings(tmp_path, **overrides)
        app = create_app(settings, detector_factory=factory)
        with TestClient(app, raise_server_exceptions=False) as client:
            if ready is not None:
                wait_ready(client, expect=ready)
            yield client, app.state.services

    yield make


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis (db 15); every key this test writes starts with the returned prefix."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis server at {REDIS_TEST_URL} ({exc}); run scripts/ensure_redis.sh")
    yield REDIS_TEST_URL
    client.close()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    import redis

    prefix = f"zsitest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=prefix + "*", count=500):
        client.delete(key)
    client.close()
