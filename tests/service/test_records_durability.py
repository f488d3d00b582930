"""Durability of inspection records: a real uvicorn server killed with SIGKILL right after its answers,
and a PostgreSQL server (this test's own) stopped in the middle of a load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from service.records.models import InspectionRecord
from tests.service.conftest import png_bytes, random_image
from tests.service.live import REPO, free_port
from tests.service.pg import own_postgres, pg_url  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
PNG = {"content-type": "image/png"}


@contextmanager
def server(tmp_path: Path, name: str, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A uvicorn process (ZSI_DEMO=true, tiny model) on a free port; killed at exit if still running."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ZSI_") and k != "REDIS_URL"}
    environ.update(
        {
            "ZSI_DEMO": "true",
            "ZSI_DEVICE": "cpu",
            "ZSI_DATA_DIR": str(tmp_path / "data"),
            "ZSI_WEIGHTS_DIR": str(tmp_path / "weights"),
            "PYTHONPATH": str(REPO),
            **env,
        }
    )
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--port", str(port)],
            cwd=tmp_path,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"uvicorn exited: {log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def answer_many(url: str, n: int) -> list[str]:
    """n inspections at once (one a refusal); the inspection ids of the answers."""

    def one(i: int) -> str:
        params = {"product": "bottle", "part_id": f"SN-{i}"} if i else {"product": "unknown-product"}
        r = httpx.post(
            f"{url}/inspect", params=params, content=png_bytes(random_image(i)), headers=PNG, timeout=60
        )
        assert r.status_code == (200 if i else 404), r.text
        return r.headers["x-inspection-id"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        return list(pool.map(one, range(n)))


def test_answered_inspections_survive_sigkill(tmp_path, app_client):
    with server(tmp_path, "first") as (url, proc):
        ids = answer_many(url, 12)
        proc.send_signal(signal.SIGKILL)  # right after the answers: no shutdown hook runs
        proc.wait(timeout=10)
    # restart on the same ZSI_DATA_DIR (in-process here: the same app and start-up path)
    with app_client() as (client, services):
        assert services.records.flush(30)
        listed = client.get("/inspections", params={"limit": 500}).json()["inspections"]
        assert set(ids) <= {x["id"] for x in listed}
        assert client.get("/ready").json()["records"]["dropped"] == 0


@pytest.mark.postgres
def test_journal_of_a_killed_server_reaches_postgres(tmp_path, app_client, pg_url):  # noqa: F811
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # no database answers there
    with server(tmp_path, "first", ZSI_DATABASE_URL=down, ZSI_DB_TIMEOUT_S="1") as (url, proc):
        ids = answer_many(url, 8)
        st = httpx.get(f"{url}/ready").json()["records"]
        assert st["written"] == 0 and st["pending"] == 8  # only in the local journal
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with app_client(database_url=pg_url) as (client, services):
        assert services.records.flush(30)
        listed = client.get("/inspections", params={"limit": 500}).json()["inspections"]
        assert {x["id"] for x in listed} == set(ids)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        stored = set(conn.scalars(select(InspectionRecord.id)))
    engine.dispose()
    assert stored == set(ids)


@pytest.mark.postgres
def test_postgres_outage_mid_load(app_client, own_postgres):  # noqa: F811
    pg = own_postgres
    n, stop_after = 24, 6
    with app_client(database_url=pg.url, records_retry_s=0.5, db_timeout_s=1) as (client, services):
        records = services.records

        def outage() -> None:
            pg.stop("immediate")  # like a crash or a pulled cable, while requests keep coming

        ids, stopper = [], None
        for i in range(n):
            if i == stop_after:
                stopper = threading.Thread(target=outage)
                stopper.start()
            r = client.post(
                "/inspect", params={"product": "bottle"}, content=png_bytes(random_image(i)), headers=PNG
            )
            assert r.status_code == 200, r.json()  # inspection goes on
            assert r.headers.get("x-record") is None  # journaled, not dropped
            ids.append(r.json()["inspection_id"])
        assert stopper is not None
        stopper.join()
        pg.wait_down()
        deadline = time.monotonic() + 30
        while records.state != "degraded" and time.monotonic() < deadline:
            client.post(
                "/inspect", params={"product": "bottle"}, content=png_bytes(random_image(99)), headers=PNG
            )
            time.sleep(0.1)
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["records"]["state"] == "degraded"
        assert ready.json()["records"]["pending"] > 0
        metrics = client.get("/metrics").text
        assert "zsi_records_db_up 0.0" in metrics
        extra = client.get("/inspections").json()
        assert extra["error"]["code"] == "records_unavailable"

        pg.start()  # the database is back: the writer catches up
        deadline = time.monotonic() + 60
        while (records.state != "ok" or records.pending_records) and time.monotonic() < deadline:
            time.sleep(0.1)
        st = client.get("/ready").json()["records"]
        assert st["state"] == "ok" and st["pending"] == 0 and st["dropped"] == 0
        metrics = client.get("/metrics").text
        assert "zsi_records_pending 0.0" in metrics and "zsi_records_db_up 1.0" in metrics
        for reason in ("journal_full", "write_error", "corrupt", "rejected"):
            assert f'zsi_records_dropped_total{{reason="{reason}"}} 0.0' in metrics
        listed = {x["id"] for x in client.get("/inspections", params={"limit": 500}).json()["inspections"]}
        assert set(ids) <= listed
    engine = create_engine(pg.url)
    with engine.connect() as conn:
        stored = set(conn.scalars(select(InspectionRecord.id)))
    engine.dispose()
    assert set(ids) <= stored and len(stored) == records.written
