"""Every registered method answers POST /inspect through the same service path (demo models)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import make_settings, png_bytes, random_image, wait_ready

METHODS = ("winclip", "anomalyclip", "saa_plus")


@pytest.mark.timeout(300)
def test_each_method_answers_inspect_and_is_labelled(tmp_path) -> None:
    app = create_app(make_settings(tmp_path, demo=True, methods=METHODS))
    body = png_bytes(random_image(1, h=72, w=96))
    with TestClient(app) as client:
        ready = wait_ready(client, timeout_s=240).json()
        assert set(ready["methods"]) == set(METHODS)
        for method in METHODS:
            r = client.post(
                f"/inspect?product=carpet&method={method}",
                content=body,
                headers={"Content-Type": "image/png"},
            )
            assert r.status_code == 200, r.json()
            doc = r.json()
            assert doc["method"] == method and doc["demo"] is True and "random-init" in doc["weights"]
            assert 0.0 <= doc["score"] <= 1.0
            assert (doc["anomaly_map"]["width"], doc["anomaly_map"]["height"]) == (96, 72)
        # golden images are a WinCLIP+ feature: the other methods refuse them clearly
        files = [("images", ("g.png", body, "image/png"))]
        r = client.post("/products/carpet/references?method=anomalyclip", files=files)
        assert r.status_code == 400 and r.json()["error"]["code"] == "references_not_supported"
