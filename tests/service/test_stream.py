"""Stream products (issue 14): MuSc against the bank of the last accepted parts; files backend (no Redis)."""

from __future__ import annotations

import pytest

from tests.service.conftest import png_bytes
from tests.service.stream_helpers import RAW, part, planted_factory, stream_product

pytestmark = pytest.mark.timeout(240)
METHODS = ("winclip", "musc")


def post(client, image, product="gear", **params):
    query = "&".join(f"{k}={v}" for k, v in {"product": product, **params}.items())
    r = client.post(f"/inspect?{query}", content=png_bytes(image), headers=RAW)
    assert r.status_code == 200, r.text
    return r.json()


def test_stream_setting_is_validated(app_client):
    with app_client(methods=METHODS) as (client, _):
        ok = client.put("/products/gear", json=stream_product())
        assert ok.status_code == 201, ok.text
        got = client.get("/products/gear").json()
        assert got["stream"]["bank"] == 5 and got["stream"]["min_bank"] == 3
        assert got["stream"]["fallback"] == "winclip"
        bad = [
            stream_product(bank=65),  # above MAX_STREAM_BANK
            stream_product(bank=4, min_bank=5),
            stream_product(min_bank=1),
            stream_product(fallback="musc"),
            stream_product(fallback="nope"),
            stream_product(accept_margin=1.0),
            stream_product(unknown=1),
            {**stream_product(), "default_method": "winclip"},  # a stream product is answered by musc
            {**stream_product(), "tiling": {"tile": 64, "overlap": 8}},  # a bank holds whole images
        ]
        for body in bad:
            r = client.put("/products/bad", json=body)
            assert r.status_code == 422, (body, r.text)
        assert client.get("/products/bad").status_code == 404
        # the recipe without stream is an ordinary product again
        plain = client.put("/products/gear", json={"object_name": "gear"}).json()
        assert plain["stream"] is None


def test_warm_up_then_musc_defects_never_enter_the_bank(app_client):
    """Until min_bank the fallback answers (warming_up) and its normal answers fill the bank; then
    MuSc answers against the bank; anomalous parts never enter it; the oldest are evicted; GET shows
    it; records carry the mode and the bank size; DELETE empties it and the product warms up again."""
    with app_client(methods=METHODS, factory=planted_factory) as (client, services):
        assert client.put("/products/gear", json=stream_product()).status_code == 201
        status = client.get("/products/gear/stream").json()
        assert status["size"] == 0 and status["mode"] == "warming_up" and status["capacity"] == 5
        assert status["store"] == "files" and status["bytes_per_image"] == 32840

        first_defect = post(client, part(100, defect=True))
        assert first_defect["warming_up"] is True and first_defect["method"] == "winclip"
        assert first_defect["decision"] == "anomalous" and first_defect["bank_size"] == 0
        assert first_defect["stream"]["appended"] == "rejected_anomalous"

        warm = [post(client, part(i)) for i in range(3)]
        assert [a["warming_up"] for a in warm] == [True, True, True]
        assert [a["method"] for a in warm] == ["winclip"] * 3
        assert [a["bank_size"] for a in warm] == [1, 2, 3]
        assert [a["stream"]["appended"] for a in warm] == ["added"] * 3
        assert warm[0]["stream"]["fallback"] == "winclip" and warm[0]["stream"]["scored_against"] == 0
        # the MuSc backbone encoded every warming-up image, the defect too (its decision came later)
        assert services.methods["musc"].detector.counters()["references_encoded"] == 4

        defect = post(client, part(101, defect=True))
        assert defect["warming_up"] is False and defect["method"] == "musc"
        assert defect["decision"] == "anomalous" and defect["stream"]["appended"] == "rejected_anomalous"
        assert defect["bank_size"] == 3 and defect["stream"]["scored_against"] == 3
        assert defect["details"]["mode"] == "stream" and defect["details"]["bank_size"] == 3
        assert defect["used_references"] is True and defect["reference_count"] == 3

        later = [post(client, part(i)) for i in range(3, 8)]
        assert all(a["method"] == "musc" and a["decision"] == "normal" for a in later)
        assert [a["bank_size"] for a in later] == [4, 5, 5, 5, 5]  # capacity 5: the oldest go
        assert [a["stream"]["scored_against"] for a in later] == [3, 4, 5, 5, 5]

        status = client.get("/products/gear/stream").json()
        goods = [a["image"]["sha256_16"] for a in warm + later]
        assert status["image_hashes"] == goods[-5:]  # newest 5 accepted parts, oldest first
        assert first_defect["image"]["sha256_16"] not in status["image_hashes"]
        assert defect["image"]["sha256_16"] not in status["image_hashes"]
        assert status["size"] == 5 and status["mode"] == "stream" and status["warming_up"] is False
        assert status["oldest_added_at"] <= status["newest_added_at"]
        assert status["bytes"] == sum(e["bytes"] for e in status["entries"]) <= status["budget_bytes"]
        assert status["appends_this_replica"]["added"] == 8
        assert status["appends_this_replica"]["rejected_anomalous"] == 2

        rec = client.get(f"/inspections/{warm[1]['inspection_id']}").json()
        assert rec["stream_mode"] == "warming_up" and rec["bank_size"] == 2 and rec["method"] == "winclip"
        rec = client.get(f"/inspections/{defect['inspection_id']}").json()
        assert rec["stream_mode"] == "stream" and rec["bank_size"] == 3 and rec["method"] == "musc"
        assert rec["reference_count"] == 3 and rec["reference_key"]
        csv = client.get("/inspections/export.csv?product=gear").text
        assert "stream_mode,bank_size" in csv.splitlines()[0]

        gone = client.delete("/products/gear/stream").json()
        assert gone == {"product": "gear", "deleted_images": 5, "epoch": 1, "demo": False, "warning": None}
        assert client.get("/products/gear/stream").json()["size"] == 0
        again = post(client, part(50))
        assert again["warming_up"] is True and again["method"] == "winclip" and again["bank_size"] == 1


