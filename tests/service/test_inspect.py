"""POST /inspect with the real tiny WinCLIP: JSON and PNG answers, both upload styles."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from models.postprocess import boxes_above
from prompts import builtin_products
from tests.service.conftest import png_bytes, random_image

pytestmark = pytest.mark.timeout(120)


def test_multipart_and_raw_body_give_the_model_result(app_client):
    img = random_image(1)
    data = png_bytes(img)
    with app_client() as (client, services):
        r1 = client.post(
            "/inspect", params={"product": "bottle"}, files={"image": ("a.png", data, "image/png")}
        )
        r2 = client.post(
            "/inspect", params={"product": "bottle"}, content=data, headers={"content-type": "image/png"}
        )
        detector = services.methods["winclip"].detector
    assert r1.status_code == 200, r1.json()
    assert r2.status_code == 200, r2.json()
    a, b = r1.json(), r2.json()
    recipe = builtin_products()["bottle"]
    want = detector.predict(img, product=recipe)  # the same model, called directly
    assert a["score"] == pytest.approx(want.score, abs=1e-5)
    assert b["score"] == pytest.approx(want.score, abs=1e-5)
    assert a["threshold"] == recipe.threshold
    assert a["decision"] == ("anomalous" if a["score"] >= recipe.threshold else "normal")
    assert a["method"] == "winclip" and a["model"] == want.model and a["weights"] == want.weights
    assert a["prompt_digest"] == want.prompt_digest
    assert a["used_references"] is False and a["reference_count"] == 0
    assert a["demo"] is True and "random-init" in a["warning"]
    assert set(a["timings_ms"]) >= {"decode", "queue_wait", "inference", "model_encode", "render", "total"}
    # the map: 8-bit PNG at the input resolution, min/max of the float map
    m = a["anomaly_map"]
    with Image.open(io.BytesIO(base64.b64decode(m["png_base64"]))) as im:
        assert im.mode == "L" and im.size == (img.shape[1], img.shape[0])
        grey = np.asarray(im)
    assert (m["width"], m["height"]) == (img.shape[1], img.shape[0])
    assert m["min"] == pytest.approx(float(want.anomaly_map.min()), abs=1e-5)
    assert m["max"] == pytest.approx(float(want.anomaly_map.max()), abs=1e-5)
    assert np.abs(grey.astype(int) - np.rint(want.anomaly_map * 255).astype(int)).max() <= 1
    boxes = boxes_above(want.anomaly_map, recipe.threshold)
    assert len(a["regions"]) == len(boxes)
    if boxes:
        assert a["regions"][0]["area"] == boxes[0].area


def test_threshold_of_the_product_drives_the_decision(app_client):
    data = png_bytes(random_image(2))
    with app_client() as (client, _):
        for thr, want in ((0.0, "anomalous"), (1.0, "normal")):
            r = client.put("/products/widget", json={"object_name": "widget", "threshold": thr})
            assert r.status_code in (200, 201), r.json()
            out = client.post(
                "/inspect?product=widget", content=data, headers={"content-type": "image/png"}
            ).json()
            assert out["threshold"] == thr and out["decision"] == want
            assert out["product"] == "widget"
        # threshold 0: every pixel is a region; one region covering the image
        r = client.put("/products/widget", json={"object_name": "widget", "threshold": 0.0})
        out = client.post(
            "/inspect?product=widget", content=data, headers={"content-type": "image/png"}
        ).json()
        assert out["regions"] == [
            {
                "x0": 0,
                "y0": 0,
                "x1": 63,
                "y1": 47,
                "area": 48 * 64,
                "max_score": pytest.approx(out["anomaly_map"]["max"]),
                "mean_score": pytest.approx(out["regions"][0]["mean_score"]),
            }
        ]


def test_png_output_is_the_overlay_with_headers(app_client):
    img = random_image(3, 40, 56)
    with app_client() as (client, _):
        r = client.post(
            "/inspect",
            params={"product": "bottle", "output": "png"},
            content=png_bytes(img, "BMP"),
            headers={"content-type": "image/bmp"},
        )
        j = client.post(
            "/inspect?product=bottle", content=png_bytes(img), headers={"content-type": "image/png"}
        ).json()
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert float(r.headers["x-anomaly-score"]) == pytest.approx(j["score"], abs=1e-5)
    assert r.headers["x-decision"] == j["decision"] and r.headers["x-demo"] == "true"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size[0] >= 56 and im.size[1] > 40 and im.mode == "RGB"  # small: legend strip below
        over = np.asarray(im)
    assert not np.array_equal(over[:40, :56], img)


@pytest.mark.parametrize(
    "fmt,ctype", [("JPEG", "image/jpeg"), ("TIFF", "image/tiff"), ("PNG", "application/octet-stream")]
)
def test_other_formats(app_client, fmt, ctype):
    with app_client() as (client, _):
        r = client.post("/inspect", content=png_bytes(random_image(4), fmt), headers={"content-type": ctype})
    assert r.status_code == 200, r.json()
    assert r.json()["product"] is None and r.json()["threshold"] == 0.5


def test_grey_and_16_bit_images_are_accepted(app_client):
    grey16 = (np.random.default_rng(5).integers(0, 65535, (32, 40))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    with app_client() as (client, _):
        r = client.post("/inspect", content=buf.getvalue(), headers={"content-type": "image/png"})
        g = client.post(
            "/inspect", content=png_bytes(random_image(6)[..., 0]), headers={"content-type": "image/png"}
        )
    assert r.status_code == 200 and r.json()["image"] == {**r.json()["image"], "width": 40, "height": 32}
    assert g.status_code == 200


def test_method_defaults_to_the_products(app_client):
    with app_client() as (client, _):
        client.put("/products/saa-thing", json={"object_name": "thing", "default_method": "saa_plus"})
        r = client.post(
            "/inspect?product=saa-thing",
            content=png_bytes(random_image(7)),
            headers={"content-type": "image/png"},
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "method_not_loaded"


def _with_orientation(image: np.ndarray, fmt: str, orientation: int, **save: object) -> bytes:
    im = Image.fromarray(image)
    exif = im.getexif()
    exif[0x0112] = orientation  # EXIF/TIFF Orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "ctype", "save"),
    [
        ("JPEG", "image/jpeg", {"quality": 100}),
        ("TIFF", "image/tiff", {}),
        ("TIFF", "image/tiff", {"compression": "tiff_lzw"}),
    ],
)
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_tags_are_never_applied(fmt, ctype, save, orientation):
    """Issue 10, item 8: one rule for every format. The pixels are used as stored, so the map
    and the regions are in the camera's own pixel grid (Pillow rotates TIFFs on load: undone)."""
    from service.imaging import decode_image

    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:8, :16] = 255  # a bright block in the top-left corner, as the sensor sent it
    data = _with_orientation(stored, fmt, orientation, **save)
    out = decode_image(data, max_pixels=10**6, max_bytes=10**6)
    assert out.shape == stored.shape
    tolerance = 8 if fmt == "JPEG" else 0
    assert np.abs(out.astype(int) - stored.astype(int)).max() <= tolerance


def test_orientation_is_not_applied_over_http(app_client):
    stored = random_image(21, 40, 64)
    with app_client() as (client, _):
        for fmt, ctype in (("JPEG", "image/jpeg"), ("TIFF", "image/tiff")):
            r = client.post(
                "/inspect", content=_with_orientation(stored, fmt, 6), headers={"content-type": ctype}
            )
            body = r.json()
            assert (body["image"]["width"], body["image"]["height"]) == (64, 40), (fmt, body["image"])
            assert (body["anomaly_map"]["width"], body["anomaly_map"]["height"]) == (64, 40)
