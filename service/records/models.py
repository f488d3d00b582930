"""The records schema (SQLAlchemy 2 declarative): one row per /inspect answer, one per review.

The schema is created and changed ONLY by the Alembic migrations in
``service/migrations`` (also for SQLite); a test checks that the migrations at head
match these classes (autogenerate diff empty).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Max length of the client-supplied ``line``, ``station`` and ``part_id`` (validated at the API).
CLIENT_FIELD_MAX = 64


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text: UTC assumed)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class InspectionRecord(Base):
    """One answered ``POST /inspect`` (an answer with a score, or a refusal with an error code)."""

    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, comment="UUIDv7 (time ordered)")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    status: Mapped[int] = mapped_column(Integer, nullable=False, comment="HTTP status of the answer")
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str] = mapped_column(String(8), nullable=False, default="json")
    # what was asked / used
    product: Mapped[str | None] = mapped_column(String(64))
    recipe_digest: Mapped[str | None] = mapped_column(String(16), comment="digest of the recipe JSON")
    prompt_digest: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128))
    weights: Mapped[str | None] = mapped_column(String(256))
    precision: Mapped[str | None] = mapped_column(String(8))
    demo: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    reference_key: Mapped[str | None] = mapped_column(String(64))
    reference_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    used_references: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # the decision
    threshold: Mapped[float | None] = mapped_column(Float)
    threshold_source: Mapped[str | None] = mapped_column(String(32), comment="product | generic | ...")
    threshold_provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    score: Mapped[float | None] = mapped_column(Float)
    normalized_score: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str | None] = mapped_column(String(16))
    regions: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    regions_truncated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    cached: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    batch_size: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    timings_ms: Mapped[dict[str, float] | None] = mapped_column(JSON)
    # stream products (docs/musc.md): who answered and the bank size after the answer
    stream_mode: Mapped[str | None] = mapped_column(String(16), comment="warming_up | stream (else null)")
    bank_size: Mapped[int | None] = mapped_column(Integer)
    # the image
    image_sha256: Mapped[str | None] = mapped_column(String(64), comment="sha256 of the uploaded bytes")
    image_bytes: Mapped[int | None] = mapped_column(Integer)
    image_width: Mapped[int | None] = mapped_column(Integer)
    image_height: Mapped[int | None] = mapped_column(Integer)
    image_path: Mapped[str | None] = mapped_column(String(255), comment="relative to the image root")
    map_path: Mapped[str | None] = mapped_column(String(255))
    # client context
    line: Mapped[str | None] = mapped_column(String(CLIENT_FIELD_MAX))
    station: Mapped[str | None] = mapped_column(String(CLIENT_FIELD_MAX))
    part_id: Mapped[str | None] = mapped_column(String(CLIENT_FIELD_MAX))
    # the latest operator review (history in inspection_reviews)
    review_verdict: Mapped[str | None] = mapped_column(String(16))
    review_note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str | None] = mapped_column(String(128))
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_inspections_created", "created_at", "id"),
        Index("ix_inspections_product_created", "product", "created_at"),
        Index("ix_inspections_line_station", "line", "station"),
        Index("ix_inspections_review", "review_verdict"),
    )


class ReviewRecord(Base):
    """Every operator verdict on an inspection (the inspection row holds the latest one)."""

    __tablename__ = "inspection_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False
    )
    verdict: Mapped[str] = mapped_column(String(16), nullable=False)
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(128), nullable=False)
    reviewed_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)

    __table_args__ = (Index("ix_inspection_reviews_inspection", "inspection_id", "id"),)


#: Columns of a record as written from the journal (everything but the review).
RECORD_COLUMNS: tuple[str, ...] = tuple(
    c.name
    for c in InspectionRecord.__table__.columns
    if c.name not in ("review_verdict", "review_note", "reviewer", "reviewed_at")
)

__all__ = ["CLIENT_FIELD_MAX", "RECORD_COLUMNS", "Base", "InspectionRecord", "ReviewRecord", "UtcDateTime"]
