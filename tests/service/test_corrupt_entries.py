"""A corrupt entry in the shared store is a miss: dropped, recomputed where it can be, counted.

Issue 10, item 6: a prototype blob whose shape does not match its bytes, or a reference
blob whose header is a JSON list, made every request of the product a 500 for the
entry's TTL (7 days). Real Redis (db 15, random key prefix), no mock.
"""

from __future__ import annotations

import json
import struct
from typing import cast

import numpy as np
import pytest
import redis

from models.serialization import MAGIC, VERSION, pack_array, unpack_array
from prompts import builtin_products
from tests.service.conftest import png_bytes, random_image

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]
RAW = {"content-type": "image/png"}


def with_header(blob: bytes, edit) -> bytes:
    """``blob`` with its JSON header replaced by ``edit(header)``."""
    (hlen,) = struct.unpack("<I", blob[5:9])
    header = json.loads(blob[9 : 9 + hlen])
    new = json.dumps(edit(header)).encode()
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(new)) + new + blob[9 + hlen :]


def metric(text: str, kind: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'zsi_cache_corrupt_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_corrupt_prototype_blob_is_dropped_recomputed_and_counted(app_client, redis_url, key_prefix):
    direct = redis.Redis.from_url(redis_url)
    img = png_bytes(random_image(11))
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (client, services):
        det = services.methods["winclip"].detector
        key = services.array_cache.prefix + det.text_cache_key(
            det.prompt_digest(product=builtin_products()["bottle"])
        )
        good = pack_array(np.zeros((2, 32), np.float32))
        bad = with_header(good, lambda h: {**h, "arrays": [{**h["arrays"][0], "shape": [3, 32]}]})
        direct.set(key, bad, ex=7 * 24 * 3600)
        for _ in range(2):
            r = client.post("/inspect?product=bottle", content=img, headers=RAW)
            assert r.status_code == 200, r.text
        assert det.counters()["text_prototypes_computed"] == 1
        assert metric(client.get("/metrics").text, "text_prototypes") == 1.0
        healed = unpack_array(direct.get(key))  # recomputed and stored again
        assert healed.shape[0] == 2 and healed.dtype == np.float32
    direct.close()


def test_corrupt_reference_blob_falls_back_to_zero_shot_and_is_dropped(app_client, redis_url, key_prefix):
    direct = redis.Redis.from_url(redis_url)
    goldens = [("images", (f"g{i}.png", png_bytes(random_image(60 + i)), "image/png")) for i in range(2)]
    img = png_bytes(random_image(70))
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (a, sa):
        assert a.post("/products/bottle/references", files=goldens).status_code == 200
        entry = next(iter(sa.references.index("bottle").values()))
        blob_key = entry["key"]
        blob = direct.get(blob_key)
    (hlen,) = struct.unpack("<I", blob[5:9])
    listed = b"[1, 2, 3]"
    direct.set(
        blob_key, MAGIC + bytes([VERSION]) + struct.pack("<I", len(listed)) + listed + blob[9 + hlen :]
    )
    # a second process (no decoded copy in memory) reads the corrupt blob
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (b, _):
        for _ in range(2):
            r = b.post("/inspect?product=bottle", content=img, headers=RAW)
            assert r.status_code == 200, r.text
            assert r.json()["used_references"] is False
        assert metric(b.get("/metrics").text, "references") == 1.0
        assert direct.get(blob_key) is None  # dropped: the next request does not read it again
        listing = b.get("/products/bottle/references").json()
        assert listing["sets"][0]["stored"] is False  # says: upload the golden images again
    direct.close()


def test_corrupt_product_and_reference_index_are_counted(app_client, redis_url, key_prefix):
    direct = redis.Redis.from_url(redis_url)
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (client, _):
        direct.set(f"{key_prefix}product:broken", b"[1, 2]")
        direct.set(f"{key_prefix}refs:bottle", b'{"sets": [1]}')
        assert client.get("/products/broken").status_code == 404
        assert client.get("/products/bottle/references").json()["sets"] == []
        r = client.post("/inspect?product=bottle", content=png_bytes(random_image(1)), headers=RAW)
        assert r.status_code == 200
        text = client.get("/metrics").text
        assert metric(text, "product") >= 1.0
        assert metric(text, "reference_index") >= 1.0
    direct.close()


def _edit_result(blob: bytes, arrays_edit=None, meta_edit=None) -> bytes:
    """A result-cache entry with its map and/or header edited, still a well-formed blob."""
    import zlib

    from models.serialization import pack_arrays, unpack_arrays

    arrays, meta = unpack_arrays(zlib.decompress(blob))
    arrays = arrays_edit(dict(arrays)) if arrays_edit else dict(arrays)
    meta = meta_edit(dict(meta)) if meta_edit else dict(meta)
    return zlib.compress(pack_arrays(arrays, meta))


RESULT_CORRUPTIONS = {
    "not zlib": lambda b: b"garbage",
    "regions not objects": lambda b: _edit_result(b, meta_edit=lambda m: {**m, "regions": [1, 2]}),
    "region without bounds": lambda b: _edit_result(b, meta_edit=lambda m: {**m, "regions": [{"x0": "a"}]}),
    "region outside the image": lambda b: _edit_result(
        b,
        meta_edit=lambda m: {
            **m,
            "regions": [
                {"x0": 0, "y0": 0, "x1": 10**6, "y1": 0, "area": 1, "max_score": 0.9, "mean_score": 0.9}
            ],
        },
    ),
    "score nan": lambda b: _edit_result(b, meta_edit=lambda m: {**m, "score": float("nan").hex()}),
    "empty map": lambda b: _edit_result(b, arrays_edit=lambda a: {"map_dx": np.zeros((0, 0), np.int16)}),
    "map not at the image size": lambda b: _edit_result(
        b, arrays_edit=lambda a: {"map_dx": np.zeros((3, 7), np.int16)}
    ),
    "width a float": lambda b: _edit_result(b, meta_edit=lambda m: {**m, "image_width": 3.5}),
    "details a list": lambda b: _edit_result(b, meta_edit=lambda m: {**m, "details": [1]}),
}


def test_corrupt_result_cache_entries_are_misses_recomputed_and_counted(app_client, redis_url, key_prefix):
    """Well-formed blobs with a wrong map or header (regions, NaN score, map size) made every
    identical request a 500 for the entry's TTL; each must be a counted, deleted miss."""
    direct = redis.Redis.from_url(redis_url)
    img = png_bytes(random_image(12))
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (client, services):
        first = client.post("/inspect?product=bottle", content=img, headers=RAW)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        (key,) = [k for k in direct.scan_iter(match=f"{key_prefix}res:*", count=500)]
        good = direct.get(key)
        stats = services.methods["winclip"].queue.stats
        for n, (name, corrupt) in enumerate(RESULT_CORRUPTIONS.items(), start=1):
            direct.set(key, corrupt(good), ex=3600)
            passes = stats.images
            for output in ("json", "png"):
                r = client.post(f"/inspect?product=bottle&output={output}", content=img, headers=RAW)
                assert r.status_code == 200, (name, output, r.text)
            assert stats.images == passes + 1, name  # recomputed once, then a valid hit
            assert r.headers["x-cache"] == "hit", name
            assert metric(client.get("/metrics").text, "results") == n, name
            assert direct.get(key) == good, name  # the corrupt entry was replaced by the recomputed one
            again = client.post("/inspect?product=bottle", content=img, headers=RAW).json()
            assert again["score"] == first.json()["score"] and again["regions"] == first.json()["regions"]
    direct.close()


def test_corrupt_kept_golden_images_read_as_missing_deleted_and_counted(app_client, redis_url, key_prefix):
    """A kept golden image whose bytes are not the upload (garbage, truncated) made calibration and
    ?append=true a 400 `not_an_image` blaming the caller, for the image's TTL; it must be a counted
    miss: deleted, left out of calibration (which says so), append asks for the set again."""
    direct = redis.Redis.from_url(redis_url)
    goldens = [("images", (f"g{i}.png", png_bytes(random_image(40 + i)), "image/png")) for i in range(4)]
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (client, _):
        assert client.post("/products/bottle/references", files=goldens).status_code == 200
        keys = sorted(k for k in direct.scan_iter(match=f"{key_prefix}refimg:bottle:*", count=500))
        assert len(keys) == 4
        direct.set(keys[0], b"not an image at all")
        direct.set(keys[1], cast(bytes, direct.get(keys[1]))[:100])  # truncated
        r = client.post("/products/bottle/calibrate", json={"target_false_reject_rate": 0.5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["calibration"]["sources"]["golden_leave_one_out"] == 2
        assert any("2 golden image(s) left out" in n for n in body["notes"]), body["notes"]
        assert direct.get(keys[0]) is None and direct.get(keys[1]) is None
        assert metric(client.get("/metrics").text, "golden_images") == 2.0
        more = [("images", ("n.png", png_bytes(random_image(90)), "image/png"))]
        r = client.post("/products/bottle/references", files=more, params={"append": "true"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "golden_images_missing", r.text
    direct.close()


def test_golden_features_of_the_wrong_shape_are_dropped_and_counted(app_client, redis_url, key_prefix):
    """A stored set whose blob is well formed but whose arrays have the wrong shape (a feature
    width off by one, no rows) passed the header checks and failed inside the model: a 500 on
    every inspection of the product for the set's TTL. It must be a counted, deleted miss:
    WinCLIP falls back to zero-shot, AnomalyDINO asks for the golden images again (409)."""
    from models.serialization import pack_arrays, unpack_arrays

    direct = redis.Redis.from_url(redis_url)
    goldens = [("images", (f"g{i}.png", png_bytes(random_image(20 + i)), "image/png")) for i in range(2)]
    img = png_bytes(random_image(30))
    settings = {"redis_url": redis_url, "key_prefix": key_prefix, "methods": ("winclip", "anomalydino")}
    with app_client(**settings) as (a, sa):
        assert a.post("/products/bottle/references", files=goldens).status_code == 200
        keys = {e["method"]: e["key"] for e in sa.references.index("bottle").values()}
    original = {key: cast(bytes, direct.get(key)) for key in keys.values()}
    for edit in (lambda arr: arr[:, :-1], lambda arr: arr[:0]):  # a width off by one; no rows
        for key, blob in original.items():
            arrays, meta = unpack_arrays(blob)
            direct.set(key, pack_arrays({k: edit(v) for k, v in arrays.items()}, meta))
        # a second process (no decoded copy in memory) reads the broken sets
        with app_client(**settings) as (b, _):
            for method, status in (("winclip", 200), ("anomalydino", 409)):
                r = b.post(f"/inspect?product=bottle&method={method}", content=img, headers=RAW)
                assert r.status_code == status, (method, r.text)
                if status == 200:
                    assert r.json()["used_references"] is False
                else:
                    assert r.json()["error"]["code"] == "references_required"
            assert metric(b.get("/metrics").text, "references") == 2.0
        assert all(direct.get(k) is None for k in keys.values())  # dropped, not read again
    direct.close()


@pytest.mark.parametrize(
    "bad",
    [
        lambda good: good[:, :-1],  # a well-formed blob of another width: failed inside the model
        lambda good: np.concatenate([good, good[:1]]),
        lambda good: np.full_like(good, np.nan),
        lambda good: good.astype(np.float64),
    ],
    ids=["width", "rows", "nan", "float64"],
)
def test_prototypes_of_the_wrong_shape_are_recomputed_and_counted(app_client, redis_url, key_prefix, bad):
    direct = redis.Redis.from_url(redis_url)
    img = png_bytes(random_image(13))
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (client, services):
        det = services.methods["winclip"].detector
        first = client.post("/inspect?product=bottle", content=img, headers=RAW).json()
        key = services.array_cache.prefix + det.text_cache_key(
            det.prompt_digest(product=builtin_products()["bottle"])
        )
        good = unpack_array(cast(bytes, direct.get(key)))
    direct.set(key, pack_array(bad(good)), ex=7 * 24 * 3600)
    # a second process (nothing decoded in memory) reads the broken prototypes
    with app_client(redis_url=redis_url, key_prefix=key_prefix, result_cache=False) as (client, services):
        det = services.methods["winclip"].detector
        for _ in range(2):
            r = client.post("/inspect?product=bottle", content=img, headers=RAW)
            assert r.status_code == 200, r.text
            assert r.json()["score"] == pytest.approx(first["score"], abs=1e-6)
        assert det.counters()["text_prototypes_computed"] == 1
        assert metric(client.get("/metrics").text, "text_prototypes") == 1.0
        healed = unpack_array(cast(bytes, direct.get(key)))
        assert healed.shape == good.shape and np.array_equal(healed, good)
    direct.close()