def test_the_same_image_enters_once_and_is_never_scored_against_itself(app_client):
    with app_client(methods=METHODS, factory=planted_factory) as (client, _):
        client.put("/products/gear", json=stream_product(min_bank=2))
        a = post(client, part(1))
        assert post(client, part(1))["stream"]["appended"] == "duplicate"
        post(client, part(2))
        again = post(client, part(1))  # in the bank already: scored against the OTHER bank image
        assert again["method"] == "musc" and again["stream"]["scored_against"] == 1
        assert again["stream"]["appended"] == "duplicate" and again["bank_size"] == 2
        assert client.get("/products/gear/stream").json()["image_hashes"][0] == a["image"]["sha256_16"]


def test_result_cache_never_serves_a_stale_stream_answer(app_client):
    """A stream answer depends on the bank: the same image after the bank changed is scored again
    (real tiny MuSc scores, no planting), and the result cache is not used for stream products."""
    with app_client(methods=METHODS) as (client, services):
        assert services.result_cache is not None
        body = stream_product(bank=8, min_bank=2, fallback_threshold=1.0)
        client.put("/products/gear", json={**body, "threshold": 1.0})  # everything is accepted
        warm = post(client, part(1))
        assert warm["threshold_source"] == "stream_fallback" and warm["product_threshold"] == 1.0
        post(client, part(2))
        x = part(7)
        first = post(client, x)
        assert first["method"] == "musc" and first["cached"] is False
        for i in range(3, 6):
            post(client, part(i))
        second = post(client, x)
        assert second["cached"] is False and second["method"] == "musc"
        assert second["stream"]["scored_against"] == 5  # 6 in the bank, x itself left out
        assert second["score"] != pytest.approx(first["score"], abs=1e-9)
        rec = client.get(f"/inspections/{second['inspection_id']}").json()
        assert rec["cached"] is False and rec["reference_key"] != first["inspection_id"]
        # an ordinary product still uses the cache
        client.put("/products/plain", json={"object_name": "plain"})
        post(client, part(9), product="plain")
        assert post(client, part(9), product="plain")["cached"] is True


