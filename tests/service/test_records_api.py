"""Inspection records through HTTP: every /inspect answer and refusal recorded, the /inspections API
(filters, pagination, review, CSV, kept image and overlay), /ready and /metrics. Real tiny WinCLIP,
real SQLite file and real PostgreSQL."""

from __future__ import annotations

import csv
import hashlib
import io
import time

import numpy as np
import pytest
from PIL import Image

from service.records import good_images, reviewed_records
from tests.service.conftest import png_bytes, random_image
from tests.service.pg import pg_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)
PNG = {"content-type": "image/png"}


def inspect(client, data: bytes, **params):
    return client.post("/inspect", params=params, content=data, headers=PNG)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request) -> dict:
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("pg_url")}


def test_every_answer_and_refusal_is_recorded_with_its_id(app_client, db_settings):
    img = random_image(3)
    with app_client(**db_settings) as (client, _):
        ok = inspect(client, png_bytes(img), product="bottle", line="L2", station="cam-3", part_id="SN-0042")
        assert ok.status_code == 200, ok.json()
        body = ok.json()
        rid = body["inspection_id"]
        assert ok.headers["x-inspection-id"] == rid and body["cached"] is False
        refused = [
            inspect(client, png_bytes(img), product="no-such-product"),  # 404 before reading
            inspect(client, b"not an image", product="bottle"),  # 400
            client.post("/inspect", content=b"x", headers={"content-type": "text/plain"}),  # 415
            inspect(client, png_bytes(img), method="anomalyclip"),  # 400: not loaded
        ]
        assert [r.status_code for r in refused] == [404, 400, 415, 400]
        for r in refused:
            assert r.json()["error"]["inspection_id"] == r.headers["x-inspection-id"]
        # refused before the inspection flow: no record (query validation)
        bad = inspect(client, png_bytes(img), line="bad\nline")
        assert bad.status_code == 422 and "x-inspection-id" not in bad.headers

        rec = client.get(f"/inspections/{rid}").json()
        assert rec["id"] == rid and rec["status"] == 200 and rec["error"] is None
        for k in ("score", "decision", "threshold", "product", "method", "model", "weights", "prompt_digest"):
            assert rec[k] == body[k], k
        assert rec["regions"] == body["regions"] and rec["regions_truncated"] == body["regions_truncated"]
        assert (rec["line"], rec["station"], rec["part_id"]) == ("L2", "cam-3", "SN-0042")
        assert rec["threshold_source"] == "product" and len(rec["recipe_digest"]) == 16
        assert rec["precision"] == "fp32" and rec["demo"] is True and rec["batch_size"] == 1
        data = png_bytes(img)
        assert rec["image"] == {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "width": img.shape[1],
            "height": img.shape[0],
            "kept": False,
        }
        assert rec["timings_ms"]["inference"] > 0 and rec["review"] is None

        listed = client.get("/inspections", params={"limit": 10}).json()["inspections"]
        assert [x["id"] for x in listed] == [r.headers["x-inspection-id"] for r in reversed(refused)] + [rid]
        codes = [(x["status"], (x["error"] or {}).get("code")) for x in listed]
        assert codes == [
            (400, "method_not_loaded"),
            (415, "unsupported_media_type"),
            (400, "not_an_image"),
            (404, "unknown_product"),
            (200, None),
        ]
        assert listed[3]["product"] == "no-such-product" and listed[2]["image"]["bytes"] == len(
            b"not an image"
        )
        generic = inspect(client, png_bytes(random_image(4)))
        assert (
            client.get(f"/inspections/{generic.json()['inspection_id']}").json()["threshold_source"]
            == "generic"
        )

        ready = client.get("/ready").json()["records"]
        assert ready["state"] == "ok" and ready["pending"] == 0 and ready["dropped"] == 0
        assert ready["database"] == ("postgresql" if db_settings else "sqlite")
        metrics = client.get("/metrics").text
        assert "zsi_records_written_total 6.0" in metrics
        assert 'zsi_records_dropped_total{reason="journal_full"} 0.0' in metrics
        assert "zsi_records_pending 0.0" in metrics


def test_client_fields_are_validated(app_client):
    data = png_bytes(random_image(5))
    with app_client() as (client, _):
        for bad in ("x" * 65, "-starts-with-dash", "semi;colon", "", "tab\there"):
            r = inspect(client, data, part_id=bad)
            assert r.status_code == 422, bad
            assert r.json()["error"]["code"] == "invalid_parameters"
        assert inspect(client, data, part_id="A1/b.2:c#3+d_e-f g").status_code == 200


