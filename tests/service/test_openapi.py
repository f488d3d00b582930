"""The OpenAPI description says what the service does (issue 10, item 7)."""

from __future__ import annotations

import pytest

from prompts import MAX_EXTRA_STATES, MAX_OBJECT_NAME_CHARS, MAX_STATE_CHARS
from service.app import create_app, default_detector_factory
from tests.service.conftest import make_settings, png_bytes, random_image

pytestmark = pytest.mark.timeout(120)

OPEN = {("get", "/health"), ("get", "/ready")}
#: The error codes each status may carry (docs/service.md, Errors).
CODES = {
    400: {
        "empty_body",
        "not_an_image",
        "truncated_image",
        "invalid_image",
        "image_too_small",
        "method_not_loaded",
        "references_not_supported",
    },
    401: {"unauthorized"},
    404: {"unknown_product", "not_found", "unknown_inspection", "image_not_kept", "image_expired"},
    409: {
        "builtin_product",
        "refused_inspection",
        "golden_images_missing",
        "no_good_images",
        "product_changed",
    },
    413: {"payload_too_large", "image_too_large"},
    415: {"unsupported_media_type", "unsupported_image_format"},
    422: {
        "invalid_parameters",
        "unknown_method",
        "missing_image",
        "invalid_product",
        "invalid_product_id",
        "invalid_cursor",
        "reviewer_required",
        "stream_budget",
        "musc_needs_references",
        "too_many_images",
        "too_few_images",
        "saturated",
    },
    503: {
        "not_ready",
        "weights_missing",
        "load_failed",
        "queue_full",
        "store_unavailable",
        "shutting_down",
        "records_unavailable",
        "stream_unavailable",
        "stream_fallback_unavailable",
    },
    504: {"timeout"},
}


@pytest.fixture
def openapi(tmp_path) -> dict:
    return create_app(make_settings(tmp_path, api_key="k")).openapi()


def operations(doc: dict):
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def test_every_protected_operation_documents_401(openapi):
    missing = [
        f"{m.upper()} {p}"
        for m, p, op in operations(openapi)
        if (m, p) not in OPEN and "401" not in op["responses"]
    ]
    assert not missing, missing


def test_error_examples_match_their_status(openapi):
    checked = 0
    for m, p, op in operations(openapi):
        for status, resp in op["responses"].items():
            if not status.isdigit() or int(status) < 400 or (m, p) in OPEN:
                continue
            content = resp.get("content", {}).get("application/json", {})
            assert content.get("schema", {}).get("$ref", "").endswith("/ErrorBody"), (m, p, status)
            example = content.get("example")
            assert example is not None, (m, p, status)
            assert example["error"]["code"] in CODES[int(status)], (m, p, status, example)
            checked += 1
    assert checked > 20
    code = openapi["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
    assert "unknown_product" not in str(code.get("examples", ""))


def test_product_schema_states_its_rules(openapi):
    product = openapi["components"]["schemas"]["ProductIn"]["properties"]
    for field in ("extra_normal_states", "extra_anomalous_states"):
        assert product[field]["maxItems"] == MAX_EXTRA_STATES
        assert product[field]["items"]["maxLength"] == MAX_STATE_CHARS
        assert "'{}'" in product[field]["description"] and "exactly once" in product[field]["description"]
    assert product["object_name"]["maxLength"] == MAX_OBJECT_NAME_CHARS
    assert "brace" in product["object_name"]["description"]


def test_405_lists_every_method_of_the_path(app_client):
    with app_client() as (client, _):
        r = client.put("/products/bottle/references")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST", "DELETE"}
        r = client.post("/products/bottle")
        assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "PUT", "DELETE"}


def test_413_one_rule_for_images_on_both_routes(app_client):
    noisy = png_bytes(random_image(1, 200, 200))
    limit = 64 * 1024
    assert len(noisy) > limit
    with app_client(max_image_bytes=limit) as (client, _):
        answers = [
            client.post("/inspect", content=noisy, headers={"content-type": "image/png"}),
            client.post("/inspect", files={"image": ("a.png", noisy, "image/png")}),
            client.post("/products/bottle/references", files=[("images", ("a.png", noisy, "image/png"))]),
        ]
    for r in answers:
        err = r.json()["error"]
        assert r.status_code == 413 and err["code"] == "payload_too_large", err
        assert err["max_bytes"] == limit, err


def test_demo_flags_only_at_the_top_of_an_answer(app_client):
    with app_client(factory=default_detector_factory, demo=True) as (client, _):
        body = client.get("/products").json()
        assert body["demo"] is True
        assert all("demo" not in p and "warning" not in p for p in body["products"])
        one = client.get("/products/bottle").json()
        assert one["demo"] is True and one["warning"]


def test_api_description_is_open_with_a_key_and_redoc_is_gone(app_client):
    """Decision: /docs and /openapi.json stay open (Swagger UI loads the schema without a key;
    it holds no data). /redoc is removed: it needs a CDN, and lines are often offline."""
    with app_client(api_key="k") as (client, _):
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200
        assert client.get("/redoc").status_code in (401, 404)
        assert client.get("/redoc", headers={"X-API-Key": "k"}).status_code == 404
        assert client.get("/products").status_code == 401
        assert client.get("/models").status_code == 401
