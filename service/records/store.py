"""The record service: durable local write on the request path, a background writer to the database.

On the request path (a threadpool thread, never the event loop) :meth:`RecordService.persist`
writes the kept image files (when the product keeps images) and appends the record to
the local :class:`~service.records.journal.Journal` (fsync-ed): once it returns, the
record survives a crash. One writer thread per process moves journal records into the
database (SQLite file or PostgreSQL) in batches, idempotently (a known id is skipped),
then advances the journal. When the database is unreachable the writer retries with
back-off; the journal keeps the records up to ``ZSI_RECORDS_JOURNAL_MAX_MB`` and a record
beyond that is dropped AND counted (``zsi_records_dropped_total``), never silently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine, String, Table, insert
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from service.records.db import (
    backend_name,
    current_revision,
    default_url,
    head_revision,
    make_engine,
    safe_url,
    upgrade,
)
from service.records.images import ImageStore
from service.records.journal import Journal, JournalFull
from service.records.models import RECORD_COLUMNS, InspectionRecord

log = logging.getLogger("service.records")


def new_record_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, then random bits (sorts by creation time)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


#: Column lengths of the text columns (``None``: unbounded ``Text``).
_TEXT_LENGTHS: dict[str, int | None] = {
    c.name: c.type.length
    for c in InspectionRecord.__table__.columns
    if c.name in RECORD_COLUMNS and isinstance(c.type, String)
}


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A journal record -> column values (unknown keys ignored, so old journals stay readable).

    Text values lose NUL characters and are cut to their column's length: values the
    client chose (an unknown product or method name, a refusal's message) must never make
    the database refuse the row (PostgreSQL refuses both, SQLite would keep them as sent).
    """
    row = {k: record.get(k) for k in RECORD_COLUMNS}
    for name, length in _TEXT_LENGTHS.items():
        value = row[name]
        if isinstance(value, str):
            value = value.replace("\x00", "")
            row[name] = value[:length] if length is not None else value
    created = row["created_at"]
    if isinstance(created, str):
        row["created_at"] = datetime.fromisoformat(created)
    for flag in ("demo", "used_references", "regions_truncated", "cached"):
        row[flag] = bool(row[flag])
    for n in ("reference_count", "batch_size"):
        row[n] = int(row[n] or 0)
    row["output"] = row["output"] or "json"
    return row


