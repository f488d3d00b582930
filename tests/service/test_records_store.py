"""Records below the HTTP layer: the journal, the writer into SQLite and PostgreSQL, migrations,
queries, kept-image retention, labelled sets. Real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client import CollectorRegistry
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from service.records import RecordService, good_images, new_record_id, reviewed_records
from service.records.db import current_revision, head_revision, make_engine, normalize_url, upgrade
from service.records.draft import RecordDraft
from service.records.images import ImageStore, map_to_png16, png16_to_map
from service.records.journal import Journal, JournalFull, decode_line, encode_line
from service.records.models import Base, InspectionRecord
from service.records.query import (
    BadCursor,
    RecordFilter,
    csv_pages,
    get_record,
    list_records,
    review_record,
)
from service.records.store import _row
from tests.service.live import free_port
from tests.service.pg import pg_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)


def draft(**kw: object) -> dict:
    d = RecordDraft(product="bottle", method="winclip", score=0.4, decision="normal", threshold=0.5)
    for k, v in kw.items():
        setattr(d, k, v)
    return d.as_record()


def wait_for(pred, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


# ---------------------------------------------------------------------- journal


def test_line_checksum_round_trip_and_corruption():
    line = encode_line({"id": "a", "score": 0.25})
    assert decode_line(line) == {"id": "a", "score": 0.25}
    flipped = line.replace(b"0.25", b"0.75")
    assert decode_line(flipped) is None  # checksum catches a changed byte
    assert decode_line(line[:-1]) is None  # no newline: incomplete


def test_journal_append_read_commit_rotate(tmp_path):
    j = Journal.create(tmp_path, fsync=True, segment_bytes=300)
    ends = [j.append({"id": f"r{i}", "pad": "x" * 100}) for i in range(7)]
    assert ends == sorted(ends) and len(j.segments()) >= 3  # rotated
    assert j.pending_records == 7
    recs, pos, size = j.read(4)
    assert [r["id"] for r in recs] == ["r0", "r1", "r2", "r3"]
    j.commit(pos, len(recs), size)
    assert j.pending_records == 3
    recs2, pos2, size2 = j.read(100)
    assert [r["id"] for r in recs2] == ["r4", "r5", "r6"] and pos2 == j.end
    j.commit(pos2, len(recs2), size2)
    assert j.pending_records == 0 and j.pending_bytes == 0 and j.drained()
    assert j.segments() == [j.end.segment]  # consumed segments were removed
    assert j.close(remove_if_drained=True) and not j.dir.exists()


def test_journal_limit_raises_journal_full(tmp_path):
    j = Journal.create(tmp_path, fsync=False, max_bytes=1000)
    n = 0
    with pytest.raises(JournalFull):
        while True:
            j.append({"id": n, "pad": "y" * 90})
            n += 1
    assert 5 <= n <= 10 and j.pending_bytes <= 1000
    j.close()


def test_concurrent_appends_with_group_commit_lose_nothing(tmp_path):
    j = Journal.create(tmp_path, fsync=True, segment_bytes=4096)

    def worker(k: int) -> None:
        for i in range(40):
            j.append({"id": f"{k}-{i}"})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs, _, _ = j.read(1000)
    assert sorted(r["id"] for r in recs) == sorted(f"{k}-{i}" for k in range(4) for i in range(40))
    j.close()


def test_orphan_journal_is_adopted_only_when_its_owner_is_gone(tmp_path):
    live = Journal.create(tmp_path)
    live.append({"id": "x"})
    assert Journal.adopt_orphans(tmp_path) == []  # its lock is held
    live.close()  # the owner is gone (lock released), the record is still there
    # a torn last line (crash in the middle of a write) is skipped, not counted as corrupt
    seg = live.dir / "seg-00000001.log"
    with seg.open("ab") as f:
        f.write(b'0000abcd {"id": "half')
    (adopted,) = Journal.adopt_orphans(tmp_path)
    assert adopted.pending_records == 1
    recs, pos, size = adopted.read(10)
    assert [r["id"] for r in recs] == ["x"] and adopted.corrupt == 0
    adopted.commit(pos, 1, size)
    assert adopted.close(remove_if_drained=True)


# ----------------------------------------------------------------- record service


def service(tmp_path: Path, url: str | None = None, **kw) -> RecordService:
    s = RecordService(tmp_path / "data", url, registry=CollectorRegistry(), retry_s=0.5, **kw)
    s.start()
    return s


def count(engine) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(InspectionRecord)) or 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return None  # the embedded default: a SQLite file under the data dir
    return request.getfixturevalue("pg_url")


def test_persist_then_written_to_the_database(tmp_path, db_url):
    s = service(tmp_path, db_url)
    try:
        ids = []
        for i in range(5):
            rec = draft(score=0.1 * i, decision="anomalous" if i >= 3 else "normal", line="L1")
            assert s.persist(rec)
            ids.append(rec["id"])
        assert s.flush(10)
        assert s.status()["state"] == "ok" and s.status()["schema"] == head_revision()
        assert count(s.engine) == 5 and s.written == 5 and s.pending_records == 0
        got = get_record(s.engine, ids[3])
        assert got["score"] == pytest.approx(0.3) and got["decision"] == "anomalous" and got["line"] == "L1"
        assert datetime.fromisoformat(got["created_at"]).tzinfo is not None
    finally:
        s.stop()
    if db_url is None:
        assert (tmp_path / "data/records/inspections.db").is_file()


def test_replayed_records_are_not_duplicated(tmp_path):
    s = service(tmp_path)
    rec = draft()
    s.persist(rec)
    assert s.flush(10)
    # the same journal line again (a crash after the database commit, before the journal moved on)
    with s.engine.begin() as conn:
        s._insert(conn, [_row(rec)])
    assert count(s.engine) == 1
    s.stop()


def test_records_of_a_killed_process_are_stored_by_the_next(tmp_path):
    root = tmp_path / "data" / "records" / "journal"
    dead = Journal.create(root)
    recs = [draft() for _ in range(3)]
    for r in recs:
        dead.append({**r, "created_at": r["created_at"].isoformat()})
    dead.close()  # like SIGKILL: nothing reached the database
    s = service(tmp_path)
    try:
        assert s.flush(10)
        assert {r["id"] for r in recs} <= {x["id"] for x in list_records(s.engine, RecordFilter())[0]}
        wait_for(lambda: not dead.dir.exists())
    finally:
        s.stop()


def test_hostile_values_never_block_the_writer(tmp_path, db_url):
    """Strings longer than their column or holding NUL (PostgreSQL refuses both) are stored
    shortened / without NUL; a row the database still refuses is dropped and counted as
    ``rejected``: the records after it are stored, and the writer stays ``ok``."""
    s = service(tmp_path, db_url)
    try:
        long_product = draft(product="p" * 300, method="m" * 100, error_message="e" * 5000)
        nul = draft(product="a\x00b", line="L\x001", model="x\x00y")
        s.persist(long_product)
        s.persist(nul)
        refused = draft(image_bytes=2**40 if db_url is not None else None)  # integer column overflow
        s.persist(refused)
        after = draft()
        s.persist(after)
        assert s.flush(20), s.status()
        assert s.status()["state"] == "ok"
        engine = s.engine
        assert engine is not None
        got = get_record(engine, long_product["id"])
        assert got["product"] == "p" * 64 and got["method"] == "m" * 32
        got = get_record(engine, nul["id"])
        assert got["product"] == "ab" and got["line"] == "L1" and got["model"] == "xy"
        assert get_record(engine, after["id"])["product"] == "bottle"
        if db_url is not None:  # PostgreSQL refuses the overflow: dropped AND counted
            assert s.dropped["rejected"] == 1 and s.status()["dropped"] == 1
            assert s.metrics.dropped.labels(reason="rejected")._value.get() == 1
            assert count(s.engine) == 3
        else:
            assert count(s.engine) == 4 and s.status()["dropped"] == 0
    finally:
        s.stop()


def test_unreachable_database_keeps_records_then_drops_and_counts_over_the_limit(tmp_path):
    port = free_port()  # nothing listens there
    s = service(
        tmp_path, f"postgresql://postgres@127.0.0.1:{port}/none", journal_max_bytes=4000, db_timeout_s=1
    )
    try:
        kept = sum(s.persist(draft()) for _ in range(40))
        wait_for(lambda: s.state == "degraded")
        st = s.status()
        assert st["state"] == "degraded" and "OperationalError" in st["error"]
        assert 0 < kept < 40
        assert st["pending"] == kept and st["dropped"] == 40 - kept  # every record is kept or counted
        assert s.dropped["journal_full"] == 40 - kept
        assert not s.flush(0.2)
    finally:
        s.stop()
    # what was kept stays in the journal for the next start
    left = Journal.adopt_orphans(tmp_path / "data/records/journal")
    assert sum(j.pending_records for j in left) == kept
    for j in left:
        j.close()


def test_auto_migrate_off_reports_what_to_run(tmp_path):
    s = service(tmp_path, auto_migrate=False)
    try:
        wait_for(lambda: s.state == "degraded")
        assert "anomaly-inspect db upgrade" in s.status()["error"]
        upgrade(s.engine)
        s.persist(draft())
        wait_for(lambda: s.state == "ok" and s.pending_records == 0)
    finally:
        s.stop()


def test_uuid7_ids_sort_by_time():
    a = new_record_id()
    time.sleep(0.002)
    b = new_record_id()
    assert len(a) == 36 and a[14] == "7" and a < b


# -------------------------------------------------------------------- migrations


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_on_an_empty_database_match_the_models(tmp_path, backend, request):
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
        assert upgrade(engine) == head_revision()
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True}),
                Base.metadata,
            )
        assert diff == [], diff
        assert {"inspections", "inspection_reviews", "alembic_version"} <= set(
            inspect(engine).get_table_names()
        )
        assert upgrade(engine) == head_revision()  # idempotent
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()


def test_postgres_urls_use_psycopg3():
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


# ------------------------------------------------------------------------ queries


def _fill(s: RecordService) -> list[dict]:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(12):
        rows.append(
            draft(
                id=new_record_id(),
                created_at=t0 + timedelta(minutes=i),
                product="bottle" if i % 2 == 0 else "cable",
                score=i / 12,
                decision="anomalous" if i / 12 >= 0.5 else "normal",
                line="L1" if i < 6 else "L2",
                station="cam-1" if i % 3 == 0 else "cam-2",
                status=200 if i != 11 else 404,
            )
        )
    for r in rows:
        s.persist(r)
    assert s.flush(10)
    return rows


def test_filters_pagination_reviews_and_csv(tmp_path, db_url):
    s = service(tmp_path, db_url)
    try:
        rows = _fill(s)
        eng = s.engine
        # newest first, cursor pagination without overlap or gap
        seen, cursor = [], None
        while True:
            page, cursor = list_records(eng, RecordFilter(), limit=5, cursor=cursor)
            seen += [p["id"] for p in page]
            if cursor is None:
                break
        assert seen == [r["id"] for r in reversed(rows)]
        ids = lambda **f: [x["id"] for x in list_records(eng, RecordFilter(**f), limit=100)[0]]  # noqa: E731
        by = {r["id"]: r for r in rows}
        assert (
            all(by[i]["product"] == "cable" for i in ids(product="cable")) and len(ids(product="cable")) == 6
        )
        assert all(by[i]["decision"] == "anomalous" for i in ids(decision="anomalous"))
        assert set(ids(line="L2", station="cam-1")) == {rows[6]["id"], rows[9]["id"]}
        t0 = rows[0]["created_at"]
        assert ids(since=t0 + timedelta(minutes=3), until=t0 + timedelta(minutes=5)) == [
            rows[4]["id"],
            rows[3]["id"],
        ]
        # naive times are UTC
        assert ids(since=(t0 + timedelta(minutes=10)).replace(tzinfo=None)) == [
            rows[11]["id"],
            rows[10]["id"],
        ]
        assert set(ids(min_score=0.25, max_score=0.5)) == {r["id"] for r in rows if 0.25 <= r["score"] <= 0.5}
        assert ids(outcome="refused") == [rows[11]["id"]]
        with pytest.raises(BadCursor):
            list_records(eng, RecordFilter(), cursor="not-a-cursor")
        # reviews: latest on the record, all in the history
        rid = rows[2]["id"]
        at = datetime(2026, 2, 1, tzinfo=timezone.utc)
        review_record(eng, rid, verdict="defect", note="dent", reviewer="ann", at=at)
        out = review_record(
            eng, rid, verdict="good", note="glare", reviewer="bob", at=at + timedelta(hours=1)
        )
        assert out["review"]["verdict"] == "good" and out["review"]["reviewer"] == "bob"
        assert [h["verdict"] for h in out["review_history"]] == ["defect", "good"]
        assert ids(review="good") == [rid] and ids(review="reviewed") == [rid]
        assert rid not in ids(review="unreviewed") and len(ids(review="unreviewed")) == 11
        # CSV: header + one line per record, same order and filters
        text = "".join(csv_pages(eng, RecordFilter(product="bottle"), page=4))
        lines = text.strip().split("\n")
        assert lines[0].startswith("id,created_at,status")
        assert [ln.split(",")[0] for ln in lines[1:]] == ids(product="bottle")
    finally:
        s.stop()


def test_csv_cells_cannot_start_formulas(tmp_path):
    s = service(tmp_path)
    try:
        rec = draft()
        s.persist(rec)
        assert s.flush(10)
        review_record(
            s.engine,
            rec["id"],
            verdict="good",
            note="=HYPERLINK(1)",
            reviewer="x",
            at=datetime.now(timezone.utc),
        )
        text = "".join(csv_pages(s.engine, RecordFilter()))
        assert "'=HYPERLINK(1)" in text
    finally:
        s.stop()


# ---------------------------------------------------------------- kept images


def test_kept_files_retention_by_bytes_and_age(tmp_path):
    store = ImageStore(tmp_path, max_age_s=3600, max_bytes=10_000)
    amap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    now = datetime.now(timezone.utc)
    ids = [new_record_id() for _ in range(6)]
    for rid in ids:
        store.save(rid, now, b"\x89PNG" + os.urandom(2000), "PNG", amap)
        time.sleep(0.002)
    assert store.total_bytes > 10_000
    store.sweep()
    assert store.total_bytes <= 10_000
    left = {p.name.split(".")[0] for p in tmp_path.rglob("*") if p.is_file()}
    k = len(left)
    assert 1 <= k < len(ids) and left == set(ids[-k:])  # the oldest went first, images with their maps
    assert (
        len(list(tmp_path.rglob("*.map.png"))) == k
        and len([p for p in tmp_path.rglob("*") if p.is_file()]) == 2 * k
    )
    # age: everything older than max_age goes, whatever the size
    for p in tmp_path.rglob("*.*"):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    store.sweep()
    assert store.total_bytes == 0 and not any(p.is_file() for p in tmp_path.rglob("*"))
    # a new store learns what is on disk
    store.save(ids[0], now, b"abc", "JPEG", amap)
    again = ImageStore(tmp_path, max_age_s=0, max_bytes=0)
    again.scan()
    assert again.total_bytes == store.total_bytes


def test_kept_map_is_16_bit():
    amap = np.random.default_rng(0).random((20, 30), dtype=np.float32)
    back = png16_to_map(map_to_png16(amap))
    assert back.shape == amap.shape and np.abs(back - amap).max() <= 0.5 / 65535 + 1e-7


def test_labelled_sets_for_calibration_and_evaluation(tmp_path, db_url):
    s = service(tmp_path, db_url)
    try:
        amap = np.zeros((8, 8), np.float32)
        recs = [draft(product="bottle", score=0.1 * i) for i in range(4)]
        for i, r in enumerate(recs):
            if i < 3:
                s.persist(r, image=f"img{i}".encode(), image_format="PNG", anomaly_map=amap)
            else:
                s.persist(r)
        s.persist(draft(product="cable"))
        assert s.flush(10)
        at = datetime.now(timezone.utc)
        review_record(s.engine, recs[0]["id"], verdict="good", note=None, reviewer="a", at=at)
        review_record(s.engine, recs[1]["id"], verdict="defect", note=None, reviewer="a", at=at)
        review_record(s.engine, recs[3]["id"], verdict="good", note=None, reviewer="a", at=at)
        data_dir = tmp_path / "data"
        got = reviewed_records("bottle", data_dir=data_dir, database_url=db_url)
        assert [(r.id, r.label) for r in got] == [(recs[0]["id"], 0), (recs[1]["id"], 1), (recs[3]["id"], 0)]
        assert got[0].image_path is not None and got[0].image_path.read_bytes() == b"img0"
        assert got[2].image_path is None  # the product did not keep this one
        goods = good_images("bottle", data_dir=data_dir, database_url=db_url)
        assert goods == [got[0].image_path]  # good AND kept
        assert reviewed_records("cable", data_dir=data_dir, database_url=db_url) == []
        # retention removed the file: no longer offered
        assert got[0].image_path is not None
        got[0].image_path.unlink()
        assert good_images("bottle", data_dir=data_dir, database_url=db_url) == []
    finally:
        s.stop()


def test_record_json_in_journal_is_plain(tmp_path):
    """No pickle anywhere: a journal line is checksum + JSON."""
    s = service(tmp_path, auto_migrate=False)  # the writer cannot store: the line stays
    try:
        rec = draft(part_id="SN-1")
        s.persist(rec)
        line = next(s.journal.dir.glob("seg-*.log")).read_bytes().splitlines()[0]
        doc = json.loads(line[9:])
        assert doc["id"] == rec["id"] and doc["part_id"] == "SN-1"
    finally:
        s.stop()


def test_a_dropped_record_keeps_no_files(tmp_path):
    s = service(tmp_path, auto_migrate=False, journal_max_bytes=1500)  # nothing leaves the journal
    try:
        amap = np.zeros((8, 8), np.float32)
        results = [
            s.persist(draft(), image=b"x" * 100, image_format="PNG", anomaly_map=amap) for _ in range(3)
        ]
        assert results[0] and not results[-1] and s.dropped["journal_full"] >= 1
        kept_files = [p for p in (tmp_path / "data/records/images").rglob("*") if p.is_file()]
        assert len(kept_files) == 2 * sum(results)  # image + map of each KEPT record only
        assert s.images.total_bytes == sum(p.stat().st_size for p in kept_files)
    finally:
        s.stop()


def test_migrations_ship_in_the_package():
    """pyproject's package-data carries every migration file (they run from an installed wheel)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "service"
    ]
    files = [
        p.relative_to(root / "service").as_posix()
        for p in (root / "service/migrations").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert any(f.startswith("migrations/versions/") for f in files)
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) for pat in patterns), f


@pytest.mark.parametrize(
    ("url", "says"),
    [("nonsense", "not a database URL"), ("mysql://u@h/db", "no driver"), ("foo://x", "not a database URL")],
)
def test_bad_database_url_is_refused_at_start_clearly(url, says):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=f"ZSI_DATABASE_URL.*{says}"):
        Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    for good in ("postgresql://u:p@h:5432/db", "postgres://u@h/db", "sqlite:////tmp/x.db"):
        assert Settings(_env_file=None, database_url=good).database_url == good  # type: ignore[call-arg]
