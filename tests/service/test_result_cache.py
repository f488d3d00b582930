"""Per-image result cache: a repeated image is answered without a model pass (counted), with the
same body; new words or references recompute; a new threshold re-decides from the cached score."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from models.base import AnomalyResult
from models.postprocess import boxes_above, map_to_uint8
from models.serialization import SerializationError
from prompts import builtin_products
from service.cache import LocalCache
from service.result_cache import (
    ResultCache,
    decode_entry,
    dequantize_map,
    encode_entry,
    feature_key,
    quantize_map,
    result_key,
    scoring_digest,
)
from tests.service.conftest import png_bytes, random_image

pytestmark = pytest.mark.timeout(180)
PNG = {"content-type": "image/png"}
#: What may differ between an answer and its cache hit (issue 13: cached, id and timings only).
VOLATILE = {"cached", "inspection_id", "timings_ms"}


def inspect(client, data: bytes, **params):
    return client.post("/inspect", params=params, content=data, headers=PNG)


def model_passes(services) -> int:
    return services.methods["winclip"].queue.stats.images


def same_body(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in set(a) - VOLATILE:
        assert a[k] == b[k], k


def test_second_identical_request_does_no_model_pass(app_client):
    data = png_bytes(random_image(1))
    with app_client() as (client, services):
        r1 = inspect(client, data, product="bottle")
        passes = model_passes(services)
        r2 = inspect(client, data, product="bottle")
        assert model_passes(services) == passes  # counted: no image went through the model
        assert (r1.headers["x-cache"], r2.headers["x-cache"]) == ("miss", "hit")
        a, b = r1.json(), r2.json()
        assert (a["cached"], b["cached"]) == (False, True)
        same_body(a, b)  # score bit-identical, same 8-bit map PNG, regions, image hash, details
        assert a["inspection_id"] != b["inspection_id"]
        # the hit says how its result was computed (the first pass's batch); it queued nothing now
        assert b["batch_size"] == a["batch_size"] == 1 and b["timings_ms"]["inference"] == 0.0
        assert b["timings_ms"]["queue_wait"] == 0.0 and "model_encode" not in b["timings_ms"]
        # each is its own record
        rec = client.get(f"/inspections/{b['inspection_id']}").json()
        assert rec["cached"] is True and rec["score"] == a["score"]
        assert client.get(f"/inspections/{a['inspection_id']}").json()["cached"] is False
        listed = client.get("/inspections", params={"cached": "true"}).json()["inspections"]
        assert [x["id"] for x in listed] == [b["inspection_id"]]
        metrics = client.get("/metrics").text
        assert 'zsi_cache_lookups_total{kind="results",result="hit"} 1.0' in metrics
        assert 'zsi_cache_lookups_total{kind="results",result="miss"} 1.0' in metrics
        # the PNG overlay answer is a hit too, and the same picture
        p1 = client.post("/inspect", params={"product": "cable", "output": "png"}, content=data, headers=PNG)
        passes = model_passes(services)
        p2 = client.post("/inspect", params={"product": "cable", "output": "png"}, content=data, headers=PNG)
        assert model_passes(services) == passes and p2.headers["x-cache"] == "hit"
        assert p1.headers["x-anomaly-score"] == p2.headers["x-anomaly-score"]
        o1 = np.asarray(Image.open(io.BytesIO(p1.content))).astype(int)
        o2 = np.asarray(Image.open(io.BytesIO(p2.content))).astype(int)
        assert np.abs(o1 - o2).max() <= 1


def test_new_words_or_references_recompute_and_a_new_threshold_re_decides(app_client):
    img = random_image(2)
    data = png_bytes(img)
    with app_client() as (client, services):
        det = services.methods["winclip"].detector
        put = client.put("/products/widget", json={"object_name": "widget", "threshold": 0.5})
        assert put.status_code == 201
        first = inspect(client, data, product="widget").json()
        n = model_passes(services)

        # only the threshold changes: no model pass, same score, decision and regions for the new threshold
        for thr in (0.0, first["score"], min(1.0, first["score"] + 1e-6), 1.0):
            client.put("/products/widget", json={"object_name": "widget", "threshold": thr})
            r = inspect(client, data, product="widget")
            body = r.json()
            assert r.headers["x-cache"] == "hit" and model_passes(services) == n
            assert body["score"] == first["score"] and body["threshold"] == thr
            assert body["decision"] == ("anomalous" if first["score"] >= thr else "normal")
            assert body["anomaly_map"] == first["anomaly_map"]
            recipe, _ = services.products.get("widget")
            want = det.predict(img, product=recipe)  # an uncached pass, for the regions at thr
            boxes = boxes_above(want.anomaly_map, thr)[: services.settings.max_regions]
            assert [(g["x0"], g["y0"], g["x1"], g["y1"], g["area"]) for g in body["regions"]] == [
                (b.x0, b.y0, b.x1, b.y1, b.area) for b in boxes
            ]
            for g, b in zip(body["regions"], boxes, strict=True):
                assert g["max_score"] == pytest.approx(b.max_score, abs=3e-5)
                assert g["mean_score"] == pytest.approx(b.mean_score, abs=3e-5)

        # new words: a new key, a model pass, the new prompt digest
        client.put(
            "/products/widget", json={"object_name": "widget", "extra_anomalous_states": ["dented {}"]}
        )
        r = inspect(client, data, product="widget")
        assert r.headers["x-cache"] == "miss" and model_passes(services) == n + 1
        assert r.json()["prompt_digest"] != first["prompt_digest"]
        assert inspect(client, data, product="widget").headers["x-cache"] == "hit"
        n = model_passes(services)

        # golden images: few-shot result, recomputed; other goldens, recomputed again
        for seed in (30, 40):
            files = [
                ("images", (f"g{i}.png", png_bytes(random_image(seed + i)), "image/png")) for i in range(2)
            ]
            assert client.post("/products/widget/references", files=files).status_code == 200
            r = inspect(client, data, product="widget")
            assert r.headers["x-cache"] == "miss" and r.json()["used_references"] is True
            assert model_passes(services) == n + 1
            n += 1
            assert inspect(client, data, product="widget").headers["x-cache"] == "hit"
        client.delete("/products/widget/references")
        assert (
            inspect(client, data, product="widget").headers["x-cache"] == "hit"
        )  # zero-shot entry still there

        # same pixels, other bytes (re-encoded): keyed by the uploaded bytes, so a miss
        jpeg_like = png_bytes(img, "BMP")
        assert inspect(client, jpeg_like, product="widget").headers["x-cache"] == "miss"


def test_shared_through_redis_between_processes(app_client, redis_url, key_prefix):
    data = png_bytes(random_image(5))
    common = {"redis_url": redis_url, "key_prefix": key_prefix}
    with app_client(**common) as (client, _):
        a = inspect(client, data, product="bottle").json()
    with app_client(**common) as (client, services):  # another app (process) on the same Redis
        r = inspect(client, data, product="bottle")
        assert r.headers["x-cache"] == "hit" and model_passes(services) == 0
        same_body(a, r.json())
    import redis

    keys = [k.decode() for k in redis.Redis.from_url(redis_url).scan_iter(match=f"{key_prefix}res:v1:*")]
    assert len(keys) == 1 and redis.Redis.from_url(redis_url).pttl(keys[0]) > 0  # bounded by a TTL


def test_off_switch_and_size_bound(app_client):
    data = png_bytes(random_image(6))
    with app_client(result_cache=False) as (client, services):
        for _ in range(2):
            r = inspect(client, data, product="bottle")
            assert r.headers["x-cache"] == "miss" and r.json()["cached"] is False
        assert model_passes(services) == 2
    with app_client(result_cache_max_entry_kb=1) as (client, services):
        big = png_bytes(random_image(7, 96, 128))
        for _ in range(2):
            assert inspect(client, big, product="bottle").headers["x-cache"] == "miss"
        assert model_passes(services) == 2


# ----------------------------------------------------------------- unit level


def _result(amap: np.ndarray, score: float = 0.123456789012345) -> AnomalyResult:
    return AnomalyResult(
        score=score,
        anomaly_map=amap,
        method="winclip",
        model="m",
        weights="w",
        prompt_digest="p",
        details={"precision": "fp32"},
    )


def test_quantised_map_renders_the_same_8_bit_png_and_keeps_the_score_exactly():
    rng = np.random.default_rng(0)
    amap = rng.random((64, 80), dtype=np.float32)
    # values right at the 8-bit rounding edges, where a plain 16-bit rounding would flip
    edges = ((np.arange(255) + 0.5) / 255).astype(np.float32)
    amap[0, : edges.size // 4] = edges[: edges.size // 4]
    amap[1, :80] = np.nextafter(edges[:80], np.float32(0))
    q = quantize_map(amap)
    back = dequantize_map(q)
    assert np.array_equal(map_to_uint8(back), map_to_uint8(amap))
    assert np.abs(back - amap).max() <= 1.5 / 65535 + 1e-7
    score = float(np.float32(0.7)) + 1e-12
    blob = encode_entry(
        _result(amap, score),
        image_width=80,
        image_height=64,
        pixel_hash="abc",
        threshold=0.5,
        max_regions=10,
        regions=[],
        regions_truncated=False,
    )
    assert blob is not None and b"pickle" not in blob
    entry = decode_entry(blob)
    assert entry.score == score  # bit-identical
    assert entry.map_min == float(amap.min()) and entry.map_max == float(amap.max())
    assert not entry.anomaly_map.flags.writeable
    print(f"entry: {len(blob)} bytes for a {amap.shape} map ({amap.nbytes} bytes as float32)")


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.floats(0, 1, width=32))
)
def test_quantisation_property(amap):
    back = dequantize_map(quantize_map(amap))
    assert back.shape == amap.shape and back.min() >= 0 and back.max() <= 1
    assert np.array_equal(map_to_uint8(back), map_to_uint8(amap))
    assert np.abs(back - amap).max() <= 1.5 / 65535 + 1e-7


def test_keys_change_with_what_changes_the_result_only():
    bottle = builtin_products()["bottle"]
    base = scoring_digest(bottle, "p")
    assert scoring_digest(bottle.model_copy(update={"threshold": 0.9}), "p") == base
    assert scoring_digest(bottle.model_copy(update={"keep_images": True}), "p") == base
    assert scoring_digest(bottle.model_copy(update={"object_name": "jar"}), "p") != base
    assert scoring_digest(bottle.model_copy(update={"extra_normal_states": ("clean {}",)}), "p") != base
    assert scoring_digest(bottle, "q") != base
    assert scoring_digest(None, "p") != base
    k = result_key("zsi:", "m" * 16, "a" * 64, "r" * 16, None)
    assert k == f"zsi:res:v1:{'m' * 16}:{'a' * 64}:{'r' * 16}:none"
    assert feature_key("zsi:", "m" * 16, "a" * 64) == f"zsi:feat:v1:{'m' * 16}:{'a' * 64}"


def test_corrupt_entry_is_a_miss_and_is_removed():
    local = LocalCache()
    seen: list[bool] = []
    cache = ResultCache(local, on_lookup=seen.append)
    local.set("k", b"garbage")
    assert cache.get("k") is None and local.get("k") is None and seen == [False]
    with pytest.raises(SerializationError):
        decode_entry(b"garbage")


def test_answer_map_png_is_identical_from_the_cache():
    """The JSON map PNG encodes the 8-bit map: identical bytes from the dequantised map."""
    from models.postprocess import anomaly_map_png

    amap = np.random.default_rng(3).random((30, 40), dtype=np.float32)
    back = dequantize_map(quantize_map(amap))
    assert anomaly_map_png(back) == anomaly_map_png(amap)
    assert base64.b64encode(anomaly_map_png(back)) == base64.b64encode(anomaly_map_png(amap))
