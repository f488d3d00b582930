"""End to end: a real uvicorn process (ZSI_DEMO=true), images posted over HTTP."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.service.conftest import png_bytes, random_image
from tests.service.live import live_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_uvicorn_serves_inspect_over_http(tmp_path):
    img = random_image(7, 60, 80)
    with live_server(tmp_path) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["demo"] is True
        r = httpx.post(
            f"{url}/inspect",
            params={"product": "bottle"},
            files={"image": ("part.png", png_bytes(img), "image/png")},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["demo"] is True and body["warning"]
        assert body["image"]["width"] == 80 and body["anomaly_map"]["height"] == 60
        assert 0.0 <= body["score"] <= 1.0

        raw = httpx.post(
            f"{url}/inspect?product=bottle&output=png",
            content=png_bytes(img, "JPEG"),
            headers={"content-type": "image/jpeg"},
            timeout=60,
        )
        assert raw.status_code == 200 and raw.headers["x-demo"] == "true"
        ow, oh = Image.open(io.BytesIO(raw.content)).size
        assert ow >= 80 and oh > 60  # a small image: the overlay's legend strip is below it

        bad = httpx.post(f"{url}/inspect", content=b"nope", headers={"content-type": "image/png"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"

        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = list(
                pool.map(
                    lambda i: (
                        httpx.post(
                            f"{url}/inspect",
                            content=png_bytes(random_image(i)),
                            headers={"content-type": "image/png"},
                            timeout=60,
                        ).status_code
                    ),
                    range(6),
                )
            )
        assert codes == [200] * 6
        metrics = httpx.get(f"{url}/metrics").text
        assert 'zsi_requests_total{route="/inspect",status="200"}' in metrics
        assert httpx.get(f"{url}/health").status_code == 200