class RecordMetrics:
    """Prometheus metrics of the records pipeline (on the app's registry)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry or CollectorRegistry()
        self.written = Counter("zsi_records_written", "Inspection records stored in the database", registry=r)
        self.dropped = Counter(
            "zsi_records_dropped",
            "Inspection records NOT kept (journal_full, write_error, corrupt, rejected)",
            ["reason"],
            registry=r,
        )
        self.pending = Gauge(
            "zsi_records_pending", "Records in the local journal, not yet in the database", registry=r
        )
        self.journal_bytes = Gauge(
            "zsi_records_journal_bytes", "Bytes of records waiting in the journal", registry=r
        )
        self.db_up = Gauge("zsi_records_db_up", "1 when the records database takes writes", registry=r)
        self.image_bytes = Gauge("zsi_records_image_bytes", "Bytes of kept images and maps", registry=r)
        self.images_removed = Counter(
            "zsi_records_images_removed", "Kept image/map files removed by retention", registry=r
        )
        for reason in ("journal_full", "write_error", "corrupt", "rejected"):
            self.dropped.labels(reason=reason)


class RecordService:
    """Durable inspection records for one app instance (``services.records``).

    Args:
        data_dir: ``ZSI_DATA_DIR``; journal, images and the default SQLite file live under ``records/``.
        database_url: SQLAlchemy URL; None = SQLite under ``data_dir``.
    """

    def __init__(
        self,
        data_dir: str | Path,
        database_url: str | None = None,
        *,
        fsync: bool = True,
        journal_max_bytes: int = 256 * 1024 * 1024,
        batch: int = 256,
        retry_s: float = 5.0,
        db_timeout_s: float = 3.0,
        auto_migrate: bool = True,
        image_max_age_s: float = 30 * 86400.0,
        image_max_bytes: int = 2 * 1024**3,
        read_wait_s: float = 2.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.root = Path(data_dir) / "records"
        self.url = database_url or default_url(data_dir)
        self.backend = backend_name(self.url)
        self.fsync = fsync
        self.journal_max_bytes = journal_max_bytes
        self.batch = batch
        self.retry_s = retry_s
        self.db_timeout_s = db_timeout_s
        self.auto_migrate = auto_migrate
        self.read_wait_s = read_wait_s
        self.images = ImageStore(self.root / "images", max_age_s=image_max_age_s, max_bytes=image_max_bytes)
        self.metrics = RecordMetrics(registry)
        self.engine: Engine | None = None
        self.journal: Journal | None = None
        self.adopted: list[Journal] = []
        self.state = "starting"  # starting | ok | degraded | stopped
        self.error: str | None = None
        self.schema: str | None = None
        self.written = 0
        self.dropped: dict[str, int] = {"journal_full": 0, "write_error": 0, "corrupt": 0, "rejected": 0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._lock = threading.Lock()
        self._next_orphan_scan = 0.0
        self._next_sweep = 0.0
        self._last_drop_log = 0.0
        m = self.metrics
        m.pending.set_function(lambda: float(self.pending_records))
        m.journal_bytes.set_function(lambda: float(self.pending_bytes))
        m.db_up.set_function(lambda: 1.0 if self.state == "ok" else 0.0)
        m.image_bytes.set_function(lambda: float(self.images.total_bytes))

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Open this process's journal, adopt journals of dead processes, start the writer (blocking I/O)."""
        self.root.mkdir(parents=True, exist_ok=True)
        journals = self.root / "journal"
        self.adopted = Journal.adopt_orphans(journals, fsync=self.fsync, max_bytes=self.journal_max_bytes)
        for j in self.adopted:
            log.warning(
                "records: adopting the journal %s of a stopped process (%d records not yet stored)",
                j.dir.name,
                j.pending_records,
            )
        self.journal = Journal.create(journals, fsync=self.fsync, max_bytes=self.journal_max_bytes)
        self.engine = make_engine(self.url, timeout_s=self.db_timeout_s, durable=self.fsync)
        self._next_orphan_scan = time.monotonic() + 60.0
        self._thread = threading.Thread(target=self._run, name="records-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Store what the database takes within ``timeout_s``, stop the writer; the rest stays journaled."""
        if self._thread is not None:
            deadline = time.monotonic() + timeout_s
            if self.state == "ok":
                self.flush(timeout_s)
            self._stop.set()
            self._wake.set()
            self._thread.join(max(0.1, deadline - time.monotonic()))
            self._thread = None
        for j in [*self.adopted, *([self.journal] if self.journal else [])]:
            j.close(remove_if_drained=True)
        self.adopted = []
        if self.engine is not None:
            self.engine.dispose()
        self.state = "stopped"

    # ------------------------------------------------------------ write path
    @property
    def pending_records(self) -> int:
        own = self.journal.pending_records if self.journal else 0
        return own + sum(j.pending_records for j in self.adopted)

    @property
    def pending_bytes(self) -> int:
        own = self.journal.pending_bytes if self.journal else 0
        return own + sum(j.pending_bytes for j in self.adopted)

    def persist(
        self,
        record: dict[str, Any],
        *,
        image: bytes | None = None,
        image_format: str | None = None,
        anomaly_map: np.ndarray | None = None,
    ) -> bool:
        """Make ``record`` durable before the answer leaves (blocking: call from a worker thread).

        ``record`` holds column values (``created_at`` an aware datetime); with ``image``,
        ``image_format`` and ``anomaly_map`` the files are kept too. Returns False when the
        record was dropped (counted in ``zsi_records_dropped_total``).
        """
        if self.journal is None:
            raise RuntimeError("RecordService.persist before start()")
        doc = dict(record)
        created = doc["created_at"]
        if image is not None and anomaly_map is not None and image_format:
            try:
                doc["image_path"], doc["map_path"] = self.images.save(
                    doc["id"], created, image, image_format, anomaly_map
                )
                if self.images.needs_sweep():
                    self._wake.set()
            except OSError as exc:
                log.error("records: could not keep the image of %s: %s", doc["id"], exc)
        doc["created_at"] = created.isoformat()
        others = sum(j.pending_bytes for j in self.adopted)
        try:
            self.journal.append(doc, others_pending=others)
        except (JournalFull, OSError) as exc:
            self._count_drop(
                "journal_full" if isinstance(exc, JournalFull) else "write_error", doc["id"], str(exc)
            )
            kept = [p for p in (doc.get("image_path"), doc.get("map_path")) if p]
            if kept:
                self.images.discard(kept)
            return False
        self._wake.set()
        return True

    def _count_drop(self, reason: str, record_id: str, why: str) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.metrics.dropped.labels(reason=reason).inc()
        now = time.monotonic()
        if now - self._last_drop_log > 10.0:
            self._last_drop_log = now
            log.error("records: inspection %s NOT recorded (%s): %s", record_id, reason, why)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every record appended so far is in the database (False after ``timeout_s``)."""
        if self.journal is None:
            return False
        target = self.journal.end
        deadline = time.monotonic() + timeout_s
        with self._progress:
            while True:
                if self.journal.committed >= target and not any(j.pending_records for j in self.adopted):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self.state == "degraded" or self._thread is None:
                    return False
                self._wake.set()
                self._progress.wait(min(left, 0.5))

    # ---------------------------------------------------------------- writer
    def _run(self) -> None:
        self.images.scan()
        delay = 0.2
        while not self._stop.is_set():
            try:
                if self.schema is None:
                    self._prepare()
                progressed = self._drain_once()
            except (SQLAlchemyError, OSError, ValueError, RuntimeError) as exc:
                self._failed(exc)
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_s)
                continue
            delay = 0.2
            if self.state == "degraded":
                log.warning(
                    "records: database %s is back (%d pending)", safe_url(self.url), self.pending_records
                )
            self.state, self.error = "ok", None
            self._housekeeping()
            if not progressed:
                self._wake.wait(0.5)
                self._wake.clear()
        # last chance before stopping: store what is left if the database answers
        if self.state == "ok":
            try:
                while self._drain_once():
                    pass
            except (SQLAlchemyError, OSError) as exc:
                log.warning("records: left in the journal at shutdown: %s", exc)

    def _prepare(self) -> None:
        assert self.engine is not None
        if self.auto_migrate:
            self.schema = upgrade(self.engine)
        else:
            rev, head = current_revision(self.engine), head_revision()
            if rev != head:
                raise RuntimeError(
                    f"the records schema is at {rev or 'nothing'}, this service needs {head}: "
                    "run `anomaly-inspect db upgrade` (or set ZSI_DB_AUTO_MIGRATE=true)"
                )
            self.schema = rev
        log.info("records: %s at schema %s", safe_url(self.url), self.schema)

    def _failed(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self.state != "degraded":
            log.error(
                "records: database %s unavailable (%s); records stay in the local journal (%d pending)",
                safe_url(self.url),
                message,
                self.pending_records,
            )
        self.state, self.error = "degraded", message
        with self._progress:
            self._progress.notify_all()

    def _drain_once(self) -> bool:
        """Move one batch from each journal with pending records; True when something moved."""
        assert self.engine is not None
        moved = False
        journals = [*self.adopted, *([self.journal] if self.journal else [])]
        for j in journals:
            records, pos, size = j.read(self.batch)
            if pos is None:
                continue
            stored = len(records)
            if records:
                rows = [_row(r) for r in records]
                try:
                    with self.engine.begin() as conn:
                        self._insert(conn, rows)
                except (DataError, IntegrityError):
                    stored = self._insert_one_by_one(rows)  # one bad row must not block the rest
            j.commit(pos, len(records), size)
            corrupt, j.corrupt = j.corrupt, 0
            if corrupt:
                with self._lock:
                    self.dropped["corrupt"] += corrupt
                self.metrics.dropped.labels(reason="corrupt").inc(corrupt)
            self.written += stored
            self.metrics.written.inc(stored)
            moved = True
        for j in list(self.adopted):
            if j.drained():
                j.close(remove_if_drained=True)
                self.adopted.remove(j)
                log.info("records: adopted journal %s fully stored and removed", j.dir.name)
        with self._progress:
            self._progress.notify_all()
        return moved

    def _insert_one_by_one(self, rows: list[dict[str, Any]]) -> int:
        """Store ``rows`` one transaction each; a row the database refuses is dropped and counted.

        Only for a batch refused for its data (``DataError`` / ``IntegrityError``): a
        connection error still raises, so the writer retries the whole batch later.
        """
        assert self.engine is not None
        stored = 0
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    self._insert(conn, [row])
                stored += 1
            except (DataError, IntegrityError) as exc:
                self._count_drop("rejected", row["id"], f"the database refused it: {exc.orig}")
        return stored

    def _insert(self, conn: Any, rows: list[dict[str, Any]]) -> None:
        table: Table = InspectionRecord.__table__  # type: ignore[assignment]
        dialect = conn.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            conn.execute(pg_insert(table).on_conflict_do_nothing(index_elements=["id"]), rows)
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            conn.execute(sqlite_insert(table).on_conflict_do_nothing(index_elements=["id"]), rows)
        else:  # other backends: skip ids already stored
            ids = [r["id"] for r in rows]
            known = {
                i
                for (i,) in conn.execute(
                    table.select().with_only_columns(table.c.id).where(table.c.id.in_(ids))
                )
            }
            fresh = [r for r in rows if r["id"] not in known]
            if fresh:
                conn.execute(insert(table), fresh)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_orphan_scan:  # journals of worker processes that died meanwhile
            self._next_orphan_scan = now + 60.0
            for j in Journal.adopt_orphans(
                self.root / "journal", fsync=self.fsync, max_bytes=self.journal_max_bytes
            ):
                log.warning("records: adopting the journal %s of a stopped process", j.dir.name)
                self.adopted.append(j)
        if now >= self._next_sweep or self.images.needs_sweep():
            self._next_sweep = now + 30.0
            removed = self.images.sweep()
            if removed:
                self.metrics.images_removed.inc(removed)

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """For /ready: state (ok / degraded / starting), database, counters."""
        out: dict[str, Any] = {
            "state": self.state,
            "database": self.backend,
            "url": safe_url(self.url),
            "schema": self.schema,
            "pending": self.pending_records,
            "journal_bytes": self.pending_bytes,
            "journal_limit_bytes": self.journal_max_bytes,
            "written": self.written,
            "dropped": sum(self.dropped.values()),
            "image_bytes": self.images.total_bytes,
        }
        if self.error:
            out["error"] = self.error
        return out


__all__ = ["RecordMetrics", "RecordService", "new_record_id", "utcnow"]
