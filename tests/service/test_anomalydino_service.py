"""AnomalyDINO in the service (issue 11): golden images -> memory bank, the automatic default, refusals."""

from __future__ import annotations

import hashlib
from typing import Any, cast

import numpy as np
import pytest
from fastapi.testclient import TestClient

import models
from models.base import ReferenceSet
from service.app import default_detector_factory
from service.settings import Settings
from tests.service.conftest import make_settings, png_bytes, random_image

pytestmark = pytest.mark.timeout(180)
RAW = {"content-type": "image/png"}
BOTH = ("winclip", "anomalydino")


def goldens(n: int = 3) -> list[np.ndarray]:
    return [random_image(100 + i) for i in range(n)]


def files_of(images: list[np.ndarray]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(images)]


def inspect(client: TestClient, query: str, image: np.ndarray) -> Any:
    return client.post(f"/inspect?{query}", content=png_bytes(image), headers=RAW)


def test_golden_upload_encodes_every_reference_method_and_inspect_uses_anomalydino(app_client) -> None:
    golden, img = goldens(), random_image(7)
    with app_client(methods=BOTH) as (client, services):
        dino = services.methods["anomalydino"].detector
        winclip = services.methods["winclip"].detector
        assert client.put("/products/gear", json={"object_name": "gear"}).status_code == 201
        assert client.get("/products/gear").json()["default_method"] is None  # automatic

        # no golden images yet: the automatic default is WinCLIP zero-shot
        zero = inspect(client, "product=gear", img).json()
        assert zero["method"] == "winclip" and zero["used_references"] is False

        up = client.post("/products/gear/references", files=files_of(golden))
        assert up.status_code == 200, up.json()
        body = up.json()
        assert [s["method"] for s in body["sets"]] == ["anomalydino", "winclip"]  # the default first
        assert body["method"] == "anomalydino" and body["model_key"] == dino.model_key
        assert body["computed"] is True and all(s["computed"] for s in body["sets"])
        assert dino.counters()["references_encoded"] == 3
        assert winclip.counters()["references_encoded"] == 3

        # automatic default: anomalydino, against the bank of the golden images
        r = inspect(client, "product=gear", img)
        assert r.status_code == 200, r.json()
        got = r.json()
        recipe = services.products.get("gear")[0]
        want = dino.predict(img, product=recipe, references=dino.encode_references(golden, product=recipe))
        assert got["method"] == "anomalydino" and got["used_references"] is True
        assert got["reference_count"] == 3
        assert got["score"] == pytest.approx(want.score, abs=1e-6)
        assert got["details"]["raw_score"] == pytest.approx(want.details["raw_score"], abs=1e-6)
        assert got["anomaly_map"]["max"] == pytest.approx(float(want.anomaly_map.max()), abs=1e-6)
        assert r.headers["X-Method"] == "anomalydino"
        # the explicit method still picks WinCLIP+, with its own set from the same upload
        few = inspect(client, "product=gear&method=winclip", img).json()
        assert few["method"] == "winclip" and few["used_references"] is True and few["reference_count"] == 3

        # the same images again: every set stored already, no model work
        encoded = dino.counters()["references_encoded"]
        again = client.post("/products/gear/references", files=files_of(golden)).json()
        assert again["computed"] is False and not any(s["computed"] for s in again["sets"])
        assert dino.counters()["references_encoded"] == encoded
        listed = {s["method"]: s for s in client.get("/products/gear/references").json()["sets"]}
        assert (
            set(listed) == {"winclip", "anomalydino"} and listed["anomalydino"]["model_key"] == dino.model_key
        )

        # ?method= encodes for that method only
        encoded_w = winclip.counters()["references_encoded"]
        one = client.post("/products/gear/references?method=anomalydino", files=files_of(golden[:2])).json()
        assert [s["method"] for s in one["sets"]] == ["anomalydino"] and one["count"] == 2
        assert winclip.counters()["references_encoded"] == encoded_w
        assert inspect(client, "product=gear", img).json()["reference_count"] == 2


