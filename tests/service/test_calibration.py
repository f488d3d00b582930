"""Threshold calibration in the service (issue 12, parts 3-4), on the real tiny WinCLIP.

POST /products/{id}/calibrate scores the product's kept golden images leave-one-out (plus good
images sent, plus reviewed records) and sets the product's threshold; every /inspect answer then
decides with it, says where it comes from, adds normalized_score and takes a sensitivity.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.calibration import calibrate_threshold, effective_threshold, normalize_score
from prompts import builtin_products
from tests.service.conftest import png_bytes, random_image

pytestmark = pytest.mark.timeout(300)
PNG = {"content-type": "image/png"}


def inspect(client, data: bytes, **params):
    r = client.post("/inspect", params=params, content=data, headers=PNG)
    assert r.status_code == 200, r.json()
    return r


def goldens(n: int, seed: int = 100) -> list[np.ndarray]:
    return [random_image(seed + i) for i in range(n)]


def upload(client, images, product: str = "bottle", **params):
    files = [("images", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(images)]
    r = client.post(f"/products/{product}/references", files=files, params=params)
    assert r.status_code == 200, r.json()
    return r.json()


def test_calibrate_from_golden_images_end_to_end(app_client):
    """Given 19 golden images, when the product is calibrated at 5 %, then the threshold is set from the
    leave-one-out scores (= detector.leave_one_out, not the scores against the full set), GET shows it
    with its provenance, and /inspect decides with it and says so."""
    golden = goldens(19)
    bottle = builtin_products()["bottle"]
    with app_client() as (client, services):
        det = services.methods["winclip"].detector
        up = upload(client, golden)
        assert up["images_kept"] == 19
        r = client.post("/products/bottle/calibrate", json={"target_false_reject_rate": 0.05})
        assert r.status_code == 200, r.json()
        out = r.json()

        loo = [res.score for res in det.leave_one_out(golden, product=bottle)]
        want = calibrate_threshold(loo, 0.05)
        assert out["threshold"] == pytest.approx(want.threshold, abs=1e-6)
        assert out["good_scores"]["min"] == pytest.approx(min(loo), abs=1e-6)
        assert out["good_scores"]["max"] == pytest.approx(max(loo), abs=1e-6)
        # scoring each image against the full set (itself included) would give a much lower threshold
        refs = det.encode_references(golden, product=bottle)
        self_scored = [res.score for res in det.predict_batch(golden, product=bottle, references=refs)]
        assert out["threshold"] > calibrate_threshold(self_scored, 0.05).threshold + 1e-3

        cal = out["calibration"]
        assert cal["n"] == 19 and cal["rank"] == 19 and cal["n_required"] == 19
        assert cal["bound"] == "marginal" and cal["guaranteed_false_reject_rate"] == pytest.approx(0.05)
        assert out["sources"]["golden_leave_one_out"] == 19 and out["sources"]["extra"] == 0
        assert (
            cal["method"] == "winclip"
            and cal["model"] == det.model_name
            and cal["weights"] == det.weights_tag
        )
        assert cal["prompt_digest"] == det.prompt_digest(product=bottle)
        assert cal["reference_count"] == 19 and cal["reference_key"] and cal["random_weights"] is True
        assert "0.05" in cal["promise"] and cal["calibrated_at"]
        assert out["previous_threshold"] == bottle.threshold and out["previous_threshold_source"] == "product"

        product = client.get("/products/bottle").json()
        assert product["threshold"] == out["threshold"]  # full precision, through JSON and the store
        assert product["threshold_source"] == "calibrated" and product["source"] == "override"
        assert product["calibration"] == cal

        part = random_image(7)
        ans = inspect(client, png_bytes(part), product="bottle")
        body = ans.json()
        assert body["threshold"] == body["product_threshold"] == out["threshold"]
        assert body["threshold_source"] == "calibrated" and body["sensitivity"] == 0.5
        assert body["calibration"]["n"] == 19 and body["calibration"]["reference_key"] == cal["reference_key"]
        assert body["warnings"] == []
        assert body["normalized_score"] == normalize_score(body["score"], out["threshold"])
        assert body["decision"] == ("anomalous" if body["score"] >= out["threshold"] else "normal")
        assert ans.headers["x-threshold-source"] == "calibrated" and "x-calibration-stale" not in ans.headers
        assert float(ans.headers["x-normalized-score"]) == pytest.approx(body["normalized_score"], abs=1e-6)

        # at the threshold exactly: normalized_score 0.5 and anomalous (a hand-set threshold at the score)
        r = client.put("/products/bottle", json={"object_name": "bottle", "threshold": body["score"]})
        assert r.json()["threshold_source"] == "product" and r.json()["calibration"] is None
        at = inspect(client, png_bytes(part), product="bottle").json()
        assert at["normalized_score"] == 0.5 and at["decision"] == "anomalous"
        assert at["threshold_source"] == "product" and at["calibration"] is None

        # output=png carries the normalised score and the threshold source in headers
        png = client.post(
            "/inspect", params={"product": "bottle", "output": "png"}, content=png_bytes(part), headers=PNG
        )
        assert png.headers["content-type"] == "image/png"
        assert (
            float(png.headers["x-normalized-score"]) == 0.5 and png.headers["x-threshold-source"] == "product"
        )


def test_refusals(app_client):
    """Too few good images: 422 saying n and n_required; no golden images and none sent: 409; a
    calibration cannot be PUT; bad options: 422; a JSON body over ZSI_MAX_JSON_BYTES: 413."""
    with app_client(max_json_bytes=2048) as (client, _):
        upload(client, goldens(5))
        r = client.post("/products/bottle/calibrate", json={"target_false_reject_rate": 0.05})
        assert r.status_code == 422, r.json()
        err = r.json()["error"]
        assert err["code"] == "too_few_images" and err["n"] == 5 and err["n_required"] == 19
        assert "19" in err["message"] and err["sources"]["golden_leave_one_out"] == 5
        r = client.post(
            "/products/bottle/calibrate", json={"target_false_reject_rate": 0.1, "confidence": 0.9}
        )
        assert r.status_code == 422 and r.json()["error"]["n_required"] == 22  # PAC needs more
        # a target so small that 1 - target rounds to 1.0: refused at once (no endless loop)
        r = client.post(
            "/products/bottle/calibrate", json={"target_false_reject_rate": 1e-20, "confidence": 0.9}
        )
        assert r.status_code == 422 and r.json()["error"]["n_required"] > 10**20
        assert client.get("/products/bottle").json()["threshold_source"] == "product"  # unchanged

        r = client.post("/products/cable/calibrate", json={})
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_good_images"
        assert client.post("/products/nope/calibrate", json={}).status_code == 404
        for bad in (
            {"target_false_reject_rate": 0},
            {"target_false_reject_rate": 1.5},
            {"confidence": 1},
            {"x": 1},
        ):
            r = client.post("/products/bottle/calibrate", json=bad)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameters", bad
        r = client.post(
            "/products/bottle/calibrate", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422
        r = client.post("/products/bottle/calibrate", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = client.post("/products/bottle/calibrate", json={"method": "winclip", "pad": "x" * 4000})
        assert r.status_code == 413 and r.json()["error"]["max_bytes"] == 2048

        r = client.put("/products/gear", json={"object_name": "gear", "calibration": {"threshold": 0.3}})
        assert r.status_code == 422
        r = client.post(
            "/inspect", params={"product": "bottle", "sensitivity": 1.5}, content=b"x", headers=PNG
        )
        assert r.status_code == 422


def test_stale_calibration_warns_and_put_keeps_or_clears_it(app_client):
    """Given a calibrated product, when its words or its golden set change, then every answer warns
    (the promise no longer holds) and names what changed; a PUT without a threshold (or with the
    calibrated one) keeps the calibration, any other threshold clears it."""
    with app_client() as (client, _):
        upload(client, goldens(9))
        cal = client.post("/products/bottle/calibrate", json={"target_false_reject_rate": 0.1}).json()
        t = cal["threshold"]
        part = png_bytes(random_image(8))
        assert inspect(client, part, product="bottle").json()["warnings"] == []

        r = client.put(
            "/products/bottle", json={"object_name": "bottle", "extra_anomalous_states": ["dented {}"]}
        )
        assert (
            r.status_code == 200
            and r.json()["threshold"] == t
            and r.json()["threshold_source"] == "calibrated"
        )
        ans = inspect(client, part, product="bottle")
        body = ans.json()
        assert body["threshold"] == t and body["threshold_source"] == "calibrated"
        assert (
            len(body["warnings"]) == 1
            and "prompts" in body["warnings"][0]
            and "calibrate again" in body["warnings"][0]
        )
        assert ans.headers["x-calibration-stale"] == "prompts"
        rec = client.get(f"/inspections/{body['inspection_id']}").json()
        assert rec["threshold_provenance"]["warnings"] == body["warnings"]

        upload(client, goldens(9, seed=300))  # another golden set
        ans = inspect(client, part, product="bottle")
        assert ans.headers["x-calibration-stale"] == "prompts,golden-set"
        # another method for the product: that threshold was not calibrated for it either
        r = client.put("/products/bottle", json={"object_name": "bottle", "threshold": t})
        assert r.json()["threshold_source"] == "calibrated"  # the calibrated value: kept
        ans = inspect(client, part, product="bottle")
        assert ans.headers["x-calibration-stale"] == "golden-set"  # the words are back

        r = client.put("/products/bottle", json={"object_name": "bottle", "threshold": 0.4})
        assert r.json()["threshold"] == 0.4 and r.json()["calibration"] is None
        body = inspect(client, part, product="bottle").json()
        assert (
            body["threshold_source"] == "product" and body["warnings"] == [] and body["calibration"] is None
        )
        r = client.delete("/products/bottle")  # the override goes, the built-in is back
        assert client.get("/products/bottle").json()["threshold"] == builtin_products()["bottle"].threshold


def test_sensitivity_moves_the_decision_records_and_result_cache(app_client):
    """Given a calibrated product, when a part is inspected at several sensitivities, then the decision
    is score >= effective_threshold(t, sensitivity) (== normalized_score >= 1 - sensitivity), the answer
    says both thresholds, a sensitivity above 0.5 warns, the records carry it all, and the result
    cache answers a part seen before the calibration (no model pass) and re-decides it."""
    with app_client() as (client, _):
        upload(client, goldens(9))
        part = png_bytes(random_image(9))
        before = inspect(client, part, product="bottle").json()  # cached now, at the old threshold
        cal = client.post("/products/bottle/calibrate", json={"target_false_reject_rate": 0.1}).json()
        t = cal["threshold"]

        again = inspect(client, part, product="bottle")
        body = again.json()
        assert again.headers["x-cache"] == "hit" and body["cached"] is True
        assert body["score"] == before["score"] and body["threshold"] == t
        assert body["decision"] == ("anomalous" if body["score"] >= t else "normal")
        score = body["score"]
        n = body["normalized_score"]
        assert n == normalize_score(score, t)

        for sensitivity in (0.0, 0.2, 0.5, 0.8, 1.0, min(1.0, 1 - n + 1e-6), max(0.0, 1 - n - 1e-6)):
            r = inspect(client, part, product="bottle", sensitivity=sensitivity)
            b = r.json()
            eff = effective_threshold(t, sensitivity)
            assert b["cached"] is True and b["sensitivity"] == sensitivity
            assert b["threshold"] == eff and b["product_threshold"] == t
            assert b["decision"] == ("anomalous" if score >= eff else "normal"), sensitivity
            assert (b["decision"] == "anomalous") == (n >= 1 - sensitivity), sensitivity
            assert b["normalized_score"] == n  # relative to the product threshold, whatever the sensitivity
            assert [("sensitivity" in w) for w in b["warnings"]] == ([True] if sensitivity > 0.5 else [])
            rec = client.get(f"/inspections/{b['inspection_id']}").json()
            assert rec["threshold"] == eff and rec["threshold_source"] == "calibrated"
            assert rec["normalized_score"] == pytest.approx(n, abs=1e-12) and rec["decision"] == b["decision"]
            prov = rec["threshold_provenance"]
            assert prov["product_threshold"] == t and prov["sensitivity"] == sensitivity
            assert (
                prov["calibration"]["n"] == 9
                and prov["calibration"]["reference_key"] == cal["calibration"]["reference_key"]
            )
        lo = inspect(client, part, product="bottle", sensitivity=1 - n + 1e-6).json()
        hi = inspect(client, part, product="bottle", sensitivity=1 - n - 1e-6).json()
        assert lo["decision"] == "anomalous" and hi["decision"] == "normal"  # it moved across the score
        assert inspect(client, part, product="bottle", sensitivity=1.0).json()["decision"] == "anomalous"
        assert inspect(client, part, product="bottle", sensitivity=0.0).json()["decision"] == "normal"
        # no product: the generic threshold, normalised around 0.5
        generic = inspect(client, part).json()
        assert generic["threshold_source"] == "generic" and generic["product_threshold"] == 0.5
        assert generic["normalized_score"] == normalize_score(generic["score"], 0.5)


def test_extra_good_and_defect_images_in_a_multipart_request(app_client):
    """Given a product without golden images, when good and defect images are sent (multipart, with
    a config field), then the good ones calibrate (scored as /inspect scores them), a repeat is left
    out, and the answer gives the recall on the defect images."""
    good = goldens(10, seed=500)
    defect = [random_image(900 + i, 64, 48) for i in range(4)]
    cable = builtin_products()["cable"]
    with app_client() as (client, services):
        det = services.methods["winclip"].detector
        files = [("good", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(good)]
        files.append(("good", ("again.png", png_bytes(good[0]), "image/png")))  # the same part twice
        files += [("defect", (f"d{i}.png", png_bytes(d), "image/png")) for i, d in enumerate(defect)]
        config = {"target_false_reject_rate": 0.1}
        r = client.post("/products/cable/calibrate", files=files, data={"config": json.dumps(config)})
        assert r.status_code == 200, r.json()
        out = r.json()
        assert out["sources"]["extra"] == 10 and out["sources"]["golden_leave_one_out"] == 0
        assert any("left out" in note for note in out["notes"])
        good_scores = [res.score for res in det.predict_batch(good, product=cable)]
        t = calibrate_threshold(good_scores, 0.1).threshold
        assert out["threshold"] == pytest.approx(t, abs=1e-6)
        assert out["calibration"]["reference_key"] is None and out["calibration"]["reference_count"] == 0
        d_scores = [res.score for res in det.predict_batch(defect, product=cable)]
        assert out["defect_scores"]["n"] == 4 and out["calibration"]["n_defect"] == 4
        assert out["recall"] == pytest.approx(sum(s >= out["threshold"] for s in d_scores) / 4)
        # a part scored the same way lands exactly where its calibration score did
        body = inspect(client, png_bytes(good[3]), product="cable").json()
        assert body["score"] == pytest.approx(good_scores[3], abs=1e-6) and body["warnings"] == []

        r = client.post(
            "/products/cable/calibrate",
            files=[("other", ("x.png", png_bytes(good[0]), "image/png"))],
            data={},
        )
        assert r.status_code == 422
        r = client.post("/products/cable/calibrate", files=files, data={"config": "{bad"})
        assert r.status_code == 422
        as_file = [
            ("config", ("options.json", json.dumps({"target_false_reject_rate": 0.5}), "application/json"))
        ]
        r = client.post("/products/cable/calibrate", files=as_file + files[:2])
        assert r.status_code == 200 and r.json()["calibration"]["target_false_reject_rate"] == 0.5


def test_reviewed_records_stored_scores_or_kept_images(app_client):
    """Given inspections an operator judged good (and defect), when calibrating with include_reviewed,
    then a record scored with the current method/model/weights/prompts/golden set gives its stored
    score as is (no model pass), and after the golden set changed its kept image is scored anew."""
    parts = [random_image(700 + i) for i in range(9)]
    bad = random_image(799)
    with app_client() as (client, services):
        client.put("/products/gear", json={"object_name": "gear", "keep_images": True})
        upload(client, goldens(3), product="gear")
        scores = []
        for p in parts:
            body = inspect(client, png_bytes(p), product="gear").json()
            scores.append(body["score"])
            r = client.put(
                f"/inspections/{body['inspection_id']}/review", json={"verdict": "good", "reviewer": "ann"}
            )
            assert r.status_code == 200
        body = inspect(client, png_bytes(bad), product="gear").json()
        client.put(
            f"/inspections/{body['inspection_id']}/review", json={"verdict": "defect", "reviewer": "ann"}
        )

        det = services.methods["winclip"].detector
        calls = det.counters().get("references_encoded", 0)
        r = client.post(
            "/products/gear/calibrate",
            json={"target_false_reject_rate": 0.1, "include_reviewed": True, "use_golden": False},
        )
        assert r.status_code == 200, r.json()
        out = r.json()
        assert out["sources"]["reviewed_scores"] == 9 and out["sources"]["reviewed_rescored"] == 0
        assert out["threshold"] == calibrate_threshold(scores, 0.1).threshold  # the stored scores, exactly
        assert out["calibration"]["n_defect"] == 1 and out["recall"] in (0.0, 1.0)
        assert det.counters().get("references_encoded", 0) == calls

        upload(client, goldens(3, seed=600), product="gear")  # new golden set: stored scores are stale
        r = client.post(
            "/products/gear/calibrate",
            json={"target_false_reject_rate": 0.1, "include_reviewed": True, "use_golden": False},
        )
        out = r.json()
        assert out["sources"]["reviewed_rescored"] == 9 and out["sources"]["reviewed_scores"] == 0
        gear = services.products.get("gear")[0]
        refs = det.encode_references(goldens(3, seed=600), product=gear)
        fresh = [res.score for res in det.predict_batch(parts, product=gear, references=refs)]
        assert out["threshold"] == pytest.approx(calibrate_threshold(fresh, 0.1).threshold, abs=1e-6)

        # golden images + reviewed records together
        r = client.post(
            "/products/gear/calibrate", json={"target_false_reject_rate": 0.1, "include_reviewed": True}
        )
        out = r.json()
        assert out["sources"]["golden_leave_one_out"] == 3 and out["calibration"]["n"] == 12


def test_golden_images_kept_appended_and_deleted_with_the_set(app_client):
    """The uploaded golden bytes are kept with the set (content-addressed, per product), ?append=true
    grows the set (re-encoded from the kept images, duplicates skipped), and a replaced or deleted set
    takes its images with it."""
    a = goldens(3, seed=10)
    b = goldens(2, seed=20)
    with app_client(max_reference_images=5) as (client, services):
        store = services.references
        up = upload(client, a)
        assert up["count"] == 3 and up["added"] == 3 and up["images_kept"] == 3
        kept = store.kept_images("bottle", up["model_key"])
        assert [blob for _, blob in kept.images] == [png_bytes(g) for g in a] and kept.missing == 0

        grown = upload(client, [a[0], *b], append="true")
        assert grown["count"] == 5 and grown["added"] == 2 and grown["computed"] is True
        det = services.methods["winclip"].detector
        assert grown["image_hashes"] == list(det.encode_references(a + b).image_hashes)
        r = client.post(
            "/products/bottle/references",
            files=[("images", ("x.png", png_bytes(random_image(77)), "image/png"))],
            params={"append": "true"},
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images"

        upload(client, b)  # replace: the images of a are gone, b's stay
        keys = store.store.keys(store.image_prefix)
        assert len(keys) == 2 and all(k.startswith(store.image_prefix + "bottle:") for k in keys)
        client.delete("/products/bottle/references")
        assert store.store.keys(store.image_prefix) == []

        # a set stored before golden images were kept: append says so, calibration leaves it out
        upload(client, a)
        index = store.index("bottle")
        for entry in index.values():
            del entry["images"]
        store._write_index("bottle", index)
        assert client.get("/products/bottle/references").json()["sets"][0]["images_kept"] == 0
        r = client.post(
            "/products/bottle/references",
            files=[("images", ("x.png", png_bytes(b[0]), "image/png"))],
            params={"append": "true"},
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "golden_images_missing"
        r = client.post("/products/bottle/calibrate", json={"target_false_reject_rate": 0.5})
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_good_images"


def test_product_changed_while_calibrating_is_a_conflict(app_client):
    from prompts import ThresholdCalibration
    from service.errors import ApiError

    with app_client() as (_, services):
        products = services.products
        scored_with, _ = products.get("bottle")
        products.put("bottle", {"object_name": "bottle", "extra_normal_states": ["shiny {}"]})
        cal = ThresholdCalibration(
            threshold=0.3,
            method="winclip",
            model="m",
            weights="w",
            prompt_digest="p",
            n=9,
            target_false_reject_rate=0.1,
            bound="marginal",
            rank=9,
            order_statistic=0.29,
            guaranteed_false_reject_rate=0.1,
            calibration_false_reject_rate=0.0,
            n_required=9,
            promise="...",
            calibrated_at="2026-01-01T00:00:00+00:00",
        )
        with pytest.raises(ApiError) as info:
            products.set_calibration("bottle", scored_with, cal)
        assert info.value.status == 409 and info.value.code == "product_changed"
        current, _ = products.get("bottle")
        recipe, _ = products.set_calibration("bottle", current, cal)
        assert recipe.threshold == 0.3 and recipe.calibration == cal and math.isfinite(recipe.threshold)


def test_golden_images_live_in_redis_with_the_features(app_client, redis_url, key_prefix):
    import redis

    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (client, _):
        up = upload(client, goldens(2, seed=40))
        r = redis.Redis.from_url(redis_url)
        keys = sorted(k.decode() for k in r.scan_iter(match=f"{key_prefix}refimg:bottle:*"))
        assert len(keys) == 2
        assert {r.get(k) for k in keys} == {png_bytes(g) for g in goldens(2, seed=40)}
        assert up["images_kept"] == 2
        client.delete("/products/bottle/references")
        assert list(r.scan_iter(match=f"{key_prefix}refimg:*")) == []


def test_cli_calibrate_posts_to_the_service(app_client, tmp_path, monkeypatch, capsys):
    """`anomaly-inspect calibrate PRODUCT --good DIR --target-frr 0.1` calls the running service (here
    through the test client) and prints its answer; a refusal is an error on stderr and exit 1."""
    from service import cli

    folder = tmp_path / "good"
    folder.mkdir()
    for i, g in enumerate(goldens(9, seed=50)):
        (folder / f"g{i}.png").write_bytes(png_bytes(g))
    with app_client(api_key="k") as (client, _):

        def post(url, body, headers, timeout_s):
            assert url == "http://svc:8000/products/cable/calibrate" and headers["X-API-Key"] == "k"
            r = client.post(url.removeprefix("http://svc:8000"), content=body, headers=headers)
            return r.status_code, r.content

        monkeypatch.setattr(cli, "_http_post", post)
        monkeypatch.setenv("ZSI_API_KEY", "k")
        code = cli.main(
            ["calibrate", "cable", "--url", "http://svc:8000", "--target-frr", "0.1", "--good", str(folder)]
        )
        out = capsys.readouterr()
        assert code == 0, out.err
        doc = json.loads(out.out)
        assert doc["sources"]["extra"] == 9 and "DEMO" in out.err
        assert (
            client.get("/products/cable", headers={"X-API-Key": "k"}).json()["threshold"] == doc["threshold"]
        )

        code = cli.main(
            ["calibrate", "cable", "--url", "http://svc:8000", "--target-frr", "0.01", "--good", str(folder)]
        )
        err = capsys.readouterr().err
        assert code == 1 and "too_few_images" in err and "99" in err


def test_a_method_without_golden_images_scores_them_as_it_inspects(app_client):
    """Given golden images uploaded for WinCLIP+, when the product is calibrated for a zero-shot method
    (AnomalyCLIP), then the kept golden images are scored as that method inspects (no references,
    nothing to leave out), and an answer from another method warns that the threshold is not its own."""
    golden = goldens(9, seed=800)
    carpet = builtin_products()["carpet"]
    with app_client(methods=("winclip", "anomalyclip")) as (client, services):
        upload(client, golden, product="carpet", method="winclip")
        r = client.post(
            "/products/carpet/calibrate", json={"target_false_reject_rate": 0.1, "method": "anomalyclip"}
        )
        assert r.status_code == 200, r.json()
        out = r.json()
        assert out["sources"]["golden"] == 9 and out["sources"]["golden_leave_one_out"] == 0
        det = services.methods["anomalyclip"].detector
        scores = [res.score for res in det.predict_batch(golden, product=carpet)]
        assert out["threshold"] == pytest.approx(calibrate_threshold(scores, 0.1).threshold, abs=1e-6)
        part = png_bytes(random_image(5))
        assert inspect(client, part, product="carpet", method="anomalyclip").json()["warnings"] == []
        other = inspect(client, part, product="carpet", method="winclip")
        assert other.json()["threshold_source"] == "calibrated" and "method" in other.json()["warnings"][0]
        assert other.headers["x-calibration-stale"].startswith("method,model")


def test_openapi_describes_both_request_bodies(tmp_path):
    from service.app import create_app
    from tests.service.conftest import make_settings

    doc = create_app(make_settings(tmp_path)).openapi()
    op = doc["paths"]["/products/{product_id}/calibrate"]["post"]
    content = op["requestBody"]["content"]
    options = content["application/json"]["schema"]["properties"]
    assert {"target_false_reject_rate", "confidence", "method", "use_golden", "include_reviewed"} <= set(
        options
    )
    assert set(content["multipart/form-data"]["schema"]["properties"]) == {"config", "good", "defect"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CalibrationOut")
    inspect_params = {p["name"] for p in doc["paths"]["/inspect"]["post"]["parameters"]}
    assert "sensitivity" in inspect_params


def test_reference_methods_and_tiled_products_calibrate_leave_one_out(app_client):
    """Given golden images of an AnomalyDINO product and of a tiled product, when each is calibrated,
    then the threshold comes from that method's (tiled) leave-one-out scores, answers decide with it
    without warnings, and changing the product's tiling makes every answer warn (the scores are then
    those of another pipeline, even for a zero-shot method whose golden set does not change)."""
    from models.tiling import TilingConfig, tiled

    golden = goldens(9, seed=900)
    with app_client(methods=("winclip", "anomalydino")) as (client, services):
        dino = services.methods["anomalydino"].detector
        assert client.put("/products/gear", json={"object_name": "gear"}).status_code == 201
        upload(client, golden, product="gear")
        out = client.post("/products/gear/calibrate", json={"target_false_reject_rate": 0.1}).json()
        assert out["method"] == "anomalydino" and out["sources"]["golden_leave_one_out"] == 9
        gear = services.products.get("gear")[0]
        loo = [res.score for res in dino.leave_one_out(golden, product=gear)]
        assert out["threshold"] == pytest.approx(calibrate_threshold(loo, 0.1).threshold, abs=1e-6)
        body = inspect(client, png_bytes(random_image(3)), product="gear").json()
        assert body["method"] == "anomalydino" and body["threshold_source"] == "calibrated"
        assert body["warnings"] == []

        big = [random_image(950 + i, 96, 128) for i in range(9)]
        spec = {"tile": 64, "overlap": 16}
        product = {"object_name": "plate", "default_method": "winclip", "tiling": spec}
        assert client.put("/products/plate", json=product).status_code == 201
        upload(client, big, product="plate", method="winclip")
        out = client.post("/products/plate/calibrate", json={"target_false_reject_rate": 0.1}).json()
        assert out["sources"]["golden_leave_one_out"] == 9
        plate = services.products.get("plate")[0]
        det = tiled(services.methods["winclip"].detector, TilingConfig(tile=64, overlap=16))
        loo = [res.score for res in det.leave_one_out(big, product=plate)]
        assert out["threshold"] == pytest.approx(calibrate_threshold(loo, 0.1).threshold, abs=1e-6)
        part = png_bytes(random_image(4, 96, 128))
        assert inspect(client, part, product="plate").json()["warnings"] == []

        # zero-shot on a tiled product: calibrated, then the tiling changes (threshold kept by the PUT)
        zero = {"object_name": "plate", "default_method": "winclip", "tiling": spec}
        assert client.put("/products/flat", json=zero).status_code == 201
        sent = [("good", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(big)]
        r = client.post(
            "/products/flat/calibrate", files=[*sent, ("config", (None, '{"target_false_reject_rate": 0.1}'))]
        )
        assert r.status_code == 200, r.json()
        assert r.json()["sources"]["extra"] == 9
        assert inspect(client, part, product="flat").json()["warnings"] == []
        assert (
            client.put("/products/flat", json={**zero, "tiling": None}).json()["threshold_source"]
            == "calibrated"
        )
        ans = inspect(client, part, product="flat")
        assert ans.json()["threshold_source"] == "calibrated"
        assert "tiling" in ans.json()["warnings"][0] and "tiling" in ans.headers["x-calibration-stale"]


def test_a_method_that_needs_golden_images_without_its_set_is_a_409(app_client):
    """Given a product without an AnomalyDINO golden set (none, or one encoded for WinCLIP only), when it
    is calibrated for AnomalyDINO, then the answer is 409 references_required (as /inspect answers),
    not a server error, and the product's threshold is unchanged."""
    config = ("config", (None, '{"target_false_reject_rate": 0.1, "method": "anomalydino"}'))
    sent = [("good", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(goldens(9, seed=1100))]
    with app_client(methods=("winclip", "anomalydino")) as (client, _):
        assert client.put("/products/gear", json={"object_name": "gear"}).status_code == 201
        r = client.post("/products/gear/calibrate", files=[*sent, config])
        assert r.status_code == 409 and r.json()["error"]["code"] == "references_required", r.json()
        upload(client, goldens(9, seed=1200), product="gear", method="winclip")
        r = client.post(
            "/products/gear/calibrate", json={"target_false_reject_rate": 0.1, "method": "anomalydino"}
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "references_required", r.json()
        assert client.get("/products/gear").json()["threshold_source"] == "product"


def test_musc_is_calibrated_from_its_golden_set_only(app_client):
    """MuSc scores an image against OTHER images: without a musc golden set /inspect refuses (422
    musc_needs_references) and so does calibration (it scored the sent images against each other, in
    chunks, a score no answer ever gives); with the set, the golden images are scored leave-one-out.
    A stream product likewise (its rolling bank is not a calibration set)."""
    from tests.service.stream_helpers import stream_product

    sent = [("good", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(goldens(9, seed=1300))]
    config = ("config", (None, '{"target_false_reject_rate": 0.1, "method": "musc"}'))
    with app_client(methods=("winclip", "musc")) as (client, services):
        assert client.put("/products/gear", json={"object_name": "gear"}).status_code == 201
        r = client.post("/products/gear/calibrate", files=[*sent, config])
        assert r.status_code == 422 and r.json()["error"]["code"] == "musc_needs_references", r.json()
        assert client.put("/products/line", json=stream_product()).status_code == 201
        r = client.post("/products/line/calibrate", files=[*sent, config])
        assert r.status_code == 422 and r.json()["error"]["code"] == "musc_needs_references", r.json()
        assert "method=musc" in r.json()["error"]["message"]
        assert client.get("/products/line").json()["threshold_source"] == "product"

        golden = goldens(9, seed=1400)
        upload(client, golden, product="gear", method="musc")
        r = client.post("/products/gear/calibrate", json={"target_false_reject_rate": 0.1, "method": "musc"})
        assert r.status_code == 200, r.json()
        assert r.json()["sources"]["golden_leave_one_out"] == 9
        musc = services.methods["musc"].detector
        gear = services.products.get("gear")[0]
        loo = [res.score for res in musc.leave_one_out(golden, product=gear)]
        assert r.json()["threshold"] == pytest.approx(calibrate_threshold(loo, 0.1).threshold, abs=1e-6)
