"""The record of one /inspect request while it runs (filled by the inspection flow, then persisted)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from prompts import ProductRecipe
from service.records.store import new_record_id, utcnow


def recipe_digest(recipe: ProductRecipe) -> str:
    """16 hex of sha256 over the recipe JSON: the recipe version a record was decided with."""
    return hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:16]


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class RecordDraft:
    """Column values of an inspection record (see :class:`service.records.models.InspectionRecord`).

    Request state lives here, in a local object of the request, never on the flow.
    """

    id: str = field(default_factory=new_record_id)
    created_at: datetime = field(default_factory=utcnow)
    status: int = 200
    error_code: str | None = None
    error_message: str | None = None
    output: str = "json"
    product: str | None = None
    recipe_digest: str | None = None
    prompt_digest: str | None = None
    method: str | None = None
    model: str | None = None
    weights: str | None = None
    precision: str | None = None
    demo: bool = False
    reference_key: str | None = None
    reference_count: int = 0
    used_references: bool = False
    threshold: float | None = None
    threshold_source: str | None = None
    threshold_provenance: dict[str, Any] | None = None
    score: float | None = None
    normalized_score: float | None = None
    decision: str | None = None
    regions: list[dict[str, Any]] | None = None
    regions_truncated: bool = False
    cached: bool = False
    batch_size: int = 0
    timings_ms: dict[str, float] | None = None
    stream_mode: str | None = None
    bank_size: int | None = None
    image_sha256: str | None = None
    image_bytes: int | None = None
    image_width: int | None = None
    image_height: int | None = None
    line: str | None = None
    station: str | None = None
    part_id: str | None = None

    def refused(self, status: int, code: str, message: str) -> None:
        self.status, self.error_code, self.error_message = status, code, message[:2000]

    def set_normalized(self, value: Any) -> None:
        self.normalized_score = _finite(value)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["RecordDraft", "recipe_digest"]