def test_filters_cursor_pages_and_export(app_client, db_settings):
    with app_client(**db_settings) as (client, _):
        client.put("/products/widget", json={"object_name": "widget", "threshold": 0.0})
        ids = []
        for i in range(7):
            product = "widget" if i % 2 else "bottle"
            r = inspect(client, png_bytes(random_image(100 + i)), product=product, line=f"L{i % 3}")
            assert r.status_code == 200
            ids.append(r.json()["inspection_id"])
        pages, cursor = [], None
        while True:
            r = client.get("/inspections", params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200
            pages.append([x["id"] for x in r.json()["inspections"]])
            cursor = r.json()["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [i for p in pages for i in p] == ids[::-1]
        widget = client.get("/inspections", params={"product": "widget"}).json()["inspections"]
        assert [x["id"] for x in widget] == ids[5::-2]
        assert all(x["decision"] == "anomalous" for x in widget)  # threshold 0
        l1 = client.get("/inspections", params={"line": "L1"}).json()["inspections"]
        assert {x["id"] for x in l1} == {ids[1], ids[4]}
        hi = client.get("/inspections", params={"min_score": 0.5}).json()["inspections"]
        assert all(x["score"] >= 0.5 for x in hi)
        assert (
            client.get("/inspections", params={"cursor": "garbage"}).json()["error"]["code"]
            == "invalid_cursor"
        )
        assert client.get("/inspections", params={"decision": "maybe"}).status_code == 422
        r = client.get("/inspections/export.csv", params={"product": "widget"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [row["id"] for row in rows] == [x["id"] for x in widget]
        assert all(row["product"] == "widget" and row["decision"] == "anomalous" for row in rows)
        # /inspections/export.csv is not taken for an id; an unknown id is a JSON 404
        missing = client.get("/inspections/01234567-89ab-7def-8123-456789abcdef")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_inspection"
        assert client.get("/inspections/not-an-id").status_code == 422


def test_operator_review(app_client, db_settings):
    with app_client(**db_settings) as (client, _):
        rid = inspect(client, png_bytes(random_image(9)), product="bottle").json()["inspection_id"]
        refused = inspect(client, b"nope", product="bottle").json()["error"]["inspection_id"]
        r = client.put(f"/inspections/{rid}/review", json={"verdict": "defect", "note": "crack at rim"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "reviewer_required"
        r = client.put(
            f"/inspections/{rid}/review",
            json={"verdict": "defect", "note": "crack"},
            headers={"X-Operator": "ann"},
        )
        assert r.status_code == 200, r.json()
        assert r.json()["review"]["verdict"] == "defect" and r.json()["review"]["reviewer"] == "ann"
        r = client.put(
            f"/inspections/{rid}/review",
            json={"verdict": "good", "reviewer": "bob"},
            headers={"X-Operator": "ann"},
        )
        assert r.json()["review"]["reviewer"] == "bob"  # the body wins
        rec = client.get(f"/inspections/{rid}").json()
        assert [(h["verdict"], h["reviewer"]) for h in rec["review_history"]] == [
            ("defect", "ann"),
            ("good", "bob"),
        ]
        assert rec["review"]["reviewed_at"].endswith("+00:00")
        assert (
            client.put(f"/inspections/{rid}/review", json={"verdict": "meh", "reviewer": "x"}).status_code
            == 422
        )
        r = client.put(f"/inspections/{refused}/review", json={"verdict": "good", "reviewer": "x"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "refused_inspection"
        unknown = "01234567-89ab-7def-8123-456789abcdef"
        assert (
            client.put(
                f"/inspections/{unknown}/review", json={"verdict": "good", "reviewer": "x"}
            ).status_code
            == 404
        )
        assert [
            x["id"] for x in client.get("/inspections", params={"review": "good"}).json()["inspections"]
        ] == [rid]
        assert rid not in [
            x["id"] for x in client.get("/inspections", params={"review": "unreviewed"}).json()["inspections"]
        ]


def test_kept_image_and_overlay(app_client, db_settings, tmp_path):
    img = random_image(11, 40, 56)
    data = png_bytes(img)
    with app_client(**db_settings) as (client, services):
        r = client.put("/products/kept", json={"object_name": "part", "keep_images": True, "threshold": 0.3})
        assert r.status_code == 201 and r.json()["keep_images"] is True
        kept = inspect(client, data, product="kept").json()
        not_kept = inspect(client, data, product="bottle").json()
        rid = kept["inspection_id"]
        assert client.get(f"/inspections/{rid}").json()["image"]["kept"] is True
        r = client.get(f"/inspections/{rid}/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == data
        ov = client.get(f"/inspections/{rid}/overlay.png")
        assert ov.status_code == 200 and ov.headers["content-type"] == "image/png"
        direct = client.post(
            "/inspect", params={"product": "kept", "output": "png"}, content=data, headers=PNG
        )
        a = np.asarray(Image.open(io.BytesIO(ov.content)).convert("RGB")).astype(int)
        b = np.asarray(Image.open(io.BytesIO(direct.content)).convert("RGB")).astype(int)
        # small images get the legend in a strip below the image (docs/overlay.md)
        assert a.shape == b.shape and a.shape[0] >= 40 and a.shape[1] >= 56
        assert np.abs(a - b).max() <= 2  # the same overlay, from the kept 16-bit map
        for path in ("image", "overlay.png"):
            r = client.get(f"/inspections/{not_kept['inspection_id']}/{path}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_kept"
        # the labelled-set helpers see it once an operator says "good"
        client.put(f"/inspections/{rid}/review", json={"verdict": "good", "reviewer": "qa"})
        data_dir = services.settings.data_dir
        url = db_settings.get("database_url")
        (only,) = reviewed_records("kept", data_dir=data_dir, database_url=url)
        assert only.id == rid and only.label == 0 and only.image_path is not None
        assert only.image_path.read_bytes() == data
        assert good_images("kept", data_dir=data_dir, database_url=url) == [only.image_path]
        # retention removes the files: 404 image_expired
        services.records.images.max_bytes = 1
        services.records.images.sweep()
        r = client.get(f"/inspections/{rid}/image")
        assert r.status_code == 404 and r.json()["error"]["code"] == "image_expired"
        assert client.get(f"/inspections/{rid}/overlay.png").json()["error"]["code"] == "image_expired"


def test_records_api_needs_the_api_key(app_client):
    with app_client(api_key="s3cret") as (client, _):
        assert client.get("/inspections").status_code == 401
        assert client.get("/inspections/export.csv").status_code == 401
        assert client.get("/inspections", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_degraded_database_keeps_inspecting_and_says_so(app_client):
    from tests.service.live import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    with app_client(database_url=url, db_timeout_s=1) as (client, services):
        r = inspect(client, png_bytes(random_image(12)), product="bottle")
        assert r.status_code == 200 and r.headers.get("x-record") is None  # journaled
        deadline = time.monotonic() + 20
        while services.records.state != "degraded" and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/ready")
        assert ready.status_code == 200  # inspection works: still ready
        rec = ready.json()["records"]
        assert rec["state"] == "degraded" and rec["pending"] == 1 and rec["dropped"] == 0
        assert "127.0.0.1" in rec["url"] and "OperationalError" in rec["error"]
        listed = client.get("/inspections")
        assert listed.status_code == 503 and listed.json()["error"]["code"] == "records_unavailable"
        assert "zsi_records_db_up 0.0" in client.get("/metrics").text


def test_hostile_query_values_never_stall_the_records(app_client, db_settings):
    """An unknown product or method name of any length or with NUL is recorded (cut to its
    column, NUL removed) and never blocks the writer; NUL in a filter or a review is a 422."""
    img = png_bytes(random_image(21))
    with app_client(**db_settings) as (client, services):
        refused = [
            inspect(client, img, product="p" * 300),
            inspect(client, img, product="a\x00b"),
            inspect(client, img, method="m" * 100),
        ]
        assert [r.status_code for r in refused] == [404, 404, 422]
        ok = inspect(client, img, product="bottle")
        assert ok.status_code == 200
        listed = client.get("/inspections", params={"limit": 10})
        assert listed.status_code == 200, listed.json()
        got = {x["id"]: x for x in listed.json()["inspections"]}
        ids = [r.headers["x-inspection-id"] for r in refused]
        assert set(ids) | {ok.json()["inspection_id"]} <= set(got)
        assert got[ids[0]]["product"] == "p" * 64 and got[ids[1]]["product"] == "ab"
        assert got[ids[2]]["method"] == "m" * 32
        assert all(got[i]["timings_ms"]["total"] >= 0.0 for i in ids)  # a refusal's time is kept too
        st = services.records.status()
        assert st["state"] == "ok" and st["dropped"] == 0 and st["pending"] == 0

        bad = client.get("/inspections", params={"product": "a\x00b"})
        assert bad.status_code == 422, bad.json()
        rid = ok.json()["inspection_id"]
        r = client.put(
            f"/inspections/{rid}/review", json={"verdict": "good", "reviewer": "x", "note": "a\x00"}
        )
        assert r.status_code == 422, r.json()
        r = client.put(f"/inspections/{rid}/review", json={"verdict": "good", "reviewer": "x\x00"})
        assert r.status_code == 422, r.json()
