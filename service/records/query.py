"""Reading records: filters, cursor pagination (newest first), one record, reviews, CSV export.

Blocking database calls: the API runs them in the threadpool.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import Engine, Select, and_, or_, select
from sqlalchemy.orm import Session

from service.records.models import InspectionRecord, ReviewRecord

ReviewState = Literal["unreviewed", "reviewed", "good", "defect"]
Outcome = Literal["answered", "refused"]
MAX_PAGE = 500


class BadCursor(ValueError):
    """The pagination cursor is not one this service made."""


class RecordNotFound(LookupError):
    """No record with this id."""


@dataclass(frozen=True)
class RecordFilter:
    """Filters of ``GET /inspections`` and the CSV export (all optional, combined with AND)."""

    product: str | None = None
    decision: Literal["anomalous", "normal"] | None = None
    review: ReviewState | None = None
    outcome: Outcome | None = None
    line: str | None = None
    station: str | None = None
    part_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_score: float | None = None
    max_score: float | None = None
    cached: bool | None = None

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        r = InspectionRecord
        conds: list[Any] = []
        for name in ("product", "decision", "line", "station", "part_id"):
            value = getattr(self, name)
            if value is not None:
                conds.append(getattr(r, name) == value)
        if self.review == "unreviewed":
            conds.append(r.review_verdict.is_(None))
        elif self.review == "reviewed":
            conds.append(r.review_verdict.is_not(None))
        elif self.review is not None:
            conds.append(r.review_verdict == self.review)
        if self.outcome == "answered":
            conds.append(r.status == 200)
        elif self.outcome == "refused":
            conds.append(r.status != 200)
        if self.since is not None:
            conds.append(r.created_at >= _aware(self.since))
        if self.until is not None:
            conds.append(r.created_at < _aware(self.until))
        if self.min_score is not None:
            conds.append(r.score >= self.min_score)
        if self.max_score is not None:
            conds.append(r.score <= self.max_score)
        if self.cached is not None:
            conds.append(r.cached.is_(self.cached))
        return stmt.where(*conds) if conds else stmt


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def encode_cursor(rec: InspectionRecord) -> str:
    raw = json.dumps([rec.created_at.isoformat(), rec.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, rid = json.loads(raw)
        return _aware(datetime.fromisoformat(created)), str(rid)
    except (ValueError, TypeError) as exc:
        raise BadCursor(f"invalid cursor {cursor[:40]!r}: pass the next_cursor of a previous page") from exc


def _page_stmt(flt: RecordFilter, after: tuple[datetime, str] | None, limit: int) -> Select[Any]:
    r = InspectionRecord
    stmt = flt.apply(select(r))
    if after is not None:
        created, rid = after
        stmt = stmt.where(or_(r.created_at < created, and_(r.created_at == created, r.id < rid)))
    return stmt.order_by(r.created_at.desc(), r.id.desc()).limit(limit)


def list_records(
    engine: Engine, flt: RecordFilter, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page, newest first, and the cursor of the next page (None at the end)."""
    limit = max(1, min(limit, MAX_PAGE))
    after = decode_cursor(cursor) if cursor else None
    with Session(engine) as s:
        rows = list(s.scalars(_page_stmt(flt, after, limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return [record_dict(x) for x in rows], (encode_cursor(rows[-1]) if more and rows else None)


def get_record(engine: Engine, record_id: str, *, with_reviews: bool = True) -> dict[str, Any]:
    with Session(engine) as s:
        rec = s.get(InspectionRecord, record_id)
        if rec is None:
            raise RecordNotFound(record_id)
        out = record_dict(rec)
        if with_reviews:
            reviews = s.scalars(
                select(ReviewRecord).where(ReviewRecord.inspection_id == record_id).order_by(ReviewRecord.id)
            )
            out["review_history"] = [
                {
                    "verdict": v.verdict,
                    "note": v.note,
                    "reviewer": v.reviewer,
                    "reviewed_at": v.reviewed_at.isoformat(),
                }
                for v in reviews
            ]
        return out


def review_record(
    engine: Engine,
    record_id: str,
    *,
    verdict: Literal["good", "defect"],
    note: str | None,
    reviewer: str,
    at: datetime,
) -> dict[str, Any]:
    """Store an operator verdict (the latest on the record, every one in the history)."""
    with Session(engine) as s, s.begin():
        rec = s.get(InspectionRecord, record_id, with_for_update=True)
        if rec is None:
            raise RecordNotFound(record_id)
        rec.review_verdict, rec.review_note, rec.reviewer, rec.reviewed_at = verdict, note, reviewer, at
        s.add(
            ReviewRecord(
                inspection_id=record_id, verdict=verdict, note=note, reviewer=reviewer, reviewed_at=at
            )
        )
    return get_record(engine, record_id)


def record_dict(rec: InspectionRecord) -> dict[str, Any]:
    """The API view of a record."""
    review = None
    if rec.review_verdict is not None:
        review = {
            "verdict": rec.review_verdict,
            "note": rec.review_note,
            "reviewer": rec.reviewer,
            "reviewed_at": rec.reviewed_at.isoformat() if rec.reviewed_at else None,
        }
    return {
        "id": rec.id,
        "created_at": rec.created_at.isoformat(),
        "status": rec.status,
        "error": {"code": rec.error_code, "message": rec.error_message} if rec.error_code else None,
        "output": rec.output,
        "product": rec.product,
        "recipe_digest": rec.recipe_digest,
        "prompt_digest": rec.prompt_digest,
        "method": rec.method,
        "model": rec.model,
        "weights": rec.weights,
        "precision": rec.precision,
        "demo": rec.demo,
        "reference_key": rec.reference_key,
        "reference_count": rec.reference_count,
        "used_references": rec.used_references,
        "threshold": rec.threshold,
        "threshold_source": rec.threshold_source,
        "threshold_provenance": rec.threshold_provenance,
        "score": rec.score,
        "normalized_score": rec.normalized_score,
        "decision": rec.decision,
        "regions": rec.regions,
        "regions_truncated": rec.regions_truncated,
        "cached": rec.cached,
        "batch_size": rec.batch_size,
        "timings_ms": rec.timings_ms,
        "stream_mode": rec.stream_mode,
        "bank_size": rec.bank_size,
        "image": {
            "sha256": rec.image_sha256,
            "bytes": rec.image_bytes,
            "width": rec.image_width,
            "height": rec.image_height,
            "kept": rec.image_path is not None,
        },
        "line": rec.line,
        "station": rec.station,
        "part_id": rec.part_id,
        "review": review,
    }


CSV_COLUMNS = (
    "id",
    "created_at",
    "status",
    "error_code",
    "product",
    "method",
    "model",
    "weights",
    "precision",
    "recipe_digest",
    "prompt_digest",
    "reference_count",
    "threshold",
    "threshold_source",
    "score",
    "normalized_score",
    "decision",
    "regions",
    "cached",
    "stream_mode",
    "bank_size",
    "line",
    "station",
    "part_id",
    "image_sha256",
    "image_width",
    "image_height",
    "image_bytes",
    "image_kept",
    "review_verdict",
    "reviewer",
    "reviewed_at",
    "review_note",
)


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value  # no formula injection when the file is opened in a spreadsheet
    return "" if value is None else value


def _csv_row(rec: InspectionRecord) -> list[Any]:
    values = {c: getattr(rec, c, None) for c in CSV_COLUMNS}
    values["regions"] = len(rec.regions or [])
    values["image_kept"] = rec.image_path is not None
    return [_cell(values[c]) for c in CSV_COLUMNS]


def csv_pages(engine: Engine, flt: RecordFilter, *, page: int = 500) -> Iterator[str]:
    """The CSV export as text chunks (header first), newest first, read page by page (keyset)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    after: tuple[datetime, str] | None = None
    while True:
        with Session(engine) as s:
            rows = list(s.scalars(_page_stmt(flt, after, page)))
        for rec in rows:
            writer.writerow(_csv_row(rec))
        chunk = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        if chunk:
            yield chunk
        if len(rows) < page:
            return
        after = (rows[-1].created_at, rows[-1].id)


def kept_paths(engine: Engine, record_id: str) -> tuple[str | None, str | None, dict[str, Any]]:
    """``(image_path, map_path, record)`` of a record (paths relative to the image root)."""
    with Session(engine) as s:
        rec = s.get(InspectionRecord, record_id)
        if rec is None:
            raise RecordNotFound(record_id)
        return rec.image_path, rec.map_path, record_dict(rec)


__all__ = [
    "CSV_COLUMNS",
    "MAX_PAGE",
    "BadCursor",
    "RecordFilter",
    "RecordNotFound",
    "csv_pages",
    "decode_cursor",
    "encode_cursor",
    "get_record",
    "kept_paths",
    "list_records",
    "record_dict",
    "review_record",
]
