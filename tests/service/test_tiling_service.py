"""High-resolution tiling in the service (issue 11): a product's ``tiling``, for every method."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import models
from models.tiling import TilingConfig, tiled
from service.queue import InferenceQueue, batch_key
from service.tiling import tile_count
from tests.service.conftest import png_bytes, random_image

pytestmark = pytest.mark.timeout(180)
RAW = {"content-type": "image/png"}
BOTH = ("winclip", "anomalydino")
H, W = 96, 128
TILING = {"tile": 64, "overlap": 16}  # 96x128 -> 2 x 3 = 6 tiles
N_TILES = 6


def files_of(images: list[np.ndarray]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"g{i}.png", png_bytes(g), "image/png")) for i, g in enumerate(images)]


def inspect(client: TestClient, query: str, image: np.ndarray) -> Any:
    return client.post(f"/inspect?{query}", content=png_bytes(image), headers=RAW)


def test_tiled_product_answers_as_the_tiled_detector(app_client) -> None:
    golden = [random_image(200 + i, H, W) for i in range(2)]
    img = random_image(9, H, W)
    cfg = TilingConfig(tile=64, overlap=16, batch=4)
    with app_client(methods=BOTH, tile_batch=4) as (client, services):
        dino = services.methods["anomalydino"].detector
        assert client.put("/products/big", json={"object_name": "plate", "tiling": TILING}).status_code == 201
        assert client.get("/products/big").json()["tiling"] == TILING
        client.put("/products/flat", json={"object_name": "plate"})  # the same product, untiled

        up = client.post("/products/big/references", files=files_of(golden)).json()
        sets = {s["method"]: s for s in up["sets"]}
        assert sets["anomalydino"]["model_key"] == f"{dino.model_key}/tile64-overlap16"
        # the golden images were cut like the inspected ones: 6 tiles each, encoded by the model
        assert dino.counters()["references_encoded"] == 2 * N_TILES
        flat = client.post("/products/flat/references", files=files_of(golden)).json()
        flat_sets = {s["method"]: s for s in flat["sets"]}
        assert flat_sets["anomalydino"]["model_key"] == dino.model_key  # untiled: another key
        assert flat_sets["winclip"]["model_key"] != sets["winclip"]["model_key"]
        assert dino.counters()["references_encoded"] == 3 * N_TILES - 4  # + 2 whole images

        r = inspect(client, "product=big", img)
        assert r.status_code == 200, r.json()
        got = r.json()
        recipe = services.products.get("big")[0]
        direct = tiled(dino, cfg)
        want = direct.predict(
            img, product=recipe, references=direct.encode_references(golden, product=recipe)
        )
        assert got["method"] == "anomalydino" and got["used_references"] is True
        assert got["score"] == pytest.approx(want.score, abs=1e-6)
        assert got["anomaly_map"]["max"] == pytest.approx(float(want.anomaly_map.max()), abs=1e-6)
        assert got["anomaly_map"]["min"] == pytest.approx(float(want.anomaly_map.min()), abs=1e-6)
        assert (got["anomaly_map"]["width"], got["anomaly_map"]["height"]) == (W, H)
        tiling = got["details"]["tiling"]
        assert tiling["tiles"] == N_TILES and tiling["batches"] == 2 and tiling["grid"] == [2, 3]
        assert tiling["tile_scores"] == pytest.approx(want.details["tiling"]["tile_scores"], abs=1e-6)
        timings = got["timings_ms"]
        assert {"model_split", "model_stitch", "model_tile_batch_0", "model_tile_batch_1"} <= set(timings)
        assert "model_tile_batch_2" not in timings and "model_tiles.encode" in timings

        untiled = inspect(client, "product=flat", img).json()
        assert "tiling" not in untiled["details"] and untiled["score"] != got["score"]

        # WinCLIP+ on the same tiled product: the tiled WinCLIP with its tiled golden set
        winclip = services.methods["winclip"].detector
        few = inspect(client, "product=big&method=winclip", img).json()
        wt = tiled(winclip, cfg)
        want_w = wt.predict(img, product=recipe, references=wt.encode_references(golden, product=recipe))
        assert few["used_references"] is True and few["details"]["tiling"]["tiles"] == N_TILES
        assert few["score"] == pytest.approx(want_w.score, abs=1e-5)


def test_a_small_defect_is_in_the_regions_of_a_tiled_answer(app_client) -> None:
    """A 7 px bright spot on a 400 px wide part (< 1/50 of the width), end to end.

    The product threshold is set halfway between the median and the maximum of the
    tiled map; the answer's ``regions`` (what a line acts on) then hold the defect and
    nothing else, while the same product untiled flags nothing there.
    """
    h, w, (y, x, s) = 300, 400, (201, 297, 7)
    assert s < w / 50
    golden = np.clip(120 + np.random.default_rng(1).normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    test = np.clip(120 + np.random.default_rng(2).normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    test[y : y + s, x : x + s] = 255
    tiling = {"tile": 56, "overlap": 8}  # the tiny model's own input size: 7 x 9 = 63 tiles
    with app_client(methods=("anomalydino",), max_tiles=100) as (client, services):
        dino = services.methods["anomalydino"].detector
        direct = tiled(dino, tiling)
        want = direct.predict(test, references=direct.encode_references([golden]))
        thr = 0.5 * (float(want.anomaly_map.max()) + float(np.median(want.anomaly_map)))
        for pid, extra in (("line", {"tiling": tiling}), ("whole", {})):
            body = {"object_name": "plate", "threshold": thr, **extra}
            assert client.put(f"/products/{pid}", json=body).status_code == 201
            assert client.post(f"/products/{pid}/references", files=files_of([golden])).status_code == 200

        def hits(r: dict[str, int]) -> bool:
            return r["x0"] <= x + s - 1 and x <= r["x1"] and r["y0"] <= y + s - 1 and y <= r["y1"]

        got = inspect(client, "product=line", test).json()
        assert got["details"]["tiling"]["tiles"] == 63 and got["threshold"] == pytest.approx(thr)
        assert got["decision"] == "anomalous" and got["regions"], got["regions"]
        assert hits(got["regions"][0]) and all(hits(r) for r in got["regions"])
        plain = inspect(client, "product=whole", test).json()
        assert "tiling" not in plain["details"] and not any(hits(r) for r in plain["regions"])


def test_tiling_with_zero_shot_winclip(app_client) -> None:
    img = random_image(11, H, W)
    with app_client(methods=("winclip",)) as (client, services):
        body = {"object_name": "plate", "default_method": "winclip", "tiling": {"tile": 64, "overlap": 16}}
        client.put("/products/wz", json=body)
        got = inspect(client, "product=wz", img).json()
        recipe = services.products.get("wz")[0]
        det = services.methods["winclip"].detector
        want = tiled(det, TilingConfig(tile=64, overlap=16)).predict(img, product=recipe)
        assert got["used_references"] is False and got["details"]["tiling"]["tiles"] == N_TILES
        assert got["score"] == pytest.approx(want.score, abs=1e-5)
        assert got["anomaly_map"]["max"] == pytest.approx(float(want.anomaly_map.max()), abs=1e-5)
        # a tile as large as the image is the untiled answer, exactly
        client.put("/products/wz", json={**body, "tiling": {"tile": 128, "overlap": 0}})
        one = inspect(client, "product=wz", img).json()
        plain = det.predict(img, product=services.products.get("wz")[0])
        assert one["details"]["tiling"]["tiles"] == 1 and one["score"] == pytest.approx(plain.score, abs=1e-6)


def test_changed_tiling_changes_the_bank_and_the_result_cache_key(app_client) -> None:
    golden = [random_image(300, H, W)]
    img = random_image(12, H, W)
    with app_client(methods=BOTH) as (client, _):
        client.put("/products/big", json={"object_name": "plate", "tiling": TILING})
        client.post("/products/big/references", files=files_of(golden))
        first = inspect(client, "product=big", img).json()
        assert first["cached"] is False
        assert inspect(client, "product=big", img).json()["cached"] is True

        client.put("/products/big", json={"object_name": "plate", "tiling": {"tile": 48, "overlap": 8}})
        r = inspect(client, "product=big", img)  # the bank was made for tile 64: never reused
        assert r.status_code == 409, r.json()
        assert "another anomalydino configuration" in r.json()["error"]["message"]
        up = client.post("/products/big/references", files=files_of(golden)).json()
        assert up["computed"] is True and up["model_key"].endswith("/tile48-overlap8")
        second = inspect(client, "product=big", img).json()
        assert second["cached"] is False and second["details"]["tiling"]["tile"] == 48
        assert second["score"] != first["score"]

        client.put("/products/big", json={"object_name": "plate", "tiling": TILING})  # back again
        back = inspect(client, "product=big", img).json()
        assert back["cached"] is True and back["score"] == first["score"]


def test_too_many_tiles_is_a_clear_413(app_client) -> None:
    img = random_image(13, H, W)
    with app_client(methods=BOTH, max_tiles=4) as (client, services):
        client.put("/products/big", json={"object_name": "plate", "tiling": TILING})
        r = client.post("/products/big/references", files=files_of([img]))
        assert r.status_code == 413, r.json()
        err = r.json()["error"]
        assert err["code"] == "too_many_tiles" and err["tiles"] == N_TILES and err["max_tiles"] == 4
        assert "ZSI_MAX_TILES" in err["message"] and "golden image 0" in err["message"]
        assert services.methods["anomalydino"].detector.counters().get("references_encoded", 0) == 0

        client.put(
            "/products/big", json={"object_name": "plate", "default_method": "winclip", "tiling": TILING}
        )
        r = inspect(client, "product=big", img)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tiles", r.json()
        assert services.methods["winclip"].queue.stats.batches == 0
        rec = client.get(f"/inspections/{r.headers['X-Inspection-Id']}").json()  # recorded, with its size
        assert rec["status"] == 413 and rec["error"]["code"] == "too_many_tiles"
        assert (rec["image"]["width"], rec["image"]["height"]) == (W, H) and rec["image"]["sha256"]
        small = random_image(14, 64, 96)  # 1 x 2 tiles
        assert inspect(client, "product=big", small).status_code == 200


@pytest.mark.parametrize(
    "tiling",
    [
        {"tile": 16, "overlap": 0},  # below 32 px
        {"tile": 64, "overlap": 32},  # overlap must stay below half a tile
        {"tile": 64, "overlap": -1},
        {"tile": 64, "step": 8},  # unknown field
        {"overlap": 8},  # no tile
        {"tile": "big"},
        "on",
    ],
)
def test_invalid_tiling_is_refused(app_client, tiling: Any) -> None:
    with app_client() as (client, _):
        r = client.put("/products/bad", json={"object_name": "x", "tiling": tiling})
        assert r.status_code == 422, r.json()
        assert client.get("/products/bad").status_code == 404


def test_tile_count_matches_the_model_grid() -> None:
    from models.tiling import tile_grid

    for h, w, tile, overlap in [
        (2048, 2448, 518, 64),
        (2048, 2448, 448, 64),
        (96, 128, 64, 16),
        (50, 40, 64, 8),
    ]:
        cfg = TilingConfig(tile=tile, overlap=overlap)
        assert tile_count(h, w, cfg) == len(tile_grid(h, w, cfg))
    assert tile_count(2048, 2448, TilingConfig(tile=518, overlap=64)) == 30


def test_a_queue_batch_of_a_tiled_product_runs_all_its_tiles_through_the_wrapper() -> None:
    det = models.load_tiny_detector("winclip")
    cfg = TilingConfig(tile=64, overlap=16, batch=5)
    images = [random_image(20 + i, H, W) for i in range(3)]

    async def run() -> tuple[list[Any], InferenceQueue]:
        q = InferenceQueue(det, max_batch=8, max_wait_s=0.2)
        q.start()
        try:
            out = await asyncio.gather(
                *(q.submit(im, key=batch_key(None, None, None), tiling=cfg, timeout_s=60) for im in images)
            )
        finally:
            await q.close()
        return list(out), q

    out, q = asyncio.run(run())
    assert q.stats.batch_sizes == [3]  # one batch of three images = 18 tiles in batches of 5
    assert q.detector_for(cfg) is q.detector_for(TilingConfig(tile=64, overlap=16, batch=5))
    want = tiled(det, cfg).predict_batch(images)
    for (res, info), w in zip(out, want, strict=True):
        assert res.details["tiling"]["tiles_in_request"] == 3 * N_TILES
        assert res.details["tiling"]["batches"] == 4 and info["batch_size"] == 3
        assert res.score == pytest.approx(w.score, abs=1e-6)
        np.testing.assert_allclose(res.anomaly_map, w.anomaly_map, atol=1e-6)
