"""Products API: built-ins, created products, overrides; persistence without Redis."""

from __future__ import annotations

import pytest

from prompts import builtin_products

pytestmark = pytest.mark.timeout(120)


def test_products_crud_and_overrides(app_client):
    with app_client() as (client, _):
        listed = client.get("/products").json()["products"]
        ids = {p["id"] for p in listed}
        assert ids >= set(builtin_products())
        assert all(p["source"] == "builtin" for p in listed)
        bottle = client.get("/products/bottle").json()
        assert bottle["object_name"] == "bottle" and bottle["source"] == "builtin"

        r = client.put(
            "/products/gear-a",
            json={"object_name": "gear", "extra_anomalous_states": ["chipped {}"], "threshold": 0.4},
        )
        assert r.status_code == 201 and r.json()["source"] == "custom"
        r = client.put("/products/gear-a", json={"object_name": "gear wheel", "threshold": 0.45})
        assert r.status_code == 200 and r.json()["object_name"] == "gear wheel"
        assert client.get("/products/gear-a").json()["threshold"] == 0.45

        r = client.put("/products/bottle", json={"object_name": "glass bottle", "threshold": 0.7})
        assert r.status_code == 200 and r.json()["source"] == "override"
        assert client.get("/products/bottle").json()["object_name"] == "glass bottle"
        assert {p["id"]: p["source"] for p in client.get("/products").json()["products"]}[
            "bottle"
        ] == "override"

        assert client.delete("/products/bottle").json()["deleted"] == "override"
        assert client.get("/products/bottle").json()["source"] == "builtin"
        r = client.delete("/products/bottle")
        assert r.status_code == 409 and r.json()["error"]["code"] == "builtin_product"

        assert client.delete("/products/gear-a").json()["deleted"] == "custom"
        assert client.get("/products/gear-a").status_code == 404
        assert client.delete("/products/gear-a").status_code == 404


@pytest.mark.parametrize(
    "pid,body,code",
    [
        ("ok-id", {"object_name": "x", "extra_normal_states": ["no placeholder"]}, "invalid_product"),
        ("ok-id", {"object_name": "x", "threshold": 2}, "invalid_parameters"),
        ("ok-id", {"object_name": "x", "default_method": "magic"}, "invalid_product"),
        ("ok-id", {"object_name": "x", "surprise": 1}, "invalid_parameters"),
        ("Bad_ID", {"object_name": "x"}, "invalid_product_id"),
        ("ok-id", {}, "invalid_parameters"),
    ],
)
def test_invalid_products_are_refused(app_client, pid, body, code):
    with app_client() as (client, _):
        r = client.put(f"/products/{pid}", json=body)
        assert r.status_code == 422, r.json()
        assert r.json()["error"]["code"] == code
        assert client.get(f"/products/{pid}").status_code == 404


def test_created_products_persist_in_data_dir(app_client, tmp_path):
    with app_client() as (client, _):
        assert client.put("/products/kept", json={"object_name": "kept part"}).status_code == 201
    assert any((tmp_path / "data").rglob("*"))
    with app_client() as (client, _):  # a new app on the same ZSI_DATA_DIR
        assert client.get("/products/kept").json()["object_name"] == "kept part"


def test_prompt_fields_are_bounded_over_http(app_client):
    """Issue 10, item 4: 5000 extra states used to be accepted (49 s of text encoding)."""
    with app_client() as (client, _):
        many = [f"state {i} {{}}" for i in range(5000)]
        for body in (
            {"object_name": "part", "extra_anomalous_states": many},
            {"object_name": "part", "extra_normal_states": ["{} " + "x" * 200]},
            {"object_name": "p" * 81},
        ):
            r = client.put("/products/wordy", json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] in ("invalid_parameters", "invalid_product")
        assert client.get("/products/wordy").status_code == 404
        ok = {"object_name": "part", "extra_anomalous_states": many[:32]}
        assert client.put("/products/wordy", json=ok).status_code == 201
