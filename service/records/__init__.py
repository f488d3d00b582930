"""Inspection records: a durable, queryable trail of every /inspect answer (docs/records.md).

- :mod:`~service.records.models`: the schema (SQLAlchemy 2); made by the Alembic
  migrations in ``service/migrations``.
- :mod:`~service.records.db`: engines (SQLite WAL default, PostgreSQL by URL), migrations.
- :mod:`~service.records.journal`: the local append-only journal (durable before the answer).
- :mod:`~service.records.store`: :class:`RecordService`, the journal + background writer.
- :mod:`~service.records.images`: kept images and maps under retention limits.
- :mod:`~service.records.query`: filters, pagination, reviews, CSV export.
- :mod:`~service.records.labelled`: reviewed records for calibration and evaluation.
"""

from __future__ import annotations

from service.records.labelled import LabelledRecord, good_images, reviewed_records
from service.records.store import RecordService, new_record_id, utcnow

__all__ = ["LabelledRecord", "RecordService", "good_images", "new_record_id", "reviewed_records", "utcnow"]