def test_without_golden_images_anomalydino_is_a_clear_409(app_client) -> None:
    img = random_image(8)
    with app_client(methods=BOTH) as (client, services):
        client.put("/products/plate", json={"object_name": "plate", "default_method": "anomalydino"})
        for query in (
            "product=plate",
            "product=plate&method=anomalydino",
            "product=bottle&method=anomalydino",
        ):
            r = inspect(client, query, img)
            assert r.status_code == 409, (query, r.json())
            err = r.json()["error"]
            assert err["code"] == "references_required" and err["method"] == "anomalydino"
            assert f"POST /products/{err['product']}/references" in err["message"]
            assert "upload" in err["message"] and err["inspection_id"] == r.headers["X-Inspection-Id"]
        r = inspect(client, "method=anomalydino", img)  # no product at all
        assert r.status_code == 409 and "?product=" in r.json()["error"]["message"]
        # refusals are recorded like every answer
        rec = client.get(f"/inspections/{r.headers['X-Inspection-Id']}").json()
        assert rec["status"] == 409 and rec["error"]["code"] == "references_required"
        data = png_bytes(img)  # the upload was read: its size and hash are in the record
        assert rec["image"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert rec["image"]["bytes"] == len(data)
        assert services.methods["anomalydino"].queue.stats.batches == 0  # nothing reached the model


def test_explicit_default_method_is_respected(app_client) -> None:
    golden, img = goldens(2), random_image(9)
    with app_client(methods=BOTH) as (client, _):
        client.put("/products/w", json={"object_name": "part", "default_method": "winclip"})
        client.put("/products/d", json={"object_name": "part", "default_method": "anomalydino"})
        for pid in ("w", "d", "bottle"):  # built-in recipes name winclip explicitly
            first = client.post(f"/products/{pid}/references", files=files_of(golden)).json()
            assert first["method"] == ("anomalydino" if pid == "d" else "winclip"), first
        assert inspect(client, "product=w", img).json()["method"] == "winclip"
        assert inspect(client, "product=bottle", img).json()["method"] == "winclip"
        got = inspect(client, "product=d", img).json()
        assert got["method"] == "anomalydino" and got["used_references"] is True
        # an explicit default must name a known method; null goes back to automatic
        r = client.put("/products/w", json={"object_name": "part", "default_method": "dino"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_product"
        assert client.put("/products/w", json={"object_name": "part"}).json()["default_method"] is None
        assert inspect(client, "product=w", img).json()["method"] == "anomalydino"  # has golden images


def test_automatic_default_stays_winclip_without_anomalydino_loaded(app_client) -> None:
    with app_client(methods=("winclip",)) as (client, _):
        client.put("/products/gear", json={"object_name": "gear"})
        up = client.post("/products/gear/references", files=files_of(goldens(2))).json()
        assert [s["method"] for s in up["sets"]] == ["winclip"]
        got = inspect(client, "product=gear", random_image(3)).json()
        assert got["method"] == "winclip" and got["used_references"] is True


def test_a_bank_made_under_another_configuration_asks_for_a_new_upload(app_client) -> None:
    """Changing the model (here AnomalyDINO's input size) changes the bank's key: never reused."""
    golden, img = goldens(2), random_image(4)

    def dino84(method: str, *, settings: Settings, device: str, cache: Any) -> models.Detector:
        kwargs = {"image_size": 84} if method == "anomalydino" else {}
        return models.load_tiny_detector(method, device="cpu", cache=cache, **kwargs)

    with app_client(methods=BOTH) as (client, _):
        client.put("/products/gear", json={"object_name": "gear"})
        client.post("/products/gear/references", files=files_of(golden))
    with app_client(factory=dino84, methods=BOTH) as (client, _):  # same data dir
        r = inspect(client, "product=gear", img)
        assert r.status_code == 409, r.json()
        assert "another anomalydino configuration" in r.json()["error"]["message"]
        up = client.post("/products/gear/references", files=files_of(golden)).json()
        sets = {s["method"]: s for s in up["sets"]}
        assert sets["anomalydino"]["computed"] is True and sets["winclip"]["computed"] is False
        assert sets["anomalydino"]["model_key"].endswith("/short84")  # an int: the shorter side
        assert inspect(client, "product=gear", img).json()["method"] == "anomalydino"


def test_a_bank_made_when_the_int_size_meant_a_square_is_not_reused(app_client) -> None:
    """Banks of an exact 56x56 input (what an int size meant before) do not serve shorter-side 56."""
    golden, img = goldens(2), random_image(7)

    def square56(method: str, *, settings: Settings, device: str, cache: Any) -> models.Detector:
        kwargs = {"image_size": (56, 56)} if method == "anomalydino" else {}
        return models.load_tiny_detector(method, device="cpu", cache=cache, **kwargs)

    with app_client(factory=square56, methods=BOTH) as (client, _):
        client.put("/products/gear", json={"object_name": "gear"})
        up = client.post("/products/gear/references", files=files_of(golden)).json()
        assert {s["method"]: s for s in up["sets"]}["anomalydino"]["model_key"].endswith("/56x56")
    with app_client(methods=BOTH) as (client, _):  # the tiny config: image_size 56, the shorter side
        r = inspect(client, "product=gear", img)
        assert r.status_code == 409, r.json()
        assert "another anomalydino configuration" in r.json()["error"]["message"]
        up = client.post("/products/gear/references", files=files_of(golden)).json()
        sets = {s["method"]: s for s in up["sets"]}
        assert sets["anomalydino"]["computed"] is True
        assert sets["anomalydino"]["model_key"].endswith("/short56")


def test_bank_shared_by_two_apps_on_one_redis(app_client, redis_url, key_prefix) -> None:
    golden, img = goldens(2), random_image(5)
    shared = {"redis_url": redis_url, "key_prefix": key_prefix, "methods": BOTH}
    with app_client(**shared) as (ca, sa):
        assert ca.put("/products/gear", json={"object_name": "gear"}).status_code == 201
        assert ca.post("/products/gear/references", files=files_of(golden)).json()["computed"] is True
        got_a = inspect(ca, "product=gear", img).json()
        dino_a = sa.methods["anomalydino"].detector
        with app_client(result_cache=False, **shared) as (cb, sb):  # B must run its model
            dino_b = sb.methods["anomalydino"].detector
            got_b = inspect(cb, "product=gear", img).json()
            assert got_b["method"] == "anomalydino" and got_b["used_references"] is True
            assert got_b["cached"] is False and sb.methods["anomalydino"].queue.stats.images == 1
            assert got_b["score"] == pytest.approx(got_a["score"], abs=1e-6)
            assert dino_b.counters().get("references_encoded", 0) == 0  # B encoded nothing
            again = cb.post("/products/gear/references", files=files_of(golden)).json()
            assert again["computed"] is False and dino_b.counters().get("references_encoded", 0) == 0

        # in Redis: the bank is a dtype/shape-header blob (no pickle) that decodes to the same bank
        import redis

        r = redis.Redis.from_url(redis_url)
        try:
            entry = sa.references.index("gear")[dino_a.model_key]
            raw = r.get(entry["key"])
        finally:
            r.close()
        assert isinstance(raw, bytes) and not raw.startswith(b"\x80")  # not a pickle stream
        stored = ReferenceSet.from_bytes(raw)
        assert stored.model_key == dino_a.model_key
        np.testing.assert_array_equal(stored.arrays["bank"], dino_a.encode_references(golden).arrays["bank"])


def test_demo_mode_runs_anomalydino(app_client) -> None:
    with app_client(factory=default_detector_factory, demo=True, methods=("anomalydino",)) as (client, _):
        client.put("/products/gear", json={"object_name": "gear"})
        assert client.post("/products/gear/references", files=files_of(goldens(1))).status_code == 200
        r = inspect(client, "product=gear", random_image(6))
        assert r.status_code == 200, r.json()
        got = r.json()
        assert got["method"] == "anomalydino" and got["demo"] is True and "random-init" in got["weights"]


def test_default_factory_passes_the_anomalydino_image_size(tmp_path, monkeypatch) -> None:
    seen: dict[str, Any] = {}

    def fake_from_dir(method: str, weights_dir: Any, device: str = "cpu", **kwargs: Any) -> Any:
        seen[method] = kwargs
        raise models.WeightsError("no weights in this test")

    monkeypatch.setattr(models, "load_detector_from_dir", fake_from_dir)
    settings = make_settings(tmp_path, anomalydino_image_size=672)
    for method in BOTH:
        with pytest.raises(models.WeightsError):
            default_detector_factory(method, settings=settings, device="cpu", cache=cast(Any, None))
    assert seen["anomalydino"]["image_size"] == 672 and "image_size" not in seen["winclip"]
    assert Settings(_env_file=None).anomalydino_image_size == 448  # type: ignore[call-arg]


def test_calibrating_anomalydino_without_its_golden_set_is_a_clear_409(app_client) -> None:
    """Golden images kept for WinCLIP only (or AnomalyDINO's bank gone): calibrating with anomalydino
    scored the kept images without a bank and answered 500 ReferencesRequiredError."""
    with app_client(methods=BOTH) as (client, services):
        r = client.post("/products/bottle/references?method=winclip", files=files_of(goldens(3)))
        assert r.status_code == 200, r.text
        r = client.post("/products/bottle/calibrate", json={"method": "anomalydino"})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "references_required" and err["method"] == "anomalydino"
        assert "POST /products/bottle/references" in err["message"]
        assert services.methods["anomalydino"].queue.stats.batches == 0  # nothing reached the model
        r = client.post(  # its own set: calibrated
            "/products/bottle/calibrate", json={"method": "winclip", "target_false_reject_rate": 0.5}
        )
        assert r.status_code == 200, r.text