def test_changeover_guard_and_accept_margin(app_client):
    with app_client(methods=METHODS, factory=planted_factory) as (client, _):
        client.put("/products/gear", json=stream_product(guard_window=4, guard_rate=0.5, accept_margin=0.9))
        a = post(client, part(1, defect=True))
        assert a["stream"]["guard"]["seen"] == 1 and a["stream"]["guard"]["tripped"] is False
        b = post(client, part(2, defect=True))  # 2 of 2 anomalous: >= half the window seen
        assert b["stream"]["guard"]["tripped"] is True
        assert any("DELETE /products/gear/stream" in w for w in b["stream"]["warnings"])
        assert b["stream"]["warnings"][0] in b["warnings"]  # the top-level warnings carry it too
        status = client.get("/products/gear/stream").json()
        assert status["guard"]["tripped"] is True and status["warnings"]
        # score 0.1 is normal, but not below 0.5 x (1 - 0.9): it stays out of the bank
        c = post(client, part(3))
        assert c["decision"] == "normal" and c["stream"]["appended"] == "rejected_margin"
        assert c["bank_size"] == 0
        client.delete("/products/gear/stream")  # the reset empties the guard window too
        assert client.get("/products/gear/stream").json()["guard"]["seen"] == 0


def test_byte_budget_caps_the_bank(app_client):
    # one tiny entry: 32840 bytes of features + the 1024-byte allowance -> 0.1 MiB holds 3
    with app_client(methods=METHODS, factory=planted_factory, stream_max_mb=0.1) as (client, _):
        client.put("/products/gear", json=stream_product(bank=5, min_bank=2))
        sizes = [post(client, part(i))["bank_size"] for i in range(5)]
        assert sizes == [1, 2, 3, 3, 3]
        status = client.get("/products/gear/stream").json()
        assert status["capacity"] == 3 and status["size"] == 3
        assert status["bytes"] <= status["max_bytes"] == int(0.1 * 1024 * 1024)
        client.put("/products/big", json=stream_product(bank=5, min_bank=4))
        r = client.post("/inspect?product=big", content=png_bytes(part(1)), headers=RAW)
        assert r.status_code == 422 and r.json()["error"]["code"] == "stream_budget"
        assert "ZSI_STREAM_MAX_MB" in r.json()["error"]["message"]


def test_total_budget_skips_appends(app_client):
    with app_client(methods=METHODS, factory=planted_factory, stream_total_mb=0.07) as (client, _):
        client.put("/products/gear", json=stream_product(bank=5, min_bank=2))
        out = [post(client, part(i)) for i in range(3)]
        assert [a["bank_size"] for a in out] == [1, 2, 2]
        assert out[2]["stream"]["appended"] == "skipped_budget"
        assert any("ZSI_STREAM_TOTAL_MB" in w for w in out[2]["stream"]["warnings"])


def test_stream_needs_musc_and_a_plain_musc_request_needs_references(app_client):
    with app_client(methods=("winclip",)) as (client, _):
        client.put("/products/gear", json=stream_product())
        r = client.post("/inspect?product=gear", content=png_bytes(part(1)), headers=RAW)
        assert r.status_code == 503 and r.json()["error"]["code"] == "stream_unavailable"
        assert "ZSI_METHODS" in r.json()["error"]["message"]
        assert client.get("/products/gear/stream").status_code == 503
        # a request naming another method is answered by it, outside the stream
        other = post(client, part(1), method="winclip")
        assert other["method"] == "winclip" and other["warming_up"] is None and other["stream"] is None
    with app_client(methods=("musc",)) as (client, _):
        client.put("/products/gear", json=stream_product())
        r = client.post("/inspect?product=gear", content=png_bytes(part(1)), headers=RAW)
        assert r.status_code == 503 and r.json()["error"]["code"] == "stream_fallback_unavailable"
        r = client.post("/inspect?method=musc", content=png_bytes(part(1)), headers=RAW)
        assert r.status_code == 422 and r.json()["error"]["code"] == "musc_needs_references"
        assert client.get("/products/nope/stream").status_code == 404
        assert client.delete("/products/nope/stream").status_code == 404


def test_deleting_a_product_empties_its_bank(app_client):
    with app_client(methods=METHODS, factory=planted_factory) as (client, services):
        client.put("/products/gear", json=stream_product())
        post(client, part(1))
        root = services.settings.data_dir / "stream" / "gear"
        assert any(root.rglob("*.bin"))
        assert client.delete("/products/gear").status_code == 200
        assert not any(root.rglob("*.bin"))
