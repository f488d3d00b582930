"""Two service instances sharing one real Redis share prototypes, references and products."""

from __future__ import annotations

import socket
import subprocess
import time

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
        assert client.put("/products/offline", json={"object_name": "offline part"}).status_code == 201
        assert client.get("/products/offline").status_code == 200
        models = client.get("/models").json()
        assert models["cache_backend_up"] is False
        assert "zsi_cache_backend_up 0.0" in client.get("/metrics").text


@pytest.mark.skipif(
    subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0,
    reason="needs redis-server",
)
def test_redis_going_away_and_coming_back(app_client, tmp_path):
    port = _free_port()

    def start() -> subprocess.Popen[bytes]:
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
                str(tmp_path),
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
