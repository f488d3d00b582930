"""Two service instances sharing one real Redis share prototypes, references and products."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.service.conftest import png_bytes, random_image

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]
RAW = {"content-type": "image/png"}


def test_second_process_computes_nothing_already_stored(app_client, redis_url, key_prefix):
    goldens = [("images", (f"g{i}.png", png_bytes(random_image(30 + i)), "image/png")) for i in range(2)]
    img = png_bytes(random_image(40))
    with app_client(redis_url=redis_url, key_prefix=key_prefix) as (a, sa):
        det_a = sa.methods["winclip"].detector
        assert a.put("/products/shared-part", json={"object_name": "shared part"}).status_code == 201
        assert a.post("/inspect?product=shared-part", content=img, headers=RAW).status_code == 200
        up = a.post("/products/shared-part/references", files=goldens).json()
        assert up["computed"] is True
        few_a = a.post("/inspect?product=shared-part", content=img, headers=RAW).json()
        assert det_a.counters() == {"text_prototypes_computed": 1, "references_encoded": 2}
        assert a.get("/models").json()["cache"] == "redis+local"

        # result_cache=False: B would answer the same image from A's cached result without any
        # model work; this test is about the prototypes and references B finds stored
        with app_client(redis_url=redis_url, key_prefix=key_prefix, result_cache=False) as (b, sb):
            det_b = sb.methods["winclip"].detector
            # B's own model (random-init, other weights than A's) must not matter for the cache
            # test; the counters prove B computed nothing that A had stored.
            assert b.get("/products/shared-part").json()["source"] == "custom"
            assert b.get("/products/shared-part/references").json()["sets"][0]["count"] == 2
            few_b = b.post("/inspect?product=shared-part", content=img, headers=RAW).json()
            assert few_b["used_references"] is True and few_b["reference_count"] == 2
            again = b.post("/products/shared-part/references", files=goldens).json()
            assert again["computed"] is False
            assert det_b.counters().get("text_prototypes_computed", 0) == 0
            assert det_b.counters().get("references_encoded", 0) == 0
            metrics = b.get("/metrics").text
            assert 'zsi_cache_lookups_total{kind="text_prototypes",result="hit"}' in metrics
            # a product created by B is seen by A
            b.put("/products/from-b", json={"object_name": "b part"})
        assert a.get("/products/from-b").json()["object_name"] == "b part"
        assert few_a["prompt_digest"] == few_b["prompt_digest"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_service_keeps_answering_without_redis(app_client):
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    with app_client(redis_url=url, redis_timeout_s=0.2, redis_retry_s=60) as (client, _):
        r = client.post("/inspect?product=bottle", content=png_bytes(random_image(1)), headers=RAW)
        assert r.status_code == 200, r.json()
        # a write that cannot reach the shared store is refused, never accepted then lost
        r = client.put("/products/offline", json={"object_name": "offline part"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
        assert int(r.headers["retry-after"]) >= 1
        assert client.get("/products/offline").status_code == 404
        models = client.get("/models").json()
        assert models["cache_backend_up"] is False
        assert "zsi_cache_backend_up 0.0" in client.get("/metrics").text


needs_redis_server = pytest.mark.skipif(
    subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0,
    reason="needs redis-server",
)


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """Our own throw-away redis-server on ``port`` (no persistence): tests may kill it."""
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=10)


@needs_redis_server
def test_redis_outage_keeps_what_was_read_and_refuses_writes(app_client, tmp_path):
    """Issue 10, item 5: during an outage a write is refused (503), never accepted then lost,
    and what this process read before the outage (products, golden features) is still served."""
    import redis

    from prompts import ProductRecipe

    port = _free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    img = png_bytes(random_image(3))
    goldens = [("images", (f"g{i}.png", png_bytes(random_image(80 + i)), "image/png")) for i in range(2)]
    try:
        with app_client(redis_url=url, redis_timeout_s=0.2, redis_retry_s=0.3) as (client, services):
            prefix = services.settings.key_prefix
            direct = redis.Redis(port=port)
            # created by another replica: this process only ever READS it from Redis
            seen = ProductRecipe(id="seen", object_name="seen part", threshold=0.4)
            direct.set(f"{prefix}product:seen", seen.model_dump_json())
            assert client.post("/products/seen/references", files=goldens).status_code == 200
            assert client.get("/products/seen").status_code == 200
            before = client.post("/inspect?product=seen", content=img, headers=RAW).json()
            assert before["used_references"] is True
            det = services.methods["winclip"].detector
            encoded = det.counters()["references_encoded"]

            stop_redis(server)
            assert client.get("/products/seen").json()["threshold"] == 0.4
            assert "seen" in {p["id"] for p in client.get("/products").json()["products"]}
            during = client.post("/inspect?product=seen", content=img, headers=RAW)
            assert during.status_code == 200, during.text
            assert during.json()["used_references"] is True
            assert during.json()["score"] == pytest.approx(before["score"], abs=1e-6)
            refused = [
                client.put("/products/y", json={"object_name": "y part"}),
                client.put("/products/seen", json={"object_name": "renamed"}),
                client.delete("/products/seen"),
                client.post("/products/seen/references", files=goldens),
                client.delete("/products/seen/references"),
            ]
            for r in refused:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable" and r.headers["retry-after"]
            assert det.counters()["references_encoded"] == encoded  # refused before any model work
            assert client.get("/products/y").status_code == 404
            assert client.get("/products/seen").json()["object_name"] == "seen part"

            server = start_redis(port, tmp_path)  # back (empty: no persistence)
            time.sleep(0.4)
            assert client.put("/products/y", json={"object_name": "y part"}).status_code == 201
            assert client.get("/products/y").status_code == 200
            direct = redis.Redis(port=port)
            assert direct.get(f"{prefix}product:y") is not None
            direct.close()
    finally:
        stop_redis(server)


@needs_redis_server
def test_redis_going_away_and_coming_back(app_client, tmp_path):
    port = _free_port()

    def start() -> subprocess.Popen[bytes]:
        return start_redis(port, tmp_path)

    server = start()
    img = png_bytes(random_image(2))
    try:
        with app_client(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2, redis_retry_s=0.3) as (
            client,
            services,
        ):
            assert client.post("/inspect?product=bottle", content=img, headers=RAW).status_code == 200
            assert client.get("/models").json()["cache_backend_up"] is True
            server.terminate()
            server.wait(timeout=10)
            for _ in range(3):
                r = client.post("/inspect?product=bottle", content=img, headers=RAW)
                assert r.status_code == 200, r.json()
            assert client.get("/models").json()["cache_backend_up"] is False
            server = start()
            time.sleep(0.4)
            assert client.put("/products/after", json={"object_name": "after"}).status_code == 201
            assert client.get("/models").json()["cache_backend_up"] is True
            import redis

            direct = redis.Redis(port=port)
            assert direct.get(services.settings.key_prefix + "product:after") is not None
            direct.close()
    finally:
        server.kill()
        server.wait(timeout=10)


@needs_redis_server
def test_redis_outage_refuses_the_newer_writes_too(app_client, tmp_path):
    """Issue 10, item 5, for the routes added since: a calibration (JSON and multipart), a golden
    append and a stream reset during an outage are 503 store_unavailable with Retry-After, before
    any model work (never accepted then lost); reads still answer from the local copy."""

    port = _free_port()
    server = start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    goldens = [("images", (f"g{i}.png", png_bytes(random_image(50 + i)), "image/png")) for i in range(3)]
    try:
        with app_client(redis_url=url, redis_timeout_s=0.2, redis_retry_s=0.3, result_cache=False) as (
            client,
            services,
        ):
            assert client.put("/products/part", json={"object_name": "part"}).status_code == 201
            assert client.post("/products/part/references", files=goldens).status_code == 200
            queue = services.methods["winclip"].queue
            images_before = queue.stats.images

            stop_redis(server)
            assert client.get("/products/part").status_code == 200  # read from the local copy
            extra = [("good", ("x.png", png_bytes(random_image(60)), "image/png"))]
            refused = [
                client.post("/products/part/calibrate", json={"target_false_reject_rate": 0.5}),
                client.post(
                    "/products/part/calibrate",
                    data={"config": '{"target_false_reject_rate": 0.5}'},
                    files=extra,
                ),
                client.post(
                    "/products/part/references",
                    params={"append": "true"},
                    files=[("images", ("n.png", png_bytes(random_image(61)), "image/png"))],
                ),
                client.delete("/products/part/stream"),
            ]
            for r in refused:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable" and r.headers["retry-after"]
            assert queue.stats.images == images_before  # refused before any model work
            assert client.get("/products/part").json().get("calibration") is None
            assert client.get("/products/part/references").json()["sets"][0]["count"] == 3
    finally:
        stop_redis(server)
