"""Golden images: upload once, /inspect switches to few-shot, list, clear."""

from __future__ import annotations

import pytest

from prompts import builtin_products
from tests.service.conftest import png_bytes, random_image

pytestmark = pytest.mark.timeout(120)


def test_golden_images_switch_inspect_to_few_shot(app_client):
    goldens = [random_image(10 + i) for i in range(3)]
    test_img = random_image(20)
    files = [("images", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(goldens)]
    raw = {"content-type": "image/png"}
    with app_client() as (client, services):
        det = services.methods["winclip"].detector
        zero = client.post("/inspect?product=bottle", content=png_bytes(test_img), headers=raw).json()
        assert zero["used_references"] is False

        r = client.post("/products/bottle/references", files=files)
        assert r.status_code == 200, r.json()
        up = r.json()
        assert up["count"] == 3 and up["computed"] is True and up["model_key"] == det.model_key
        assert det.counters()["references_encoded"] == 3

        few = client.post("/inspect?product=bottle", content=png_bytes(test_img), headers=raw).json()
        assert few["used_references"] is True and few["reference_count"] == 3
        refs = det.encode_references(goldens, product=builtin_products()["bottle"])
        want = det.predict(test_img, product=builtin_products()["bottle"], references=refs)
        assert few["score"] == pytest.approx(want.score, abs=1e-5)
        assert few["anomaly_map"]["max"] == pytest.approx(float(want.anomaly_map.max()), abs=1e-5)
        assert up["image_hashes"] == list(refs.image_hashes)

        # the same set again: stored already, no model work
        encoded = det.counters()["references_encoded"]
        again = client.post("/products/bottle/references", files=files).json()
        assert again["computed"] is False and det.counters()["references_encoded"] == encoded

        listed = client.get("/products/bottle/references").json()
        assert listed["sets"] == [
            {
                "method": "winclip",
                "model_key": det.model_key,
                "count": 3,
                "image_hashes": up["image_hashes"],
                "stored": True,
                "images_kept": 3,
            }
        ]
        # another product is untouched
        assert (
            client.post("/inspect?product=cable", content=png_bytes(test_img), headers=raw).json()[
                "used_references"
            ]
            is False
        )

        assert client.delete("/products/bottle/references").json()["deleted_sets"] == 1
        assert client.get("/products/bottle/references").json()["sets"] == []
        back = client.post("/inspect?product=bottle", content=png_bytes(test_img), headers=raw).json()
        assert back["used_references"] is False
        assert back["score"] == pytest.approx(zero["score"], abs=1e-6)


def test_reference_upload_errors(app_client):
    with app_client(max_reference_images=2) as (client, _):
        good = png_bytes(random_image(1))
        r = client.post("/products/nope/references", files=[("images", ("a.png", good, "image/png"))])
        assert r.status_code == 404
        r = client.post("/products/bottle/references", content=good, headers={"content-type": "image/png"})
        assert r.status_code == 415
        r = client.post(
            "/products/bottle/references", files=[("images", ("a.txt", b"not an image", "text/plain"))]
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_an_image"
        r = client.post(
            "/products/bottle/references",
            files=[("images", (f"{i}.png", good, "image/png")) for i in range(3)],
        )
        assert r.status_code == 422, r.json()  # more files than ZSI_MAX_REFERENCE_IMAGES
        assert r.json()["error"]["code"] == "too_many_images"
        assert client.get("/products/bottle/references").json()["sets"] == []


def test_deleting_a_custom_product_drops_its_references(app_client):
    with app_client() as (client, _):
        client.put("/products/temp", json={"object_name": "temp"})
        client.post(
            "/products/temp/references",
            files=[("images", ("a.png", png_bytes(random_image(3)), "image/png"))],
        )
        assert len(client.get("/products/temp/references").json()["sets"]) == 1
        client.delete("/products/temp")
        client.put("/products/temp", json={"object_name": "temp"})
        assert client.get("/products/temp/references").json()["sets"] == []
